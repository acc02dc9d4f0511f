"""Reading and writing state dicts: safetensors in and out, atomic writes, and the checks that turn bad
input into one-line errors (truncated files, NaN/inf, missing or extra tensors, shape mismatches)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import SafeMergeError

StateDict = dict[str, torch.Tensor]


def weights_file(path: str | Path) -> Path:
    """The safetensors file of `path`: the file itself, or `model.safetensors` inside a folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.exists():
        raise SafeMergeError(f"{p}: no such checkpoint file")
    return p


def load_state_dict(path: str | Path) -> StateDict:
    """Load every tensor of a safetensors file (or an HF folder's `model.safetensors`), checked."""
    p = weights_file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SafeMergeError(f"{p}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    check_finite(sd, p)
    return sd


def check_finite(sd: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Refuse NaN or inf weights, naming the first bad tensor."""
    for k, t in sd.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise SafeMergeError(f"{source}: tensor '{k}' contains NaN or inf values")


def check_same_keys(reference: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor],
                    source: str | Path, reference_name: str = "the base model") -> None:
    """Same tensor names and shapes as `reference`, else a one-line error naming the tensor."""
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


def check_same_base(base: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], source: str | Path,
                    max_relative_distance: float = 0.5) -> None:
    """A fine-tune moves each weight matrix a few percent away from its base; a model trained from another
    base is as far from it as two random networks. Refuse `sd` when the median over weight matrices of
    ||sd - base|| / ||base|| exceeds the bound (the median ignores a few heavily tuned tensors)."""
    rels = []
    for k, t in base.items():
        if t.is_floating_point() and t.ndim >= 2:
            rels.append(float((sd[k].float() - t.float()).norm() / t.float().norm().clamp_min(1e-12)))
    if not rels:
        return
    rel = sorted(rels)[len(rels) // 2]
    if rel > max_relative_distance:
        raise SafeMergeError(f"{source}: weights are {rel:.2f} (median relative L2 per matrix) away from the base "
                             f"model; this checkpoint was not fine-tuned from it (bound {max_relative_distance})")


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target`, on error it is removed,
    so a reader never sees a half-written output."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
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


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to a temporary file in the same folder, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_state_dict(sd: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save contiguous CPU tensors to safetensors, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
