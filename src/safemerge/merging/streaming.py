"""Streaming merges of checkpoints larger than memory.

Checkpoints are read tensor by tensor with plain positioned reads from safetensors files (single files or
sharded Hugging Face folders with `model.safetensors.index.json`): no mmap, so resident memory stays at a
few tensors whatever the checkpoint size. Every input is checked before any work starts (same names, shapes,
complete files); NaN/inf are refused as they are met. The output is written as sharded safetensors with an
index, the config copied, into a temporary folder renamed at the end.

Methods are the in-memory ones of `merging.py`, applied to one tensor at a time (they are elementwise, or
per tensor); TIES with global trimming needs one magnitude threshold per task vector over the whole model:
`global_threshold` finds it exactly with two streaming passes of radix selection on the float bit patterns.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..io import atomic_dir
from ..errors import SafeMergeError
from .methods import block_rows, dare_keep, merge, method_params

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CODES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
DIRECT_SELECT = 1 << 24  # up to this many entries, a magnitude threshold is selected in memory


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def _read_header(path: Path) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafeMergeError(f"{path}: truncated safetensors file (no header)")
        n = struct.unpack("<Q", raw)[0]
        if n > min(size - 8, 100 << 20):
            raise SafeMergeError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise SafeMergeError(f"{path}: corrupt safetensors header") from None
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in DTYPES:
            raise SafeMergeError(f"{path}: tensor '{name}' has unsupported dtype {meta['dtype']}")
        start, end = (8 + n + o for o in meta["data_offsets"])
        if end > size:
            raise SafeMergeError(f"{path}: truncated file: tensor '{name}' ends at byte {end}, file has {size}")
        out[name] = TensorInfo(path, meta["dtype"], tuple(meta["shape"]), start, end)
    return out


class LazyCheckpoint:
    """A safetensors file or (sharded) HF folder, read one tensor at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            if (self.path / INDEX).exists():
                try:
                    weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
                except (ValueError, KeyError):
                    raise SafeMergeError(f"{self.path / INDEX}: not a valid safetensors index") from None
                files = sorted(set(weight_map.values()))
            elif (self.path / "model.safetensors").exists():
                files = ["model.safetensors"]
            else:
                raise SafeMergeError(f"{self.path}: no model.safetensors or {INDEX}")
            self.tensors: dict[str, TensorInfo] = {}
            for fname in files:
                shard = self.path / fname
                if not shard.exists():
                    raise SafeMergeError(f"{shard}: shard listed in the index is missing")
                self.tensors.update(_read_header(shard))
        elif self.path.exists():
            self.tensors = _read_header(self.path)
        else:
            raise SafeMergeError(f"{self.path}: no such file or folder")
        self.cache: dict | None = None  # set to a dict to keep what is read (one tensor's worth, then cleared)

    @property
    def config_dir(self) -> Path | None:
        return self.path if self.path.is_dir() else None

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """One tensor (or a slice of its first dimension), read from disk into fresh memory."""
        key = (name, None if rows is None else rows.indices(self.tensors[name].shape[0]))
        if self.cache is not None and key in self.cache:
            return self.cache[key]
        t = self._read(name, rows)
        if self.cache is not None:
            self.cache[key] = t
        return t

    def _read(self, name: str, rows: slice | None) -> torch.Tensor:
        info = self.tensors[name]
        dtype = DTYPES[info.dtype]
        row_bytes = (info.end - info.start) // max(1, info.shape[0]) if info.shape else 0
        start, end, shape = info.start, info.end, info.shape
        if rows is not None and info.shape:
            r0, r1, _ = rows.indices(info.shape[0])
            start, end, shape = info.start + r0 * row_bytes, info.start + r1 * row_bytes, (r1 - r0, *info.shape[1:])
        buf = bytearray(end - start)
        with open(info.file, "rb") as f:
            f.seek(start)
            if f.readinto(buf) != len(buf):
                raise SafeMergeError(f"{info.file}: truncated while reading tensor '{name}'")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def check_inputs(base: LazyCheckpoint, models: Sequence[LazyCheckpoint], max_relative_distance: float = 0.5,
                 probes: int = 4) -> None:
    """Before any work starts: same tensor names and shapes everywhere, and each model close to the base on a
    few of its smallest matrices (a fine-tune of another base is far from it); one line naming the tensor."""
    for m in models:
        missing = [n for n in base.tensors if n not in m.tensors]
        if missing:
            raise SafeMergeError(f"{m.path}: missing tensor '{missing[0]}' (present in the base {base.path})")
        extra = [n for n in m.tensors if n not in base.tensors]
        if extra:
            raise SafeMergeError(f"{m.path}: unexpected tensor '{extra[0]}' (not in the base {base.path})")
        for n, info in base.tensors.items():
            if m.tensors[n].shape != info.shape:
                raise SafeMergeError(f"{m.path}: tensor '{n}' has shape {list(m.tensors[n].shape)}, "
                                     f"the base has {list(info.shape)}")
    matrices = sorted((torch.Size(i.shape).numel(), n) for n, i in base.tensors.items()
                      if len(i.shape) == 2 and DTYPES[i.dtype].is_floating_point)
    for _, n in matrices[:probes]:
        b = base.read(n).float()
        for m in models:
            d = float((m.read(n).float() - b).norm() / b.norm().clamp_min(1e-12))
            if d > max_relative_distance:
                raise SafeMergeError(f"{m.path}: tensor '{n}' is {d:.2f} (relative L2) from the base {base.path}: "
                                     "was not fine-tuned from it")


