"""Merging methods that need more than weights (the pool's encoder, task heads and unlabeled inputs),
under one signature and one registry, next to the data-free ones of `merging.py`:

    state, info = run_pool_method("dam", pool, lambda_adv=0.1)

Fisher and RegMean use unlabeled TRAINING inputs of each task; AdaMerging, Concrete TA/AM and DAM are
test-time methods and adapt on unlabeled TEST inputs, as in their papers."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .adamerging import adamerging
from .concrete import concrete_adamerging, concrete_merge, concrete_task_arithmetic, dam
from .datadriven import fisher_merge, regmean
from ..errors import SafeMergeError
from .methods import METHODS, merge
from ..model import Head, InputEncoder

StateDict = Mapping[str, torch.Tensor]
Result = tuple[dict[str, torch.Tensor], dict]


@dataclass
class Pool:
    """A merge problem: pre-trained encoder + fine-tuned encoder states, one head and input set per model."""

    encoder: nn.Module
    base: StateDict
    models: Sequence[StateDict]
    heads: Sequence[Head]
    test_inputs: Sequence[torch.Tensor | list[str]]
    train_inputs: Sequence[torch.Tensor | list[str]]
    encode: InputEncoder
    seed: int = 0
    progress: bool = True


POOL_METHODS: dict[str, Callable[..., Result]] = {}


def register(name: str):
    def deco(fn):
        POOL_METHODS[name] = fn
        return fn
    return deco


def _test_time(p: Pool) -> tuple:
    return p.encoder, p.base, p.models, p.heads, p.test_inputs, p.encode


@register("fisher")
def _fisher(p: Pool, n_examples: int = 64) -> Result:
    return fisher_merge(p.encoder, p.base, p.models, p.heads, p.train_inputs, p.encode, n_examples,
                        progress=p.progress), {}


@register("regmean")
def _regmean(p: Pool, alpha: float = 0.9, n_examples: int = 256) -> Result:
    return regmean(p.encoder, p.base, p.models, p.train_inputs, p.encode, alpha, n_examples, progress=p.progress), {}


@register("adamerging_task")
def _am_task(p: Pool, steps: int = 500, lr: float = 1e-3, batch_size: int = 16) -> Result:
    sd, lam = adamerging(*_test_time(p), granularity="task", steps=steps, lr=lr, batch_size=batch_size, seed=p.seed,
                         progress=p.progress)
    return sd, {"lambdas": lam}


@register("adamerging_layer")
def _am_layer(p: Pool, steps: int = 500, lr: float = 1e-3, batch_size: int = 16) -> Result:
    sd, lam = adamerging(*_test_time(p), granularity="layer", steps=steps, lr=lr, batch_size=batch_size,
                         seed=p.seed, progress=p.progress)
    return sd, {"lambdas": lam}


@register("concrete_ta")
def _concrete_ta(p: Pool, steps: int = 2000, **kw) -> Result:
    return concrete_task_arithmetic(*_test_time(p), steps=steps, seed=p.seed, progress=p.progress, **kw)


@register("concrete_am_task")
def _concrete_am_task(p: Pool, **kw) -> Result:
    return concrete_adamerging(*_test_time(p), granularity="task", seed=p.seed, progress=p.progress, **kw)


@register("concrete_am_layer")
def _concrete_am_layer(p: Pool, **kw) -> Result:
    return concrete_adamerging(*_test_time(p), granularity="layer", seed=p.seed, progress=p.progress, **kw)


@register("dam")
def _dam(p: Pool, **kw) -> Result:
    return dam(*_test_time(p), seed=p.seed, progress=p.progress, **kw)


def is_pool_method(name: str) -> bool:
    return name in POOL_METHODS


def pool_method_params(name: str) -> dict[str, object]:
    """The tunable parameters of a pool method with their defaults (the concrete loop's for Concrete/DAM)."""
    sig = inspect.signature(POOL_METHODS[name])
    out = {p.name: p.default for p in list(sig.parameters.values())[1:] if p.kind != p.VAR_KEYWORD}
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        fixed = {"encoder", "base", "models", "heads", "inputs", "encode", "seed", "progress", "adversarial",
                 "fixed_lambda", "granularity"}
        out.update({p.name: p.default for p in inspect.signature(concrete_merge).parameters.values()
                    if p.name not in fixed})
    return out


def run_pool_method(name: str, pool: Pool, **params) -> Result:
    """Any merging method by name: data-free ones (merging.METHODS) get only the weights."""
    if name in METHODS:
        return merge(name, pool.base, pool.models, **params), {}
    if name not in POOL_METHODS:
        raise SafeMergeError(f"unknown merge method '{name}' (known: {', '.join([*METHODS, *POOL_METHODS])})")
    fn = POOL_METHODS[name]
    allowed = pool_method_params(name)
    bad = [k for k in params if k not in allowed]
    if bad:
        raise SafeMergeError(f"merge method '{name}' has no parameter '{bad[0]}'")
    return fn(pool, **params)
