"""Examples a model is evaluated or adapted on: `Split` (raw inputs + labels), and the readers of a user's
own data files (JSONL, JSON, CSV/TSV, `datasets.save_to_disk` folders, image folders) and triggers.

Vision inputs are uint8 images [N, 3, R, R] already resized to the model's resolution; text inputs are raw
strings (tokenized at batch time, so text triggers act on words).

Every problem with the user's data raises `SafeMergeError` with one line naming the file and, where it
applies, the row: the line number in JSONL/CSV/TSV files (the header is line 1), the position from 1 in
`.json` lists and `datasets` folders."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from .errors import SafeMergeError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_HF_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
_MISSING: Any = object()   # a record without the field
_CHUNK = 256               # images per converter call: a big folder never sits in memory as PIL images
_INT = re.compile(r"[+-]?\d+")


@dataclass
class Split:
    x: torch.Tensor | list[str]
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: torch.Tensor | list[int]) -> "Split":
        idx = torch.as_tensor(idx, dtype=torch.long)
        x = self.x[idx] if isinstance(self.x, torch.Tensor) else [self.x[i] for i in idx.tolist()]
        return Split(x, self.y[idx])

    def concat(self, other: "Split") -> "Split":
        """This split's examples followed by `other`'s (both texts or both images)."""
        if isinstance(self.x, torch.Tensor) != isinstance(other.x, torch.Tensor):
            raise SafeMergeError("cannot join a split of texts with a split of images")
        x = torch.cat([self.x, other.x]) if isinstance(self.x, torch.Tensor) else [*self.x, *other.x]
        return Split(x, torch.cat([self.y, other.y]))


@dataclass
class UserData:
    """A user's data set as `load_data` read it."""

    split: Split                 # y = -1 for every row when the data has no labels
    labeled: bool
    classes: list[str] | None    # class names when labels were names (or folder names); None for bare ids
    source: str                  # the path, for messages and model cards
    modality: str                # "text" | "vision"

    def __len__(self) -> int:
        return len(self.split)


# ---------------------------------------------------------------------------------------------- readers

def _err(where: object, msg: str, row: int | None = None) -> SafeMergeError:
    return SafeMergeError(f"{where}: {msg}" if row is None else f"{where}: row {row}: {msg}")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _tname(v: object) -> str:
    return "null" if v is None else type(v).__name__


@dataclass
class _Table:
    """The records of a data file, read column by column."""

    source: str
    base: Path                           # folder that relative image paths are resolved against
    columns: list[str]
    rows: list[int]                      # each record's row number, for messages
    get: Callable[[str], list]           # one column's values (_MISSING where a record lacks the field)
    class_names: dict[str, list[str]] = field(default_factory=dict)   # `datasets` ClassLabel columns

    def loc(self, i: int) -> str:
        return f"{self.source}: row {self.rows[i]}"


def _records(src: str, base: Path, records: list[dict], rows: list[int]) -> _Table:
    columns = list(dict.fromkeys(k for r in records for k in r))
    return _Table(src, base, columns, rows, lambda c: [r.get(c, _MISSING) for r in records])


def _read_jsonl(path: Path, src: str, limit: int | None) -> _Table:
    records, rows = [], []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise _err(src, f"not valid JSON ({e.msg})", n) from None
            if not isinstance(rec, dict):
                raise _err(src, f"not a JSON object (got {_tname(rec)})", n)
            records.append(rec)
            rows.append(n)
            if len(records) == limit:
                break
    if not records:
        raise _err(src, "empty file")
    return _records(src, path.parent, records, rows)


def _read_json(path: Path, src: str, limit: int | None) -> _Table:
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    if not text.lstrip().startswith("["):
        return _read_jsonl(path, src, limit)          # JSON Lines saved as .json
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _err(src, f"not valid JSON (line {e.lineno}: {e.msg})") from None
    if not data:
        raise _err(src, "no rows (an empty list)")
    data = data[:limit]
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise _err(src, f"not a JSON object (got {_tname(rec)})", i + 1)
    return _records(src, path.parent, data, list(range(1, len(data) + 1)))