def _finite(t: torch.Tensor, name: str, source: Path) -> torch.Tensor:
    """`t` as float32, refused if it holds NaN or inf (min and max propagate both: one fast pass, unlike
    isfinite on bf16)."""
    f = t.to(torch.float32, copy=True)  # a fresh tensor: callers work in place
    if f.numel() and not torch.isfinite(torch.stack(torch.aminmax(f))).all():
        raise SafeMergeError(f"{source}: tensor '{name}' holds NaN or inf values")
    return f


def _float_names(base: LazyCheckpoint) -> list[str]:
    return [n for n, i in base.tensors.items() if DTYPES[i.dtype].is_floating_point]


def _blocks(info: TensorInfo) -> list[tuple[int, int]]:
    """Row ranges in which a tensor is processed (whole, when small)."""
    if not info.shape:
        return [(0, 0)]
    br = block_rows(info.shape)
    return [(r, min(r + br, info.shape[0])) for r in range(0, info.shape[0], br)] or [(0, 0)]


def _read(ck: LazyCheckpoint, name: str, rows: tuple[int, int]) -> torch.Tensor:
    """A block of rows as float32 (checked finite), or as stored for non-floating tensors."""
    info = ck.tensors[name]
    t = ck.read(name, slice(*rows) if info.shape and rows != (0, info.shape[0]) else None)
    return _finite(t, name, ck.path) if t.is_floating_point() else t


def magnitude_threshold(base: LazyCheckpoint, model: LazyCheckpoint, density: float,
                        names: Sequence[str] | None = None) -> float:
    """The magnitude of the k-th largest entry (k = density * size) of the task vector model - base over
    `names` (default: every floating tensor, TIES's global trim): exact, in two streaming passes of radix
    selection on the high, then low, 16 bits of the float32 bit pattern (which orders non-negative floats),
    reading one block of rows at a time."""
    names = list(names) if names is not None else _float_names(base)

    def bit_blocks() -> Iterator[torch.Tensor]:
        for n in names:
            for rows in _blocks(base.tensors[n]):
                tv = _read(model, n, rows).sub_(_read(base, n, rows))
                yield tv.abs().flatten().view(torch.int32)

    total = sum(int(torch.Size(base.tensors[n].shape).numel()) for n in names)
    k = max(1, int(round(density * total)))
    rank = total - k  # 0-based rank of the threshold in ascending order
    if total <= DIRECT_SELECT:  # small enough to select in memory (the same exact value, faster)
        flat = torch.cat(list(bit_blocks())).view(torch.float32)
        return float(flat.kthvalue(rank + 1).values)
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for b in bit_blocks():
        hist += torch.bincount((b >> 16).long(), minlength=1 << 16)
    cum = hist.cumsum(0)
    hi = int(torch.searchsorted(cum, torch.tensor(rank), right=True))
    below = int(cum[hi - 1]) if hi > 0 else 0
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for b in bit_blocks():
        low += torch.bincount((b[(b >> 16) == hi] & 0xFFFF).long(), minlength=1 << 16)
    lo = int(torch.searchsorted(low.cumsum(0), torch.tensor(rank - below), right=True))
    return float(torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32))


