"""Data-free merging methods as small pure functions over state dicts (name -> tensor).

Every method takes the pre-trained `base` and the fine-tuned `models` (all with the same names and shapes)
and returns a merged state dict. Only floating-point tensors are merged; integer buffers come from `base`.
Task vectors are tau_i = theta_i - theta_0. Methods register themselves in `METHODS` by name."""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable, Mapping, Sequence

import torch

from ..errors import SafeMergeError

StateDict = Mapping[str, torch.Tensor]
MergeFn = Callable[..., dict[str, torch.Tensor]]
METHODS: dict[str, MergeFn] = {}


def register(name: str) -> Callable[[MergeFn], MergeFn]:
    def deco(fn: MergeFn) -> MergeFn:
        METHODS[name] = fn
        return fn
    return deco


def _float_keys(base: StateDict) -> list[str]:
    return [k for k, v in base.items() if v.is_floating_point()]


def task_vectors(base: StateDict, models: Sequence[StateDict]) -> list[dict[str, torch.Tensor]]:
    keys = _float_keys(base)
    return [{k: m[k].float() - base[k].float() for k in keys} for m in models]


def _apply(base: StateDict, delta: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in base.items()}
    for k, d in delta.items():
        out[k] = (base[k].float() + scaling * d).to(base[k].dtype)
    return out


