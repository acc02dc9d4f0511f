"""Merge protection (METHODS.md section 3): rewrite a fine-tuned encoder so that it computes exactly the same
function alone, but lies outside the basin it shares with other fine-tunes of its base, so merges break.

- MLP rearrangement: permute each block's hidden neurons (rows of W_in and b_in, columns of W_out), with the
  permutation chosen by linear assignment to be as FAR as possible from the pre-trained weights.
- Attention scaling: per dimension i, Q_i *= a_i, K_i /= a_i, V_i *= g_i, W_O[:, i] /= g_i (biases too).
- Dropout pruning (optional, before the transform): drop a share p of the fine-tuned update, rescale the
  rest by 1/(1-p), so that an attacker who re-aligns the model cannot recover the exact original weights.

The transforms act on state dicts through a `Layout`: the names of each block's Q, K, V (separate or fused),
output projection and MLP linears, for BERT-family, HF ViT, DINOv2, CLIP vision and timm-style ViTs.
`undo_protection` is the adaptive attacker: weight matching anchored on the pre-trained model, and scale
recovery from row norms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import SafeMergeError
from ..merging.engine import dare_keep

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """Module names inside one transformer block (relative to the block prefix), without '.weight'."""

    name: str
    block: str  # regex matching a block prefix, e.g. r"encoder\.layer\.\d+\."
    q: str = ""
    k: str = ""
    v: str = ""
    qkv: str = ""  # fused projection, rows [Q; K; V]
    o: str = ""
    fc_in: str = ""
    fc_out: str = ""

    def attention(self) -> list[str]:
        return [self.qkv] if self.qkv else [self.q, self.k, self.v]

    def modules(self) -> list[str]:
        return [*self.attention(), self.o, self.fc_in, self.fc_out]


LAYOUTS = [
    Layout("bert", r"(?:.*\.)?encoder\.layer\.\d+\.", q="attention.self.query", k="attention.self.key",
           v="attention.self.value", o="attention.output.dense", fc_in="intermediate.dense", fc_out="output.dense"),
    Layout("dinov2/vit", r"(?:.*\.)?(?:encoder\.layer|layers)\.\d+\.", q="attention.q_proj", k="attention.k_proj",
           v="attention.v_proj", o="attention.o_proj", fc_in="mlp.fc1", fc_out="mlp.fc2"),
    Layout("vit-legacy", r"(?:.*\.)?encoder\.layer\.\d+\.", q="attention.attention.query",
           k="attention.attention.key", v="attention.attention.value", o="attention.output.dense",
           fc_in="intermediate.dense", fc_out="output.dense"),
    Layout("dinov2-legacy", r"(?:.*\.)?encoder\.layer\.\d+\.", q="attention.attention.query",
           k="attention.attention.key", v="attention.attention.value", o="attention.output.dense",
           fc_in="mlp.fc1", fc_out="mlp.fc2"),
    Layout("clip", r"(?:.*\.)?encoder\.layers\.\d+\.", q="self_attn.q_proj", k="self_attn.k_proj",
           v="self_attn.v_proj", o="self_attn.out_proj", fc_in="mlp.fc1", fc_out="mlp.fc2"),
    Layout("timm-vit", r"(?:.*\.)?blocks\.\d+\.", qkv="attn.qkv", o="attn.proj", fc_in="mlp.fc1", fc_out="mlp.fc2"),
]


def find_blocks(sd: StateDict) -> tuple[Layout, list[str]]:
    """The layout that covers the state dict's transformer blocks, and the block prefixes in order."""
    for layout in LAYOUTS:
        pat = re.compile(f"^({layout.block}){re.escape(layout.fc_in)}\\.weight$")
        prefixes = sorted({m.group(1) for k in sd if (m := pat.match(k))},
                          key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)])
        if prefixes and all(f"{p}{mod}.weight" in sd for p in prefixes for mod in layout.modules()):
            return layout, prefixes
    sample = next((k for k in sd if k.endswith(".weight") and sd[k].ndim == 2), next(iter(sd), "<empty>"))
    raise SafeMergeError(f"unknown architecture: no attention/MLP block layout matches module '{sample.rsplit('.', 1)[0]}'"
                         f" (known layouts: {', '.join(layout.name for layout in LAYOUTS)})")