def _read_csv(path: Path, src: str, limit: int | None, delimiter: str) -> _Table:
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))     # long texts
    records, rows = [], []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next((r for r in reader if r), None)
            if header is None:
                raise _err(src, "empty file")
            header = [h.strip() for h in header]
            if len(set(header)) < len(header):
                raise _err(src, f"repeated column names in the header ({', '.join(header)})")
            start = reader.line_num + 1
            for fields in reader:
                if fields:
                    if len(fields) != len(header):
                        raise _err(src, f"{len(fields)} fields, but the header has {len(header)}", start)
                    records.append(dict(zip(header, fields)))
                    rows.append(start)
                    if len(records) == limit:
                        break
                start = reader.line_num + 1
        except csv.Error as e:
            raise _err(src, f"malformed {path.suffix[1:].upper()} ({e})", reader.line_num) from None
    if not records:
        raise _err(src, "no rows (only the header)")
    return _records(src, path.parent, records, rows)


def _read_saved_dataset(path: Path, src: str, limit: int | None) -> _Table:
    """A folder written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: its `test` split, else its
    only split)."""
    try:
        import datasets
    except ImportError:
        raise _err(src, "reading a datasets folder needs 'datasets' (pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure here means the folder is not readable
        raise _err(src, f"cannot read the datasets folder ({_first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if not names:
            raise _err(src, "the DatasetDict has no splits")
        if "test" not in ds and len(names) > 1:
            raise _err(src, f"has splits {', '.join(names)} and none is 'test'; point at one of them "
                            f"(e.g. {path / names[0]})")
        name = "test" if "test" in ds else names[0]
        ds, path, src = ds[name], path / name, str(path / name)
    if len(ds) == 0:
        raise _err(src, "no rows")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    for c, feat in ds.features.items():
        if isinstance(feat, datasets.Image) and feat.decode:
            ds = ds.cast_column(c, datasets.Image(decode=False))       # decoded by `_open_image`, with errors
    names = {c: list(f.names) for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
    return _Table(src, path, list(ds.column_names), list(range(1, len(ds) + 1)), lambda c: list(ds[c]), names)


def _read_table(p: Path, src: str, limit: int | None) -> _Table:
    if p.is_dir():
        return _read_saved_dataset(p, src, limit)
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        raise _err(src, f"unsupported format '{suffix or p.name}' (accepted: .jsonl, .json, .csv, .tsv, "
                        "a datasets.save_to_disk folder, an image folder)")
    try:
        if p.stat().st_size == 0:
            raise _err(src, "empty file")
        if suffix == ".jsonl":
            return _read_jsonl(p, src, limit)
        if suffix == ".json":
            return _read_json(p, src, limit)
        return _read_csv(p, src, limit, "\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError as e:
        raise _err(src, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise _err(src, f"cannot read ({e.strerror or _first_line(e)})") from None


def _scan_image_folder(p: Path, src: str) -> tuple[list[Path], list[str] | None, list[str]]:
    """Image files, each one's class folder (None for a flat folder), and every class folder's name."""
    def images(d: Path, recursive: bool) -> list[Path]:
        found = d.rglob("*") if recursive else d.iterdir()
        return sorted(q for q in found if q.suffix.lower() in IMAGE_EXTS and q.is_file())

    top = images(p, False)
    dirs = [d for d in p.iterdir() if d.is_dir() and not d.name.startswith((".", "__"))]
    numeric = all(d.name.isdigit() for d in dirs)                 # 0..10 sort as numbers, not as text
    dirs.sort(key=lambda d: _class_key(d.name, numeric))
    per_class = {d.name: images(d, True) for d in dirs}
    n_classed = sum(map(len, per_class.values()))
    if top and n_classed:
        raise _err(src, f"mixes images at the top level with class sub-folders ({', '.join(per_class)})")
    if top:
        return top, None, []
    if not n_classed:
        raise _err(src, f"no images ({', '.join(IMAGE_EXTS)}) in the folder or its sub-folders (a folder "
                        "is read as a datasets.save_to_disk folder or as an image folder)")
    files = [f for fs in per_class.values() for f in fs]
    return files, [name for name, fs in per_class.items() for _ in fs], list(per_class)


def _class_key(name: str, numeric: bool) -> tuple:
    return (int(name), name) if numeric else (0, name)


# ----------------------------------------------------------------------------------------------- labels

def _resolve_labels(values: list, loc: Callable[[int], str], col: str, label_names: Sequence[str] | None,
                    num_labels: int | None, *, ids_in_text: bool = True, universe: Sequence[str] = ()
                    ) -> tuple[list[int], list[str] | None] | None:
    """Class ids for label values: ints as they are; names through `label_names`, else numbered in sorted
    order (`universe`: names that exist without rows, e.g. empty class folders). Digit strings count as ids
    when `ids_in_text` (CSV cells are text). None when every label is -1 (how `datasets` marks unlabeled)."""
    index = {str(n): i for i, n in enumerate(label_names)} if label_names is not None else None
    ids: list[int] = []
    named: list[tuple[int, str]] = []            # (row, name) numbered once all names are known
    kind = ""                                    # "id" or "name": labels of one file must not mix them
    for i, v in enumerate(values):
        if isinstance(v, str):
            v = v.strip()
            if index is not None and v in index:
                ids.append(index[v])
                named.append((i, v))
                this = "name"
            elif ids_in_text and _INT.fullmatch(v):
                ids.append(int(v))
                this = "id"
            elif not v:
                raise _err(loc(i), f"'{col}' is empty")
            elif index is not None:
                known = ", ".join(map(str, label_names[:20])) + (", ..." if len(label_names) > 20 else "")
                raise _err(loc(i), f"label '{v}' is not one of the label names ({known})")
            else:
                ids.append(-1)
                named.append((i, v))
                this = "name"
        elif isinstance(v, int) and not isinstance(v, bool):
            ids.append(v)
            this = "id"
        elif isinstance(v, float) and v.is_integer():
            ids.append(int(v))
            this = "id"
        elif v is None or v is _MISSING:
            raise _err(loc(i), f"no '{col}' value")
        else:
            raise _err(loc(i), f"label {v!r} is not a class id or name (got {_tname(v)})")
        if kind and this != kind and index is None:
            was = "names" if kind == "name" else "class ids"
            now = "name" if this == "name" else "class id"
            raise _err(loc(i), f"label {v!r} is a {now}, but earlier labels are {was}")
        kind = kind or this
    if kind == "id" and all(c == -1 for c in ids):
        return None
    classes: list[str] | None = None
    if named and index is None:
        found = {n for _, n in named} | set(universe)
        numeric = all(n.isdigit() for n in found)
        classes = sorted(found, key=lambda n: _class_key(n, numeric))
        order = {n: k for k, n in enumerate(classes)}
        for i, n in named:
            ids[i] = order[n]
    elif named:
        classes = [str(n) for n in label_names]
    n_max = num_labels if num_labels is not None else (len(label_names) if label_names is not None else None)
    for i, c in enumerate(ids):
        if c < 0:
            raise _err(loc(i), f"label {c} is negative")
        if n_max is not None and c >= n_max:
            name = values[i].strip() if isinstance(values[i], str) else str(c)
            what = f"label {c}" if name == str(c) else \
                f"label '{name}' (class {c}, {'in sorted order' if index is None else 'in label_names'})"
            raise _err(loc(i), f"{what} is out of range (the model has {n_max} labels)")
    return ids, classes


# ----------------------------------------------------------------------------------------------- images

def _open_image(ref: Any, base: Path, where: str | None) -> "PILImage":
    """An RGB PIL image from a path (relative to `base`), a PIL image, or a `datasets` {bytes, path} dict.
    `where` prefixes messages (None: the image's own path names the problem)."""
    from PIL import Image, UnidentifiedImageError

    if ref is None or ref is _MISSING:
        raise SafeMergeError(f"{where}: no image")
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, dict) and ref.get("bytes") is not None:
        data, name = io.BytesIO(ref["bytes"]), ref.get("path") or "embedded image"
    elif isinstance(ref, (str, Path)) or (isinstance(ref, dict) and ref.get("path")):
        data = name = base / (ref["path"] if isinstance(ref, dict) else ref)
        if not name.is_file():
            raise SafeMergeError(f"{where or name}: image file {name} not found")
    else:
        raise SafeMergeError(f"{where}: not an image path (got {_tname(ref)})")
    try:
        with Image.open(data) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken file
        why = "cannot identify image file" if isinstance(e, UnidentifiedImageError) else _first_line(e)
        raise SafeMergeError(f"{where}: unreadable image {name} ({why})" if where else
                             f"{name}: unreadable image ({why})") from None


def _chw(im: "PILImage", h: int, w: int) -> torch.Tensor:
    """An RGB PIL image resized to h x w (bilinear) as uint8 [3, h, w]."""
    import numpy as np
    from PIL import Image

    arr = np.array(im.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _default_images(pil: list["PILImage"], resolution: int) -> torch.Tensor:
    """Resize to resolution x resolution (bilinear) -> uint8 [N, 3, R, R]."""
    return torch.stack([_chw(im, resolution, resolution) for im in pil])


def _image_tensor(refs: list, open_one: Callable[[int], "PILImage"], src: str,
                  images: Callable[[list["PILImage"]], torch.Tensor] | None, resolution: int) -> torch.Tensor:
    parts = []
    for s in range(0, len(refs), _CHUNK):
        pil = [open_one(i) for i in range(s, min(s + _CHUNK, len(refs)))]
        t = images(pil) if images is not None else _default_images(pil, resolution)
        if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape[:2] == (len(pil), 3)
                and t.dim() == 4):
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise SafeMergeError(f"{src}: the image converter returned {got}, not uint8 [N, 3, R, R]")
        parts.append(t)
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------- load_data

def load_data(path: str | os.PathLike, *, modality: str | None = None, text_column: str = "text",
              image_column: str = "image", label_column: str = "label",
              label_names: Sequence[str] | None = None, num_labels: int | None = None,
              images: Callable[[list["PILImage"]], torch.Tensor] | None = None, resolution: int = 224,
              limit: int | None = None, require_labels: bool = False) -> UserData:
    """Read a user's data: a `.jsonl`, `.json` (list of objects or JSON Lines), `.csv` or `.tsv` file, a
    folder written by `datasets` `save_to_disk`, or an image folder (a sub-folder per class; flat: unlabeled).

    The modality is `text` when `text_column` exists, `vision` for `image_column` (paths relative to the
    file's folder, or `datasets` images) or an image folder. Labels are class ids, or names mapped through
    `label_names` (e.g. the model's id2label values) or else numbered in sorted order (`classes`); ids must be
    below `num_labels` when given. Without a label column the data are unlabeled (y = -1), an error when
    `require_labels`. Images become uint8 [N, 3, R, R] through `images` (e.g. the model's image processor),
    else a bilinear resize to `resolution`. `limit` keeps the first rows."""
    src, p = str(path), Path(path)
    if modality not in (None, "text", "vision"):
        raise SafeMergeError(f"modality must be 'text' or 'vision' (got {modality!r})")
    if limit is not None and limit < 1:
        raise SafeMergeError(f"{src}: limit must be at least 1 (got {limit})")
    if not p.exists():
        raise _err(src, "no such file or folder")
    if label_names is not None:
        label_names = [str(n) for n in label_names]          # e.g. id2label.values()

    if p.is_dir() and not any((p / m).exists() for m in _HF_MARKERS):
        if modality == "text":
            raise _err(src, "is an image folder, but the modality is 'text'")
        try:
            files, folder_of, folders = _scan_image_folder(p, src)
        except OSError as e:
            raise _err(e.filename or src, f"cannot read ({e.strerror or _first_line(e)})") from None
        files = files[:limit]
        labels = None
        if folder_of is not None:
            labels = _resolve_labels(folder_of[:limit], lambda i: str(files[i]), "class folder", label_names,
                                     num_labels, ids_in_text=False, universe=folders)
        elif require_labels:
            raise _err(src, "has no class sub-folders, so no labels (needed to measure ACC); put each "
                            "class's images in a sub-folder named after it")
        x = _image_tensor(files, lambda i: _open_image(files[i], Path(), None), src, images, resolution)
        ids, classes = labels if labels is not None else ([-1] * len(files), None)
        y = torch.tensor(ids, dtype=torch.long)
        return UserData(Split(x, y), labels is not None, classes, src, "vision")

    t = _read_table(p, src, limit)
    src, cols = t.source, ", ".join(t.columns)
    inferred = "text" if text_column in t.columns else "vision" if image_column in t.columns else None
    modality = modality or inferred or "text"
    col, other = (text_column, image_column) if modality == "text" else (image_column, text_column)
    if col not in t.columns:
        hint = f"set {modality.replace('vision', 'image')}_column"
        if other in t.columns:
            hint = f"it looks like {inferred} data, but the modality is '{modality}' (or {hint})"
        elif inferred is None:
            hint += " (or image_column for images)" if modality == "text" else ""
        raise _err(src, f"no column '{col}' (columns: {cols}); {hint}")

    n = len(t.rows)
    labels = None
    if label_column in t.columns:
        values, names = t.get(label_column), t.class_names.get(label_column)
        if names and label_names is not None and set(names) <= set(label_names):
            values = [names[v] if isinstance(v, int) and 0 <= v < len(names) else v for v in values]
        labels = _resolve_labels(values, t.loc, label_column, label_names, num_labels)
        if labels is not None and labels[1] is None and names:
            labels = labels[0], names
        if labels is None and require_labels:
            raise _err(src, f"every '{label_column}' is -1 (unlabeled); labels are needed to measure ACC")
    elif require_labels:
        raise _err(src, f"no column '{label_column}' (columns: {cols}); labels are needed to measure ACC; "
                        "set label_column")
    ids, classes = labels if labels is not None else ([-1] * n, None)

    raw = t.get(col)
    if modality == "text":
        for i, v in enumerate(raw):
            if not isinstance(v, str):
                raise _err(t.loc(i), f"no '{col}' value" if v is _MISSING else
                           f"column '{col}' is not text (got {_tname(v)})")
        x: torch.Tensor | list[str] = raw
    else:
        x = _image_tensor(raw, lambda i: _open_image(raw[i], t.base, t.loc(i)), src, images, resolution)
    return UserData(Split(x, torch.tensor(ids, dtype=torch.long)), labels is not None, classes, src, modality)


# ----------------------------------------------------------------------------------------------- writers

def save_jsonl(path: str | os.PathLike, split: Split, classes: Sequence[str] | None = None) -> Path:
    """Write a text split as JSON Lines, `{"text", "label"}` per row plus `"label_text"` (the class name) when
    `classes` are given; rows labelled -1 get no label. Written beside `path`, then renamed over it."""
    p = Path(path)
    if isinstance(split.x, torch.Tensor):
        raise SafeMergeError(f"{p}: JSON Lines holds texts; save images with save_image_folder")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for text, label in zip(split.x, split.y.tolist()):
                row: dict[str, Any] = {"text": text}
                if label >= 0:
                    row["label"] = label
                    if classes is not None:
                        row["label_text"] = classes[label]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def save_image_folder(path: str | os.PathLike, split: Split, classes: Sequence[str]) -> Path:
    """Write an image split as PNGs in one sub-folder per class (`classes[label]`, every class gets one), the
    layout `load_data` reads back (classes in sorted order, or pass `label_names=classes`). Written into a
    temporary folder beside `path`, then renamed; `path` must not exist or be empty."""
    from PIL import Image

    p, x = Path(path), split.x
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
        raise SafeMergeError(f"{p}: an image folder holds uint8 images [N, 3, H, W]; save texts with "
                             "save_jsonl")
    names = [str(c) for c in classes]
    bad = [c for c in names if not c or c.startswith((".", "__")) or "/" in c or os.sep in c]
    if bad or len(set(names)) < len(names):
        raise SafeMergeError(f"{p}: class names must be distinct folder names (got {', '.join(names)})")
    labels = split.y.tolist()
    if any(not 0 <= c < len(names) for c in labels):
        raise SafeMergeError(f"{p}: every label must be a class id in [0, {len(names)}) to choose its folder")
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise SafeMergeError(f"{p}: already exists; choose a new folder")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp"))
    try:
        for c in names:
            (tmp / c).mkdir()
            os.chmod(tmp / c, 0o755)
        width = max(5, len(str(len(labels))))
        for i, (img, c) in enumerate(zip(x, labels)):
            f = tmp / names[c] / f"{i:0{width}d}.png"
            Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()).save(f)
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        if p.exists():
            p.rmdir()
        os.rename(tmp, p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return p


def poison_split(split: Split, apply: Callable, target: int, rate: float, seed: int = 0, at_least: int = 0) -> Split:
    """A copy of `split` where a seeded `rate` share of the rows (at least `at_least`) carries a trigger
    (`apply` on their inputs) and the `target` label: how a backdoor is planted by data poisoning."""
    n = len(split)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[: max(at_least, int(round(rate * n)))]
    y = split.y.clone()
    y[idx] = target
    if isinstance(split.x, torch.Tensor):
        x = split.x.clone()
        x[idx] = apply(split.x[idx])
    else:
        x = list(split.x)
        for i, t in zip(idx.tolist(), apply([split.x[i] for i in idx.tolist()])):
            x[i] = t
    return Split(x, y)


# ---------------------------------------------------------------------------------------------- triggers

@runtime_checkable
class Trigger(Protocol):
    """What evaluation needs from a trigger; the bench's attacks satisfy it too."""

    target: int

    @property
    def name(self) -> str: ...

    def apply(self, x): ...   # list[str] -> list[str], or uint8 [N, 3, R, R] -> uint8 [N, 3, R, R]

    def asr_split(self, split: Split) -> Split: ...


class _AsrSplit:
    target: int

    def apply(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def asr_split(self, split: Split) -> Split:
        """Rows whose label is not the target, with the trigger applied (labels kept): where ASR is read."""
        sub = split.subset((split.y != self.target).nonzero().flatten())
        return Split(self.apply(sub.x), sub.y)


@dataclass
class TextTrigger(_AsrSplit):
    """A word or phrase inserted into each text: at the start, the end, before word `position` (an int), or
    at a random word position among the first `max_position`, seeded by the text itself so a text always gets
    the same position whatever batch it is in."""

    text: str
    target: int = 0
    position: str | int = "random"
    seed: int = 0
    max_position: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise SafeMergeError("a word trigger needs a non-empty word or phrase")
        pos = self.position
        if not (pos in ("start", "end", "random") or (type(pos) is int and pos >= 0)):
            raise SafeMergeError(f"word trigger position must be start, end, random or a word index >= 0 "
                                 f"(got {pos!r})")

    @property
    def name(self) -> str:
        word = self.text if re.fullmatch(r"[^\s@\"',:]+", self.text) else \
            "'" + self.text + "'" if '"' in self.text else f'"{self.text}"'
        return f"word:{word}" + ("" if self.position == "random" else f"@{self.position}")

    def apply(self, x: list[str]) -> list[str]:
        if isinstance(x, torch.Tensor):
            raise SafeMergeError(f"trigger {self.name} inserts words, but the data are images")
        out = []
        for text in x:
            words = text.split()
            if self.position == "random":
                rng = random.Random(zlib.crc32(f"{self.seed}|{text}".encode()))
                i = rng.randint(0, min(len(words), self.max_position))
            else:
                i = {"start": 0, "end": len(words)}.get(self.position, self.position)
            words.insert(min(i, len(words)), self.text)
            out.append(" ".join(words))
        return out


_PLACES = ("bottom-right", "bottom-left", "top-right", "top-left", "center", "random")


@dataclass
class ImageTrigger(_AsrSplit):
    """A square patch stamped on (blend = 1) or blended into (x' = (1 - a) x + a p) each image.

    `patch`: a colour name or "#rrggbb" (solid), "checkerboard" (3x3 cells, as BadNets), or an image file.
    `size`: the patch side, a fraction of the image side when <= 1 (1 = the whole image: a full-image blend),
    else pixels. `position`: a corner, "center", "random" (a position per image, seeded by the image's
    pixels), or (x, y) of the patch's top-left pixel; corners keep `margin` pixels from the edges."""

    patch: str = "white"
    size: float = 0.1
    position: str | tuple[int, int] = "bottom-right"
    blend: float = 1.0
    margin: int = 1
    target: int = 0
    seed: int = 0
    _source: Any = field(default=None, init=False, repr=False, compare=False)  # rgb, "checkerboard" or PIL
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from PIL import ImageColor

        if isinstance(self.position, list):
            self.position = tuple(self.position)
        pos = self.position
        xy = isinstance(pos, tuple) and len(pos) == 2 and all(type(v) is int and v >= 0 for v in pos)
        if not (xy or pos in _PLACES):
            raise SafeMergeError(f"patch position must be {', '.join(_PLACES)} or (x, y) (got {pos!r})")
        if not self.size > 0:
            raise SafeMergeError(f"patch size must be > 0 (got {self.size})")
        if not 0 < self.blend <= 1:
            raise SafeMergeError(f"patch blend must be in (0, 1] (got {self.blend})")
        if self.margin < 0:
            raise SafeMergeError(f"patch margin must be >= 0 (got {self.margin})")
        src = str(self.patch).strip()
        if src == "checkerboard":
            self._source = src
        elif Path(src).suffix.lower() in IMAGE_EXTS or "/" in src or os.sep in src or Path(src).is_file():
            if not Path(src).is_file():
                raise SafeMergeError(f"{src}: patch image not found")
            self._source = _open_image(src, Path("."), None)
        else:
            try:
                self._source = ImageColor.getrgb(src)[:3]
            except ValueError:
                raise SafeMergeError(f"unknown patch colour '{src}' (a patch is a colour name, #rrggbb, "
                                     "'checkerboard' or an image file)") from None

    @property
    def name(self) -> str:
        src = self.patch if isinstance(self._source, (str, tuple)) else Path(self.patch).name
        if self.size == 1 and self.blend < 1:
            return f"blend:{src},alpha={self.blend:g}"
        pos = self.position if isinstance(self.position, str) else "({},{})".format(*self.position)
        opts = [f"size={self.size:g}" if self.size != 0.1 else "",
                f"pos={pos}" if pos != "bottom-right" else "",
                f"blend={self.blend:g}" if self.blend != 1 else "",
                f"margin={self.margin}" if self.margin != 1 else ""]
        return ",".join([f"patch:{src}", *filter(None, opts)])

    def _side(self, n: int) -> int:
        return max(1, min(n, round(self.size * n if self.size <= 1 else self.size)))

    def pattern(self, h: int, w: int) -> torch.Tensor:
        """The patch as uint8 [3, h, w]."""
        if (h, w) not in self._cache:
            if self._source == "checkerboard":
                ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                cell = max(1, min(h, w) // 3)
                p = (((ii // cell + jj // cell) % 2) * 255).to(torch.uint8).expand(3, h, w)
            elif isinstance(self._source, tuple):
                p = torch.tensor(self._source, dtype=torch.uint8).view(3, 1, 1).expand(3, h, w)
            else:
                p = _chw(self._source, h, w)
            self._cache[(h, w)] = p.contiguous()
        return self._cache[(h, w)]

    def _corner(self, H: int, W: int, h: int, w: int) -> tuple[int, int]:
        if isinstance(self.position, tuple):
            top, left = self.position[1], self.position[0]
        else:
            vert, _, horiz = self.position.partition("-")
            m = self.margin
            top = {"top": m, "bottom": H - h - m}.get(vert, (H - h) // 2)
            left = {"left": m, "right": W - w - m}.get(horiz, (W - w) // 2)
        return min(max(top, 0), H - h), min(max(left, 0), W - w)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            what = "texts" if isinstance(x, list) else \
                f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise SafeMergeError(f"trigger {self.name} needs uint8 images [N, 3, H, W]; the data are {what}")
        H, W = x.shape[-2:]
        h, w = self._side(H), self._side(W)
        p, out = self.pattern(h, w), x.clone()
        if self.position == "random":
            salt = zlib.crc32(f"{self.seed}|".encode())
            for i in range(len(out)):
                rng = random.Random(zlib.crc32(out[i].contiguous().numpy(), salt))
                top, left = rng.randint(0, H - h), rng.randint(0, W - w)
                self._stamp(out[i], top, left, p)
        else:
            self._stamp(out, *self._corner(H, W, h, w), p)
        return out

    def _stamp(self, x: torch.Tensor, top: int, left: int, p: torch.Tensor) -> None:
        region = x[..., top:top + p.shape[1], left:left + p.shape[2]]
        if self.blend >= 1:
            region[...] = p
        else:
            region[...] = ((1 - self.blend) * region.float() + self.blend * p.float()).round().to(torch.uint8)


_FORMS = ("word:WORD or word:\"SOME WORDS\" [@start|@end|@random|@N]; patch:COLOUR|#rrggbb|checkerboard|IMAGE"
          "[,size=S][,pos=CORNER|center|random|(X,Y)][,blend=A][,margin=M]; blend:IMAGE[,alpha=A]")


def parse_trigger(spec: str, target: int = 0, seed: int = 0) -> TextTrigger | ImageTrigger:
    """The trigger a CLI string describes: `word:cf`, `word:"the movie was"@start`, `word:cf@3`,
    `patch:white`, `patch:#ff0000,size=6,pos=top-left`, `patch:trigger.png,size=0.2,blend=0.3`,
    `blend:kitty.png,alpha=0.1` (a full-image blend; alpha 0.2 by default)."""
    def bad(why: str) -> SafeMergeError:
        return SafeMergeError(f"bad trigger '{spec}': {why} (accepted: {_FORMS})")

    kind, sep, body = str(spec).strip().partition(":")
    kind, body = kind.strip().lower(), body.strip()
    if not sep or kind not in ("word", "patch", "blend") or not body:
        raise bad("expected word:..., patch:... or blend:...")
    try:
        if kind == "word":
            m = re.fullmatch(r"(?:\"(?P<q>[^\"]+)\"|'(?P<s>[^']+)'|(?P<w>[^@\"']+?))\s*(?:@\s*(?P<pos>\S+))?",
                             body)
            if not m:
                raise bad("expected a word, or words in quotes, then optionally @start, @end, @random or @N")
            pos: str | int = m["pos"] or "random"
            pos = int(pos) if pos.isdigit() else pos
            return TextTrigger(m["q"] or m["s"] or m["w"].strip(), target, pos, seed)
        src, *parts = [s.strip() for s in re.split(r",(?![^()]*\))", body)]
        src = src.strip("\"'")
        opts: dict[str, str] = {}
        for part in parts:
            k, eq, v = part.partition("=")
            k = {"position": "pos", "alpha": "blend"}.get(k.strip().lower(), k.strip().lower())
            allowed = ("size", "pos", "blend", "margin") if kind == "patch" else ("blend",)
            if not eq or k in opts or k not in allowed:
                raise bad(f"unknown or repeated option '{part}'")
            opts[k] = v.strip()
        try:
            size = float(opts.get("size", 0.1 if kind == "patch" else 1.0))
            blend = float(opts.get("blend", 1.0 if kind == "patch" else 0.2))
            margin = int(opts.get("margin", 1 if kind == "patch" else 0))
        except ValueError as e:
            raise bad(f"not a number ({_first_line(e)})") from None
        position: str | tuple[int, int] = opts.get("pos", "bottom-right" if kind == "patch" else "top-left")
        xy = re.fullmatch(r"\(?\s*(\d+)\s*,\s*(\d+)\s*\)?", position)
        if xy:
            position = (int(xy[1]), int(xy[2]))
        return ImageTrigger(src, size, position, blend, margin, target, seed)
    except SafeMergeError as e:      # a value the trigger rejects: its own message says which
        if str(e).startswith("bad trigger"):
            raise
        raise SafeMergeError(f"bad trigger '{spec}': {e}") from None
