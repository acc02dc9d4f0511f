"""Merging methods that weigh each model by statistics of its own data: Fisher merging (Matena & Raffel,
2022) and RegMean (Jin et al., 2023). Both use a few UNLABELED batches per task (Fisher labels them with the
model's own predictions), computed once per model; then the merge itself is closed-form."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .adamerging import check_pool
from ..errors import SafeMergeError
from ..model import Head, InputEncoder, as_head, batches

StateDict = Mapping[str, torch.Tensor]


def _encoder_with(encoder: nn.Module, state: StateDict) -> nn.Module:
    enc = copy.deepcopy(encoder).eval()
    enc.load_state_dict(dict(state), strict=False)
    return enc


def diagonal_fisher(encoder: nn.Module, state: StateDict, head: Head, x: torch.Tensor | list[str],
                    encode: InputEncoder, n_examples: int = 64) -> dict[str, torch.Tensor]:
    """Mean over examples of the squared gradient of log p(y_hat | x), y_hat the model's own prediction
    (the empirical Fisher of an unlabeled set), per encoder parameter."""
    enc = _encoder_with(encoder, state)
    head = as_head(copy.deepcopy(head), encode.modality).eval().requires_grad_(False)
    params = dict(enc.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    n = min(n_examples, len(x))
    for i in range(n):
        inputs = encode(x[i:i + 1])
        logp = head(enc(**inputs), inputs).log_softmax(-1)
        grads = torch.autograd.grad(logp[0, logp[0].argmax()], list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads):
            if g is not None:
                fisher[name] += g.detach() ** 2
    return {k: v / max(1, n) for k, v in fisher.items()}


def fisher_merge(encoder: nn.Module, base: StateDict, models: Sequence[StateDict], heads: Sequence[Head],
                 inputs: Sequence[torch.Tensor | list[str]], encode: InputEncoder, n_examples: int = 64,
                 eps: float = 1e-10, progress: bool = True) -> dict[str, torch.Tensor]:
    """theta = sum_i F_i theta_i / sum_i F_i per parameter (F_i: model i's diagonal Fisher on its task's
    inputs); where no model has Fisher mass (e.g. embedding rows of unseen tokens) the plain mean is used."""
    check_pool(models, heads, inputs, "fisher merging")
    fishers = [diagonal_fisher(encoder, m, h, x, encode, n_examples)
               for m, h, x in tqdm(list(zip(models, heads, inputs)), desc="fisher", disable=not progress, leave=False)]
    out = {k: v.clone() for k, v in base.items()}
    for k in fishers[0]:
        w = torch.stack([f[k] for f in fishers])
        theta = torch.stack([m[k].float() for m in models])
        total = w.sum(0)
        merged = (w * theta).sum(0) / total.clamp_min(eps)
        out[k] = torch.where(total > eps, merged, theta.mean(0)).to(base[k].dtype)
    return out


@torch.inference_mode()
def input_grams(encoder: nn.Module, state: StateDict, x: torch.Tensor | list[str], encode: InputEncoder,
                n_examples: int = 256, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per nn.Linear of the encoder: G = X^T X / n over the inputs it sees (text: padding tokens excluded)."""
    enc = _encoder_with(encoder, state)
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    keep: list[torch.Tensor | None] = [None]

    def hook(name: str):
        def fn(_mod, args, _out):
            a = args[0].reshape(-1, args[0].shape[-1]).float()
            if keep[0] is not None and a.shape[0] == keep[0].shape[0]:  # per-token inputs: drop padding
                a = a[keep[0]]  # (a pooler's dense layer sees one row per example: all kept)
            grams[name] = grams.get(name, 0) + a.T @ a
            counts[name] = counts.get(name, 0) + a.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in enc.named_modules() if isinstance(m, nn.Linear)]
    try:
        for b in batches(x[:n_examples], batch_size):
            inputs = encode(b)
            keep[0] = inputs["attention_mask"].flatten().bool() if "attention_mask" in inputs else None
            enc(**inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: g / max(1, counts[n]) for n, g in grams.items()}


def regmean(encoder: nn.Module, base: StateDict, models: Sequence[StateDict], inputs: Sequence[torch.Tensor | list[str]],
            encode: InputEncoder, alpha: float = 0.9, n_examples: int = 256,
            progress: bool = True) -> dict[str, torch.Tensor]:
    """RegMean: every linear layer W = (sum_i G_i)^-1 sum_i G_i W_i (G_i the Gram matrix of the layer's
    inputs on task i, off-diagonal entries scaled by `alpha`); every other tensor by simple average."""
    if not 0.0 <= alpha <= 1.0:
        raise SafeMergeError(f"regmean: alpha must be in [0, 1], not {alpha}")
    if len(models) != len(inputs) or not models:
        raise SafeMergeError(f"regmean: give one input set per model ({len(models)} models, {len(inputs)} input sets)")
    grams = [input_grams(encoder, m, x, encode, n_examples)
             for m, x in tqdm(list(zip(models, inputs)), desc="regmean grams", disable=not progress, leave=False)]
    out = {k: v.clone() for k, v in base.items()}
    for k, v in base.items():
        if v.is_floating_point():
            out[k] = torch.stack([m[k].float() for m in models]).mean(0).to(v.dtype)
    for layer in grams[0]:
        key = f"{layer}.weight"
        if key not in base:
            continue
        gs = []
        for g in grams:
            d = torch.diag(torch.diag(g[layer]))
            gs.append(alpha * g[layer] + (1 - alpha) * d)
        lhs = sum(gs)
        rhs = sum(g @ m[key].float().T for g, m in zip(gs, models))
        w = torch.linalg.lstsq(lhs.double(), rhs.double()).solution.T  # type: ignore[union-attr]
        out[key] = w.to(base[key].dtype)
    return out