def _get(sd: StateDict, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    return sd[f"{name}.weight"], sd.get(f"{name}.bias")


def _scale_rows(sd: StateDict, name: str, rows: slice, factor: torch.Tensor) -> None:
    w, b = _get(sd, name)
    w = w.clone()
    w[rows] = w[rows] * factor[:, None].to(w.dtype)
    sd[f"{name}.weight"] = w
    if b is not None:
        b = b.clone()
        b[rows] = b[rows] * factor.to(b.dtype)
        sd[f"{name}.bias"] = b


def _qkv_rows(layout: Layout, sd: StateDict, prefix: str) -> dict[str, tuple[str, slice]]:
    """(module name, row slice) of Q, K and V in one block."""
    if layout.qkv:
        name = prefix + layout.qkv
        d = sd[f"{name}.weight"].shape[0] // 3
        return {"q": (name, slice(0, d)), "k": (name, slice(d, 2 * d)), "v": (name, slice(2 * d, 3 * d))}
    return {c: (prefix + getattr(layout, c), slice(None)) for c in ("q", "k", "v")}


def mlp_permutation(w_in: torch.Tensor, w_out: torch.Tensor, base_in: torch.Tensor, base_out: torch.Tensor,
                    far: bool = True) -> torch.Tensor:
    """perm with new neuron i = old neuron perm[i], by linear assignment on the inner products with the
    pre-trained neurons at each position: minimised (`far`, the defense) or maximised (the attacker's matching)."""
    # sim[i, j] = <base neuron i, fine-tuned neuron j>, over W_in rows and W_out columns
    sim = (base_in.double() @ w_in.double().T + base_out.double().T @ w_out.double()).numpy()
    rows, cols = linear_sum_assignment(sim, maximize=not far)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def apply_mlp_permutation(sd: StateDict, fc_in: str, fc_out: str, perm: torch.Tensor) -> None:
    sd[f"{fc_in}.weight"] = sd[f"{fc_in}.weight"][perm].clone()
    if f"{fc_in}.bias" in sd:
        sd[f"{fc_in}.bias"] = sd[f"{fc_in}.bias"][perm].clone()
    sd[f"{fc_out}.weight"] = sd[f"{fc_out}.weight"][:, perm].clone()


def dropout_prune(model: StateDict, base: StateDict, p: float, seed: int = 0) -> StateDict:
    """Drop a share `p` of every floating update theta - theta_0 at random, rescale the rest by 1/(1-p)."""
    if not 0.0 <= p < 1.0:
        raise SafeMergeError(f"dropout pruning rate must be in [0, 1), not {p}")
    out = dict(model)
    for k in sorted(model):
        v = model[k]
        if p == 0 or not v.is_floating_point():
            continue
        delta = v.float() - base[k].float()
        keep = dare_keep(k, v.shape, 1 - p, seed, 0)  # DARE's keep mask, from the merge engine
        out[k] = (base[k].float() + delta * keep / (1 - p)).to(v.dtype)
    return out


def protect_state(model: StateDict, base: StateDict, permute: bool = True, scale: bool = True,
                  scale_range: tuple[float, float] = (0.05, 20.0), dropout: float = 0.0, seed: int = 0) -> StateDict:
    """The protected copy of `model` (a fine-tune of `base`): same function, far from base's basin.

    Scaling factors are drawn log-uniformly from `scale_range` per attention dimension."""
    if set(model) != set(base):
        missing = sorted(set(base) ^ set(model))
        raise SafeMergeError(f"model and base model differ in tensor '{missing[0]}'")
    layout, prefixes = find_blocks(model)
    sd = dropout_prune(model, base, dropout, seed) if dropout > 0 else dict(model)
    g = torch.Generator().manual_seed(seed)
    lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
    for prefix in prefixes:
        if permute:
            fc_in, fc_out = prefix + layout.fc_in, prefix + layout.fc_out
            perm = mlp_permutation(sd[f"{fc_in}.weight"], sd[f"{fc_out}.weight"], base[f"{fc_in}.weight"],
                                   base[f"{fc_out}.weight"], far=True)
            apply_mlp_permutation(sd, fc_in, fc_out, perm)
        if scale:
            rows = _qkv_rows(layout, sd, prefix)
            d = sd[f"{prefix + layout.o}.weight"].shape[1]
            alpha = torch.exp(lo + (hi - lo) * torch.rand(d, generator=g, dtype=torch.float64))
            gamma = torch.exp(lo + (hi - lo) * torch.rand(d, generator=g, dtype=torch.float64))
            _scale_rows(sd, rows["q"][0], rows["q"][1], alpha)
            _scale_rows(sd, rows["k"][0], rows["k"][1], 1 / alpha)
            _scale_rows(sd, rows["v"][0], rows["v"][1], gamma)
            o = f"{prefix + layout.o}.weight"
            sd[o] = (sd[o].double() / gamma[None, :]).to(sd[o].dtype)
    return sd


def undo_protection(model: StateDict, base: StateDict) -> StateDict:
    """The adaptive attacker: re-align each MLP to the pre-trained model by weight matching (Git Re-Basin,
    anchored on theta_0) and undo the attention scaling from row norms relative to theta_0."""
    layout, prefixes = find_blocks(model)
    sd = dict(model)
    for prefix in prefixes:
        fc_in, fc_out = prefix + layout.fc_in, prefix + layout.fc_out
        perm = mlp_permutation(sd[f"{fc_in}.weight"], sd[f"{fc_out}.weight"], base[f"{fc_in}.weight"],
                               base[f"{fc_out}.weight"], far=False)
        apply_mlp_permutation(sd, fc_in, fc_out, perm)
        rows = _qkv_rows(layout, sd, prefix)

        def ratio(c: str) -> torch.Tensor:
            name, r = rows[c]
            return sd[f"{name}.weight"][r].double().norm(dim=1) / base[f"{name}.weight"][r].double().norm(dim=1)

        alpha = (ratio("q") / ratio("k")).sqrt()  # q rows grew by a, k rows shrank by a
        gamma = (ratio("v") * base[f"{prefix + layout.o}.weight"].double().norm(dim=0)
                 / sd[f"{prefix + layout.o}.weight"].double().norm(dim=0)).sqrt()
        _scale_rows(sd, rows["q"][0], rows["q"][1], 1 / alpha)
        _scale_rows(sd, rows["k"][0], rows["k"][1], alpha)
        _scale_rows(sd, rows["v"][0], rows["v"][1], 1 / gamma)
        o = f"{prefix + layout.o}.weight"
        sd[o] = (sd[o].double() * gamma[None, :]).to(sd[o].dtype)
    return sd