@register("weight_average")
def weight_average(base: StateDict, models: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """theta = mean_i theta_i."""
    out = {k: v.clone() for k, v in base.items()}
    for k in _float_keys(base):
        out[k] = torch.stack([m[k].float() for m in models]).mean(0).to(base[k].dtype)
    return out


@register("task_arithmetic")
def task_arithmetic(base: StateDict, models: Sequence[StateDict], scaling: float = 0.3) -> dict[str, torch.Tensor]:
    """theta = theta_0 + lambda * sum_i tau_i (Ilharco et al., 2023)."""
    tvs = task_vectors(base, models)
    return _apply(base, {k: sum(tv[k] for tv in tvs) for k in tvs[0]}, scaling)


def _topk_mask_global(tv: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Keep the `density` share of entries with the largest magnitude over the whole task vector."""
    flat = torch.cat([v.abs().flatten() for v in tv.values()])
    k = max(1, int(round(density * flat.numel())))
    # the k-th largest magnitude = the (n - k + 1)-th smallest
    thresh = flat.kthvalue(flat.numel() - k + 1).values
    return {name: v.abs() >= thresh for name, v in tv.items()}


def _topk_mask_tensor(tv: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Keep the `density` share of each tensor's entries by magnitude (mergekit's per-tensor trim)."""
    masks = {}
    for name, v in tv.items():
        flat = v.abs().flatten()
        k = max(1, int(round(density * flat.numel())))
        masks[name] = v.abs() >= flat.kthvalue(flat.numel() - k + 1).values
    return masks


def _disjoint_mean(tvs: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """TIES sign election and disjoint mean: per entry, the sign of the summed vectors wins, and only the
    entries that agree with it (and are non-zero) are averaged."""
    merged = {}
    for k in tvs[0]:
        stack = torch.stack([tv[k] for tv in tvs])
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        merged[k] = (stack * agree).sum(0) / agree.sum(0).clamp_min(1)
    return merged


@register("ties")
def ties(base: StateDict, models: Sequence[StateDict], density: float = 0.2, scaling: float = 1.0,
         trim: str = "global") -> dict[str, torch.Tensor]:
    """TIES-Merging (Yadav et al., 2023): trim each task vector to its top-`density` entries by magnitude,
    elect signs, disjoint mean, theta = theta_0 + lambda * merged (lambda = 1 as in the paper: the disjoint mean
    is already on the scale of one task vector). `trim="global"` (the default, as in the
    paper) ranks entries over the whole vector; `trim="tensor"` ranks within each tensor, as mergekit does."""
    if trim not in ("global", "tensor"):
        raise SafeMergeError(f"ties: trim must be 'global' or 'tensor', not '{trim}'")
    mask_fn = _topk_mask_global if trim == "global" else _topk_mask_tensor
    tvs = []
    for tv in task_vectors(base, models):
        mask = mask_fn(tv, density)
        tvs.append({k: v * mask[k] for k, v in tv.items()})
    return _apply(base, _disjoint_mean(tvs), scaling)


DARE_BLOCK = 1 << 22  # elements per block of rows in which DARE's random masks are drawn


def block_rows(shape: Sequence[int]) -> int:
    """Rows per DARE block (and per streaming chunk) of a tensor of this shape."""
    row = 1
    for d in shape[1:]:
        row *= d
    return max(1, DARE_BLOCK // max(1, row))


def dare_keep(name: str, shape: Sequence[int], density: float, seed: int, index: int,
              rows: tuple[int, int] | None = None) -> torch.Tensor:
    """DARE's Bernoulli(`density`) keep-mask for tensor `name` of model `index`, drawn in blocks of rows, each
    from a generator seeded by (seed, index, name, block): any row range can be drawn alone (streaming) and
    equals the same rows of the whole mask (in memory)."""
    shape = tuple(shape)
    if not shape:
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}|{index}|{name}|0".encode()))
        return torch.rand((), generator=g) < density
    br = block_rows(shape)
    r0, r1 = rows if rows is not None else (0, shape[0])
    parts = []
    for b in range(r0 // br, -(-r1 // br)):
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}|{index}|{name}|{b}".encode()))
        block = torch.rand((min(br, shape[0] - b * br), *shape[1:]), generator=g) < density
        parts.append(block[max(r0, b * br) - b * br: min(r1, (b + 1) * br) - b * br])
    return torch.cat(parts) if parts else torch.zeros((0, *shape[1:]), dtype=torch.bool)


def _dare(tv: Mapping[str, torch.Tensor], density: float, seed: int, index: int) -> dict[str, torch.Tensor]:
    """DARE (Yu et al., 2024): keep each entry with probability `density`, rescale kept ones by 1/density."""
    return {k: v * dare_keep(k, v.shape, density, seed, index) / density for k, v in tv.items()}


@register("dare")
def dare(base: StateDict, models: Sequence[StateDict], density: float = 0.5, scaling: float = 0.3,
         seed: int = 0) -> dict[str, torch.Tensor]:
    """DARE + task arithmetic: theta = theta_0 + lambda * sum_i DARE(tau_i)."""
    tvs = [_dare(tv, density, seed, i) for i, tv in enumerate(task_vectors(base, models))]
    return _apply(base, {k: sum(tv[k] for tv in tvs) for k in tvs[0]}, scaling)


@register("dare_ties")
def dare_ties(base: StateDict, models: Sequence[StateDict], density: float = 0.5, scaling: float = 1.0,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """DARE sparsification followed by TIES sign election and disjoint mean."""
    tvs = [_dare(tv, density, seed, i) for i, tv in enumerate(task_vectors(base, models))]
    return _apply(base, _disjoint_mean(tvs), scaling)


def method_params(name: str) -> dict[str, object]:
    """The tunable parameters of a method with their defaults."""
    sig = inspect.signature(get_method(name))
    return {p.name: p.default for p in list(sig.parameters.values())[2:]}


def get_method(name: str) -> MergeFn:
    if name not in METHODS:
        raise SafeMergeError(f"unknown merge method '{name}' (known: {', '.join(METHODS)})")
    return METHODS[name]


def merge(method: str, base: StateDict, models: Sequence[StateDict], **params) -> dict[str, torch.Tensor]:
    """Merge by name, with parameters checked against the method's signature."""
    fn = get_method(method)
    allowed = method_params(method)
    bad = [k for k in params if k not in allowed]
    if bad:
        raise SafeMergeError(f"merge method '{method}' has no parameter '{bad[0]}' (parameters: {', '.join(allowed) or 'none'})")
    if not models:
        raise SafeMergeError("nothing to merge: no models given")
    return fn(base, models, **params)
