"""Tensor I/O on safetensors' own API, for every reader and writer, and the one set of input checks.

- `Checkpoint`: a safetensors file, or a Hugging Face folder with `model.safetensors` or a sharded
  `model.safetensors.index.json`; headers are parsed by `safe_open` (which also refuses truncated or corrupt
  files), tensors are read lazily (memory-mapped, so only what is touched is resident, and a mapping is
  dropped as soon as its reader is closed).
- `load_state_dict` / `save_state_dict`: whole state dicts (sharded folders accepted), written atomically.
- `ShardWriter`: streams tensors chunk by chunk into sharded safetensors files with an index, for outputs
  larger than memory (safetensors' `save_file` needs a whole shard in memory; this writes the same format -
  header, then the data in header order - and every shard is re-opened with `safe_open` before it is kept).
- Checks, the same for state dicts and checkpoints: names, shapes and dtypes against the base
  (`check_same_keys`), NaN/inf (`check_finite`), closeness to the base (`check_same_base`), each a one-line
  `SafeMergeError` naming the file and the tensor.
- Atomic outputs: a temporary sibling renamed into place; files 0644 and folders 0755 (under the umask).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import SafeMergeError

StateDict = dict[str, torch.Tensor]
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
CODES = {v: k for k, v in DTYPES.items()}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


# ------------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class TensorMeta:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = _first_line(e)
        what = "truncated or corrupt safetensors file" if ("incomplete" in msg or "too small" in msg
                                                           or "covered" in msg) else "not a readable safetensors file"
        raise SafeMergeError(f"{path}: {what} ({msg})") from None


def weights_files(path: str | Path) -> list[Path]:
    """The safetensors file(s) of `path`: the file itself, a folder's `model.safetensors`, or the shards of a
    folder's `model.safetensors.index.json`."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / INDEX).exists():
            try:
                weight_map = json.loads((p / INDEX).read_text())["weight_map"]
                files = list(dict.fromkeys(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise SafeMergeError(f"{p / INDEX}: not a valid safetensors index (no weight_map)") from None
            for f in files:
                if not (p / f).exists():
                    raise SafeMergeError(f"{p / f}: shard listed in the index is missing")
            return [p / f for f in files]
        if (p / SINGLE).exists():
            return [p / SINGLE]
        raise SafeMergeError(f"{p}: no {SINGLE} or {INDEX}")
    if not p.exists():
        raise SafeMergeError(f"{p}: no such checkpoint file or folder")
    return [p]


def weights_file(path: str | Path) -> Path:
    """The first safetensors file of `path` (for messages about a model's weights)."""
    return weights_files(path)[0]


class Checkpoint:
    """A safetensors file or (sharded) HF folder, read lazily: `ck.meta[name]` (shape, dtype, file),
    `ck[name]` (a tensor, read on demand), `ck.view(name)` (a memory-mapped view for streaming)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.meta: dict[str, TensorMeta] = {}
        for f in weights_files(self.path):
            with _open(f) as h:
                for name in h.offset_keys():
                    sl = h.get_slice(name)
                    code = sl.get_dtype()
                    if code not in DTYPES:
                        raise SafeMergeError(f"{f}: tensor '{name}' has unsupported dtype {code}")
                    self.meta[name] = TensorMeta(f, tuple(sl.get_shape()), DTYPES[code])
        if self.path.is_dir() and (self.path / INDEX).exists():
            listed = json.loads((self.path / INDEX).read_text())["weight_map"]
            absent = [n for n, f in listed.items() if self.meta.get(n) is None or self.meta[n].file.name != f]
            if absent:
                raise SafeMergeError(f"{self.path / INDEX}: tensor '{absent[0]}' is not in its shard "
                                     f"{listed[absent[0]]}")

    @property
    def config_dir(self) -> Path | None:
        return self.path if self.path.is_dir() else None

    def names(self) -> list[str]:
        return list(self.meta)

    def __contains__(self, name: object) -> bool:
        return name in self.meta

    def __getitem__(self, name: str) -> torch.Tensor:
        with _open(self.meta[name].file) as h:
            return h.get_tensor(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        by_file: dict[Path, list[str]] = {}
        for n, m in self.meta.items():
            by_file.setdefault(m.file, []).append(n)
        for f, names in by_file.items():
            with _open(f) as h:
                for n in names:
                    yield n, h.get_tensor(n)

    @contextmanager
    def views(self, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
        """Memory-mapped flat views of tensors; the mapping is dropped when the block ends (keep no view)."""
        handles = {f: _open(f) for f in {self.meta[n].file for n in names}}
        try:
            yield {n: handles[self.meta[n].file].get_tensor(n).reshape(-1) for n in names}
        finally:
            handles.clear()


def load_state_dict(path: str | Path) -> StateDict:
    """Every tensor of a safetensors file or HF folder (single file or sharded), checked finite."""
    ck = Checkpoint(path)
    sd = dict(ck.items())
    check_finite(sd, weights_file(path) if len(weights_files(path)) == 1 else ck.path)
    return sd


# ------------------------------------------------------------------------------------------------- checks
def check_finite(sd: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Refuse NaN or inf weights, naming the first bad tensor."""
    for k, t in sd.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise SafeMergeError(f"{source}: tensor '{k}' contains NaN or inf values")


def check_same_keys(reference: Mapping[str, Any], sd: Mapping[str, Any], source: str | Path,
                    reference_name: str = "the base model") -> None:
    """Same tensor names, shapes and kinds of dtype (floating or not) as `reference`, else a one-line error
    naming the tensor. Values are tensors or anything with `.shape` and `.dtype` (a Checkpoint's `meta`)."""
    missing = [k for k in reference if k not in sd]
    if missing:
        raise SafeMergeError(f"{source}: missing tensor '{missing[0]}' (present in {reference_name})"
                             + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = [k for k in sd if k not in reference]
    if extra:
        raise SafeMergeError(f"{source}: unexpected tensor '{extra[0]}' (absent from {reference_name})"
                             + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    for k, t in reference.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise SafeMergeError(f"{source}: tensor '{k}' has shape {tuple(sd[k].shape)}, "
                                 f"{reference_name} has {tuple(t.shape)} (different architecture?)")
        if sd[k].dtype.is_floating_point != t.dtype.is_floating_point:
            raise SafeMergeError(f"{source}: tensor '{k}' is {str(sd[k].dtype).replace('torch.', '')}, "
                                 f"{reference_name} has {str(t.dtype).replace('torch.', '')}")


def check_same_base(base: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], source: str | Path,
                    max_relative_distance: float = 0.5, probes: int | None = None,
                    shapes: Mapping[str, Any] | None = None) -> None:
    """A fine-tune moves each weight matrix a few percent away from its base; a model trained from another
    base is as far from it as two random networks. Refuse `sd` when the median over weight matrices of
    ||sd - base|| / ||base|| exceeds the bound (the median ignores a few heavily tuned tensors). `probes`:
    look at that many of the smallest matrices only (checkpoints on disk); `shapes`: their metadata."""
    meta = shapes if shapes is not None else base
    mats = sorted((math.prod(m.shape), k) for k, m in meta.items()
                  if m.dtype.is_floating_point and len(m.shape) >= 2)
    if probes is not None:
        mats = mats[:probes]
    rels = []
    for _, k in mats:
        b = base[k].float()
        rels.append(float((sd[k].float() - b).norm() / b.norm().clamp_min(1e-12)))
    if not rels:
        return
    rel = sorted(rels)[len(rels) // 2]
    if rel > max_relative_distance:
        raise SafeMergeError(f"{source}: weights are {rel:.2f} (median relative L2 per matrix) away from the base "
                             f"model; this checkpoint was not fine-tuned from it (bound {max_relative_distance})")


def check_inputs(base: Checkpoint, models: Sequence[Checkpoint], max_relative_distance: float = 0.5,
                 probes: int = 4) -> None:
    """Before any work starts on checkpoints: same names, shapes and dtype kinds as the base (files complete:
    `Checkpoint` refuses truncated ones), and close to the base on a few of its smallest matrices."""
    for m in models:
        check_same_keys(base.meta, m.meta, m.path, f"the base {base.path}")
    for m in models:
        check_same_base(base, m, m.path, max_relative_distance, probes=probes, shapes=base.meta)


# ------------------------------------------------------------------------------------------------ writing
@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target`, on error it is removed,
    so a reader never sees a half-written output. The folder gets 0755 (under the umask), not mkdtemp's 0700."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o777 & ~_umask())
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path next to `path`, renamed over it on success (0644 under the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to a temporary file in the same folder, then rename it over `path`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_state_dict(sd: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save contiguous CPU tensors to safetensors (safetensors' own writer), atomically."""
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    raise SafeMergeError(f"bad shard size '{size}' (use e.g. 2GB or 500MB)")


def _write_all(f: Any, data: memoryview) -> None:
    """Write all of `data` to the unbuffered file `f` (a raw write may take only part of it)."""
    done = 0
    while done < len(data):
        done += f.write(data[done:])


class ShardWriter:
    """Writes tensors, in the order of `plan()`, chunk by chunk into safetensors shards in `folder`
    (`model.safetensors`, or `model-0000i-of-0000n.safetensors` + index when they exceed `max_shard_bytes`).
    Within a shard, tensors are ordered by decreasing itemsize (as safetensors' writer does) so every tensor's
    data stays aligned."""

    def __init__(self, folder: Path, tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.folder = folder
        self.spec = {n: (tuple(s), d) for n, s, d in tensors}
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[str]] = [[]]
        size = 0
        for n, s, d in tensors:
            nbytes = math.prod(s) * d.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(n)
            size += nbytes
        self.shards = [sorted(sh, key=lambda n: -self.spec[n][1].itemsize) for sh in shards]
        self.files = [SINGLE if len(self.shards) == 1 else f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
                      for i in range(len(self.shards))]
        self.order = [n for sh in self.shards for n in sh]
        self.shard_of = {n: i for i, sh in enumerate(self.shards) for n in sh}
        self._f = None
        self._shard = -1
        # chunks are written by a second thread (the write system call releases the interpreter), from two
        # buffers used in turn: the merge computes the next chunk while the previous one goes to disk
        self._io = ThreadPoolExecutor(1, thread_name_prefix="safemerge-writer")
        self._pending: deque[Future] = deque()
        self._bufs: list[torch.Tensor | None] = [None, None]
        self._turn = 0

    def plan(self) -> list[str]:
        """The order in which tensors must be written."""
        return list(self.order)

    def _header(self, names: list[str]) -> bytes:
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for n in names:
            shape, dtype = self.spec[n]
            nbytes = math.prod(shape) * dtype.itemsize
            header[n] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def _drain(self, keep: int = 0) -> None:
        """Wait until at most `keep` writes are in flight (raising the writer thread's error, if any)."""
        while len(self._pending) > keep:
            self._pending.popleft().result()

    def _close_shard(self) -> None:
        if self._f is not None:
            self._drain()
            self._f.close()
            self._f = None
            with _open(self.folder / self.files[self._shard]):  # safe_open must parse what was written
                pass

    def begin(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if (tuple(shape), dtype) != self.spec[name]:
            raise ValueError(f"{name}: planned as {self.spec[name]}, written as {(shape, dtype)}")
        i = self.shard_of[name]
        if i != self._shard:
            self._close_shard()
            self._shard = i
            self._f = open(self.folder / self.files[i], "wb", buffering=0)
            self._f.write(self._header(self.shards[i]))
        self._dtype = dtype
        self._left = math.prod(shape)

    def write(self, chunk: torch.Tensor) -> None:
        """Queue a chunk (cast to the tensor's dtype, copied: the caller may reuse it at once)."""
        n = chunk.numel()
        if n > self._left:
            raise ValueError("more data than the tensor holds")
        self._left -= n
        if not n:
            return
        slot, self._turn = self._turn, self._turn ^ 1
        self._drain(keep=1)  # the write in flight, if any, uses the other buffer
        buf = self._bufs[slot]
        if buf is None or buf.numel() < n or buf.dtype != self._dtype:
            buf = self._bufs[slot] = torch.empty(max(n, 1 << 20), dtype=self._dtype)
        out = buf[:n]
        out.copy_(chunk.reshape(-1))
        self._pending.append(self._io.submit(_write_all, self._f, memoryview(out.view(torch.uint8).numpy())))

    def end(self) -> None:
        if self._left:
            raise ValueError(f"{self._left} elements missing")

    def abort(self) -> None:
        """Stop after an error: wait for the writes in flight (their errors ignored) and close the file."""
        for fut in self._pending:
            fut.exception()
        self._pending.clear()
        if self._f is not None:
            self._f.close()
            self._f = None
        self._io.shutdown()

    def close(self) -> None:
        """Finish the last shard and write the index (several shards)."""
        self._close_shard()
        self._io.shutdown()
        if len(self.shards) > 1:
            total = sum(math.prod(s) * d.itemsize for s, d in self.spec.values())
            weight_map = {n: self.files[self.shard_of[n]] for n in self.spec}
            (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                         "weight_map": weight_map}, indent=2))