def _shard_plan(base: LazyCheckpoint, names: list[str], out_dtype: dict[str, torch.dtype],
                max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = torch.Size(base.tensors[n].shape).numel() * out_dtype[n].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    return shards


def _write_header(f, names: list[str], shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for n in names:
        nbytes = torch.Size(shapes[n]).numel() * dtypes[n].itemsize
        header[n] = {"dtype": CODES[dtypes[n]], "shape": list(shapes[n]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)


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


def streaming_merge(method: str, base_path: str | Path, model_paths: Sequence[str | Path], out: str | Path,
                    params: dict | None = None, out_dtype: str | None = None, max_shard_size: str | int = "2GB",
                    weights: Sequence[float] | None = None, progress: bool = True) -> Path:
    """Merge checkpoints tensor by tensor. `weights` (mergekit's per-model weights) scale each task vector
    (task_arithmetic) or weight the disjoint mean (ties). Output dtype: each input tensor's, or `out_dtype`."""
    params = dict(params or {})
    merge(method, {"x": torch.zeros(1)}, [{"x": torch.zeros(1)}], **params)  # validates the parameters
    base = LazyCheckpoint(base_path)
    models = [LazyCheckpoint(p) for p in model_paths]
    if not models:
        raise SafeMergeError("nothing to merge: no models given")
    check_inputs(base, models)
    names = base.names()
    w = list(weights) if weights is not None else [1.0] * len(models)
    if len(w) != len(models):
        raise SafeMergeError(f"{len(w)} weights for {len(models)} models")
    if out_dtype is not None and out_dtype not in ("float32", "float16", "bfloat16"):
        raise SafeMergeError(f"bad output dtype '{out_dtype}' (float32, float16 or bfloat16)")
    dtypes = {n: DTYPES[base.tensors[n].dtype] for n in names}
    if out_dtype:
        dtypes = {n: getattr(torch, out_dtype) if d.is_floating_point else d for n, d in dtypes.items()}
    thresholds: list[float] | None = None
    density = {**method_params(method), **params}.get("density", 1.0)
    if method == "ties" and params.get("trim", "global") == "global":
        thresholds = [magnitude_threshold(base, m, density) for m in
                      tqdm(models, desc="TIES global thresholds", disable=not progress, leave=False)]
    shapes = {n: base.tensors[n].shape for n in names}
    shards = _shard_plan(base, names, dtypes, parse_size(max_shard_size))
    out = Path(out).expanduser()
    bar = tqdm(total=len(names), desc=f"merging ({method})", unit="tensor", disable=not progress)
    with atomic_dir(out) as tmp:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            with open(tmp / fname, "wb") as f:
                _write_header(f, shard, shapes, dtypes)
                for n in shard:
                    thr = thresholds
                    if method == "ties" and thresholds is None and DTYPES[base.tensors[n].dtype].is_floating_point:
                        # per-tensor trim reads each tensor twice (threshold, merge): keep it if small enough
                        small = torch.Size(shapes[n]).numel() <= DIRECT_SELECT
                        for ck in (base, *models):
                            ck.cache = {} if small else None
                        thr = [magnitude_threshold(base, m, density, [n]) for m in models]
                    for rows in _blocks(base.tensors[n]):
                        t = _merge_block(method, n, rows, base, models, params, w, thr)
                        if t.numel():
                            f.write(t.to(dtypes[n]).contiguous().reshape(-1).view(torch.uint8).numpy())
                    for ck in (base, *models):
                        ck.cache = None
                    weight_map[n] = fname
                    bar.update(1)
        if len(shards) > 1:
            total = sum(torch.Size(shapes[n]).numel() * dtypes[n].itemsize for n in names)
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if base.config_dir is not None:
            for extra in sorted(base.config_dir.iterdir()):
                if extra.is_file() and not extra.name.endswith(".safetensors") and extra.name != INDEX:
                    shutil.copy2(extra, tmp / extra.name)
    bar.close()
    return out


def _merge_block(method: str, name: str, rows: tuple[int, int], base: LazyCheckpoint,
                 models: Sequence[LazyCheckpoint], params: dict, weights: Sequence[float],
                 thresholds: Sequence[float] | None) -> torch.Tensor:
    """One block of rows of the merged tensor, by the definitions of `merging.py` (checked equal in tests).
    `weights` scale each task vector, as mergekit's per-model weights do (the disjoint means normalise by
    the weights of the agreeing entries)."""
    bf = _read(base, name, rows)
    if not bf.is_floating_point():
        return bf
    if method == "weight_average":
        acc = torch.zeros_like(bf)
        for m in models:
            acc.add_(_read(m, name, rows))
        return acc.div_(len(models))
    p = {**method_params(method), **params}
    scaling = p.get("scaling", 1.0)
    shape = base.tensors[name].shape

    def tv(i: int) -> torch.Tensor:  # the (weighted, DARE-dropped) task vector of model i, in place
        t = _read(models[i], name, rows).sub_(bf)
        if weights[i] != 1.0:
            t.mul_(weights[i])
        if method in ("dare", "dare_ties"):
            t.mul_(dare_keep(name, shape, p["density"], p["seed"], i, rows if shape else None)).div_(p["density"])
        return t

    if method in ("task_arithmetic", "dare"):
        acc = torch.zeros_like(bf)
        for i in range(len(models)):
            acc.add_(tv(i))
        return bf.add_(acc, alpha=scaling)
    tvs = [tv(i) for i in range(len(models))]
    if method == "ties":
        tvs = [tv * (tv.abs() >= w * thr) for tv, w, thr in zip(tvs, weights, thresholds)]  # type: ignore[arg-type]
    stack = torch.stack(tvs)
    agree = (stack.sign() == stack.sum(0).sign()) & (stack != 0)
    wts = torch.tensor(list(weights)).view(-1, *[1] * (stack.ndim - 1))
    return bf + scaling * (stack * agree).sum(0) / (wts * agree).sum(0).clamp_min(1e-12) \
        if any(x != 1.0 for x in weights) else bf + scaling * (stack * agree).sum(0) / agree.sum(0).clamp_min(1)
