"""Test-time adaptive merging: AdaMerging (Yang et al., 2024), task-wise and layer-wise.

theta = theta_0 + sum_i lambda_i * tau_i, with one lambda per task (task-wise) or per task and parameter
tensor (layer-wise), learned by minimising the Shannon entropy of each task head's predictions on UNLABELED
test inputs of that task (a test-time method, as in the paper). The merged forward pass is functional
(`torch.func.functional_call` over a merged parameter dict): no model copy per step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..errors import SafeMergeError
from ..model import Head, InputEncoder, as_head

StateDict = Mapping[str, torch.Tensor]


MaskSource = Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor]


class MergedEncoder:
    """An encoder whose parameters are theta_0 + sum_i lambda_i * (mask * tau_i), differentiable in lambda.

    It keeps an encoder shell whose parameters live on the meta device (a functional forward supplies them).
    `low_memory` (default): no task-vector copies (they are formed from the models when used), and when
    gradients are on each merged tensor is built under activation checkpointing, so a step's autograd graph
    holds the merged parameters, not the task vectors, masks and sums behind them (recomputed tensor by tensor
    in the backward pass). `low_memory=False` keeps float32 task vectors and the whole graph: faster steps,
    about (n_tasks + 4) parameter-sized tensors more. Both give the same numbers."""

    def __init__(self, encoder: nn.Module, base: StateDict, models: Sequence[StateDict], modality: str,
                 low_memory: bool = True):
        self.encoder = _shell(encoder)
        self.modality = modality
        self.names = [n for n, _ in self.encoder.named_parameters()]
        missing = [n for n in self.names if n not in base or any(n not in m for m in models)]
        if missing:
            raise SafeMergeError(f"merged encoder: tensor '{missing[0]}' missing from the base or a model")
        self.base = {n: base[n].float() for n in self.names}
        self.models = [{n: m[n].float() for n in self.names} for m in models]
        self.low_memory = low_memory
        self.tvs = None if low_memory else [{n: m[n] - self.base[n] for n in self.names} for m in self.models]
        self.buffers = {k: v for k, v in base.items() if k not in self.base}

    @property
    def n_tasks(self) -> int:
        return len(self.models)

    def task_vector(self, i: int, name: str) -> torch.Tensor:
        return self.tvs[i][name] if self.tvs is not None else self.models[i][name] - self.base[name]

    def params(self, lambdas: torch.Tensor, masks: MaskSource | None = None) -> dict[str, torch.Tensor]:
        """lambdas: [n_tasks] (task-wise) or [n_tasks, n_tensors] (layer-wise); masks: a tensor per parameter
        name, or a function of the name that computes it (then its graph, too, is recomputed in backward)."""
        lam = lambdas if lambdas.ndim == 2 else lambdas[:, None].expand(-1, len(self.names))
        if not (self.low_memory and torch.is_grad_enabled()):
            return {n: self._param(lam, j, n, masks) for j, n in enumerate(self.names)}
        return {n: checkpoint(self._param, lam, j, n, masks, use_reentrant=False, preserve_rng_state=False)
                for j, n in enumerate(self.names)}

    def _param(self, lam: torch.Tensor, j: int, n: str, masks: MaskSource | None) -> torch.Tensor:
        delta = sum(lam[i, j] * self.task_vector(i, n) for i in range(self.n_tasks))
        if masks is None:
            return self.base[n] + delta
        return self.base[n] + (masks(n) if callable(masks) else masks[n]) * delta

    def output(self, params: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]):
        """The encoder's output under `params` (a functional forward: gradients reach the params)."""
        return functional_call(self.encoder, {**self.buffers, **params}, args=(), kwargs=dict(inputs), strict=False)

    def logits(self, head: Head, params: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return head(self.output(params, inputs), inputs)

    def state_dict(self, params: Mapping[str, torch.Tensor], like: StateDict) -> dict[str, torch.Tensor]:
        """A plain state dict (detached, in the dtypes of `like`) of merged parameters."""
        return {k: (params[k].detach() if k in params else v).to(v.dtype).clone() for k, v in like.items()}


def _shell(encoder: nn.Module) -> nn.Module:
    """A copy of `encoder` in eval mode whose parameters are storage-less (meta device): a functional forward
    supplies every parameter, so copying their values would only cost memory. Buffers are copied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for p in encoder.parameters()}
    return copy.deepcopy(encoder, memo).eval()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax predictions."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


class BatchSampler:
    """Seeded random batches of raw inputs per task, encoded for the model."""

    def __init__(self, inputs: Sequence[torch.Tensor | list[str]], encode: InputEncoder, batch_size: int, seed: int):
        self.inputs, self.encode, self.batch_size = inputs, encode, batch_size
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.inputs[i]
        idx = torch.randint(len(x), (self.batch_size,), generator=self.g)
        return self.encode(x[idx] if isinstance(x, torch.Tensor) else [x[j] for j in idx.tolist()])


def adamerging_lambdas(merged: MergedEncoder, heads: Sequence[Head], sample: BatchSampler,
                       granularity: str = "layer", steps: int = 500, lr: float = 1e-3, init: float = 0.3,
                       clamp: bool = True, masks: Mapping[str, torch.Tensor] | None = None,
                       progress: bool = True, desc: str = "adamerging") -> torch.Tensor:
    """The AdaMerging loop on an existing `MergedEncoder` (optionally under fixed task-vector `masks`):
    Adam on the lambdas, minimising the summed per-task mean entropy of one batch per task per step."""
    if granularity not in ("task", "layer"):
        raise SafeMergeError(f"adamerging: granularity must be 'task' or 'layer', not '{granularity}'")
    shape = (merged.n_tasks,) if granularity == "task" else (merged.n_tasks, len(merged.names))
    lambdas = torch.full(shape, init, requires_grad=True)
    opt = torch.optim.Adam([lambdas], lr=lr)
    for _ in tqdm(range(steps), desc=f"{desc} ({granularity})", disable=not progress, leave=False):
        params = merged.params(lambdas, masks)
        loss = sum(entropy(merged.logits(heads[i], params, sample(i))) for i in range(merged.n_tasks))
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        if clamp:
            with torch.no_grad():
                lambdas.clamp_(0.0, 1.0)
    return lambdas.detach()


def frozen_heads(heads: Sequence[Head | nn.Linear], modality: str | None = None) -> list[Head]:
    """Frozen copies of the heads (a bare nn.Linear becomes a head over the modality's legacy pooling)."""
    return [as_head(copy.deepcopy(h), modality).eval().requires_grad_(False) for h in heads]


def check_pool(models: Sequence, heads: Sequence, inputs: Sequence, who: str) -> None:
    if not (len(models) == len(heads) == len(inputs)):
        raise SafeMergeError(f"{who}: give one head and one input set per model "
                             f"({len(models)} models, {len(heads)} heads, {len(inputs)} input sets)")
    if not models:
        raise SafeMergeError(f"{who}: nothing to merge: no models given")


def adamerging(encoder: nn.Module, base: StateDict, models: Sequence[StateDict], heads: Sequence[Head],
               inputs: Sequence[torch.Tensor | list[str]], encode: InputEncoder, granularity: str = "layer",
               steps: int = 500, lr: float = 1e-3, init: float = 0.3, batch_size: int = 16, clamp: bool = True,
               seed: int = 0, progress: bool = True,
               low_memory: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """AdaMerging: returns the merged state dict and the learned lambdas. `inputs[i]` are unlabeled inputs of
    task i (its test split, as in the paper), `heads[i]` its head. `low_memory`: see `MergedEncoder`."""
    check_pool(models, heads, inputs, "adamerging")
    merged = MergedEncoder(encoder, base, models, encode.modality, low_memory)
    sample = BatchSampler(inputs, encode, batch_size, seed)
    lambdas = adamerging_lambdas(merged, frozen_heads(heads, encode.modality), sample, granularity, steps, lr, init, clamp,
                                 progress=progress)
    with torch.no_grad():
        return merged.state_dict(merged.params(lambdas), base), lambdas
