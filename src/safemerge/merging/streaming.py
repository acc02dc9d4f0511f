"""Streaming merges of checkpoints larger than memory.

The merge methods are the in-memory ones (`methods.py` specs run by `engine.run`), over the same chunks; only
the inputs and the output differ. Inputs are `io.Checkpoint`s (a safetensors file, or an HF folder, sharded
or not): each tensor is memory-mapped a segment at a time (at most SEGMENT elements per input), so resident
memory stays at a few segments whatever the checkpoint size, and the chunks are converted to float32 straight
from the page cache. Every input is checked before any work starts (names, shapes, dtypes, complete files,
closeness to the base); NaN/inf are refused as they are met. The output is written by `io.ShardWriter` as
sharded safetensors with an index, the base's config files copied, into a temporary folder renamed at the end.

TIES with global trimming needs one magnitude threshold per task vector over the whole model: the engine's
radix selection finds it exactly in two streaming passes before the merge pass."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import get_args

import torch
from tqdm.auto import tqdm

from ..config import OutDtype
from ..errors import SafeMergeError
from ..io import INDEX, Checkpoint, ShardWriter, atomic_dir, check_inputs, parse_size
from . import registry
from .engine import Segment, grid, run
from .methods import check_model_count, check_per_model

SEGMENT = 1 << 25  # elements of one tensor mapped at a time, per input

__all__ = ["Checkpoint", "CheckpointInputs", "parse_size", "streaming_merge"]


class CheckpointInputs:
    """The engine's inputs from checkpoints on disk: a segment (whole chunks) of one tensor at a time."""

    def __init__(self, base: Checkpoint, models: Sequence[Checkpoint]):
        self.base, self.models = base, list(models)
        self.cks = [base, *self.models]
        self.n_models = len(self.models)

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.meta[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.base.meta[name].dtype

    def label(self, j: int) -> str:
        return str(self.cks[j].path)

    def segments(self, name: str) -> Iterator[Segment]:
        shape = self.shape(name)
        chunks = grid(shape) or [(0, 0)]
        start = 0
        while start < len(chunks):
            stop = start + 1
            while stop < len(chunks) and chunks[stop][1] - chunks[start][0] <= SEGMENT:
                stop += 1
            s, e = chunks[start][0], chunks[stop - 1][1]
            views = [ck.views([name]) for ck in self.cks]
            try:
                raw = [v.__enter__()[name][s:e] for v in views]
                yield Segment(s, e, raw)
                del raw
            finally:
                for v in views:
                    v.__exit__(None, None, None)
            start = stop


def streaming_merge(method: str, base_path: str | Path, model_paths: Sequence[str | Path], out: str | Path,
                    params: dict | None = None, out_dtype: str | None = None, max_shard_size: str | int = "2GB",
                    weights: Sequence[float] | None = None, progress: bool = True,
                    max_relative_distance: float = 0.5) -> Path:
    """Merge checkpoints tensor by tensor into `out` (sharded safetensors + index, the base's config copied).
    `weights` (mergekit's per-model weights) is the same as params["weight"]. Output dtype: each input
    tensor's, or `out_dtype`. Options are checked against the registry before any file is opened."""
    params = dict(params or {})
    if weights is not None:
        params["weight"] = [float(w) for w in weights]
    entry = registry.get(method, "merge")
    opts = registry.validate(method, params, "merge")
    check_model_count(method, entry.fn, len(model_paths))
    check_per_model(method, opts, len(model_paths))
    if out_dtype is not None and out_dtype not in get_args(OutDtype):
        raise SafeMergeError(f"bad output dtype '{out_dtype}' ({', '.join(get_args(OutDtype))})")
    shard_bytes = parse_size(max_shard_size)
    base = Checkpoint(base_path)
    models = [Checkpoint(p) for p in model_paths]
    check_inputs(base, models, max_relative_distance)
    inputs = CheckpointInputs(base, models)
    names = base.names()
    dtypes = {n: base.meta[n].dtype for n in names}
    if out_dtype:
        dtypes = {n: getattr(torch, out_dtype) if d.is_floating_point else d for n, d in dtypes.items()}
    out = Path(out).expanduser()
    bar = tqdm(total=len(names), desc=f"merging ({method})", unit="tensor", disable=not progress)
    try:
        with atomic_dir(out) as tmp:
            writer = ShardWriter(tmp, [(n, base.meta[n].shape, dtypes[n]) for n in names], shard_bytes)
            bar.set_postfix_str("preparing")
            state = entry.fn.prepare(inputs, opts)
            bar.set_postfix_str("")
            order = OrderedInputs(inputs, writer.plan())
            try:
                run(entry.fn, opts, order, writer, getattr(torch, out_dtype) if out_dtype else None,
                    progress=lambda _: bar.update(1), state=state)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            if base.config_dir is not None:
                for extra in sorted(base.config_dir.iterdir()):
                    if extra.is_file() and not extra.name.endswith(".safetensors") and extra.name != INDEX:
                        shutil.copyfile(extra, tmp / extra.name)
    finally:
        bar.close()  # an error then prints on its own line, below a finished bar
    return out


class OrderedInputs(CheckpointInputs):
    """The same inputs, with tensors in the writer's order."""

    def __init__(self, inner: CheckpointInputs, order: list[str]):
        super().__init__(inner.base, inner.models)
        self.order = order

    def names(self) -> list[str]:
        return list(self.order)
