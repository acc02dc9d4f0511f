"""Merging methods that need more than weights (the pool's encoder, task heads and unlabeled inputs),
under one signature and one registry, next to the data-free ones of `merging.py`:

    state, info = run_pool_method("dam", pool, lambda_adv=0.1)

Fisher and RegMean use unlabeled TRAINING inputs of each task; AdaMerging, Concrete TA/AM and DAM are
test-time methods and adapt on unlabeled TEST inputs, as in their papers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from .adamerging import adamerging
from .concrete import concrete_adamerging, concrete_task_arithmetic, dam
from .datadriven import fisher_merge, regmean
from . import registry
from .methods import merge
from .registry import Options
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


def register(name: str, options: type[Options]):
    """Register a data-driven method fn(pool, **options) under `name` in the one registry."""
    def deco(fn):
        POOL_METHODS[name] = fn
        registry.add(name, "data_driven", options, fn)
        return fn
    return deco


# Options models: exactly the keyword options each method takes, with the defaults of the functions they call
# (tests/test_registry.py checks them against those signatures).
class FisherOptions(Options):
    n_examples: int = Field(64, ge=1)


class RegMeanOptions(Options):
    alpha: float = Field(0.9, ge=0, le=1)
    n_examples: int = Field(256, ge=1)


LOW_MEMORY = Field(True, description="recompute merged tensors in backward instead of keeping task vectors and "
                  "their graph: about 1 GB less on DINOv2-S with 4 tasks, slower steps, the same numbers")


class AdaMergingOptions(Options):
    steps: int = Field(500, ge=0)
    lr: float = 1e-3
    batch_size: int = Field(16, ge=1)
    low_memory: bool = LOW_MEMORY


class ConcreteTAOptions(Options):
    """Concrete TA: the mask trained at a fixed lambda (`scaling`); no lambda or AdaMerging stage."""

    scaling: float = 0.3
    steps: int = Field(2000, ge=0, description="mask steps")
    lr: float = 1e-3
    temperature: float = Field(0.5, gt=0)
    batch_size: int = Field(16, ge=1)
    masks: Literal["single", "two"] = "single"
    final_mask: Literal["relaxed", "hard", "threshold"] = "relaxed"
    low_memory: bool = LOW_MEMORY


class ConcreteAMOptions(Options):
    """Concrete AdaMerging: the mask loop with the inner lambda step, then AdaMerging under the frozen mask."""

    masks: Literal["single", "two"] = "single"
    mask_steps: int = Field(1000, ge=0)
    adamerging_steps: int = Field(1000, ge=0)
    lr: float = 1e-3
    inner: Literal["amortized", "exact"] = "amortized"
    inner_lr: float = 1.0
    adamerging_lr: float = 1e-3
    init: float = 0.3
    temperature: float = Field(0.5, gt=0)
    batch_size: int = Field(16, ge=1)
    final_mask: Literal["relaxed", "hard", "threshold"] = "relaxed"
    clamp: bool = True
    low_memory: bool = LOW_MEMORY


class DamOptions(ConcreteAMOptions):
    """DAM: Concrete AdaMerging whose mask is also trained under learned universal perturbations."""

    granularity: Literal["task", "layer"] = "layer"
    lambda_adv: float = 0.1
    clean_weight: float = 1.0
    adv_batch_size: Optional[int] = Field(None, ge=1)
    perturb_every: int = Field(4, ge=1)
    adv_lr: float = 1e-4
    perturbation: Literal["amortized", "reference"] = "amortized"
    perturb_norm: Literal["l1", "l2", "linf"] = "l1"
    perturb_bound: Optional[float] = Field(None, description="per input element; None: 0.0066 (amortized) or "
                                           "unbounded (reference)")
    effect_examples: int = Field(64, ge=1)


def _test_time(p: Pool) -> tuple:
    return p.encoder, p.base, p.models, p.heads, p.test_inputs, p.encode


@register("fisher", FisherOptions)
def _fisher(p: Pool, n_examples: int = 64) -> Result:
    return fisher_merge(p.encoder, p.base, p.models, p.heads, p.train_inputs, p.encode, n_examples,
                        progress=p.progress), {}


@register("regmean", RegMeanOptions)
def _regmean(p: Pool, alpha: float = 0.9, n_examples: int = 256) -> Result:
    return regmean(p.encoder, p.base, p.models, p.train_inputs, p.encode, alpha, n_examples, progress=p.progress), {}


@register("adamerging_task", AdaMergingOptions)
def _am_task(p: Pool, steps: int = 500, lr: float = 1e-3, batch_size: int = 16, low_memory: bool = True) -> Result:
    sd, lam = adamerging(*_test_time(p), granularity="task", steps=steps, lr=lr, batch_size=batch_size, seed=p.seed,
                         progress=p.progress, low_memory=low_memory)
    return sd, {"lambdas": lam}


@register("adamerging_layer", AdaMergingOptions)
def _am_layer(p: Pool, steps: int = 500, lr: float = 1e-3, batch_size: int = 16, low_memory: bool = True) -> Result:
    sd, lam = adamerging(*_test_time(p), granularity="layer", steps=steps, lr=lr, batch_size=batch_size,
                         seed=p.seed, progress=p.progress, low_memory=low_memory)
    return sd, {"lambdas": lam}


@register("concrete_ta", ConcreteTAOptions)
def _concrete_ta(p: Pool, steps: int = 2000, **kw) -> Result:
    return concrete_task_arithmetic(*_test_time(p), steps=steps, seed=p.seed, progress=p.progress, **kw)


@register("concrete_am_task", ConcreteAMOptions)
def _concrete_am_task(p: Pool, **kw) -> Result:
    return concrete_adamerging(*_test_time(p), granularity="task", seed=p.seed, progress=p.progress, **kw)


@register("concrete_am_layer", ConcreteAMOptions)
def _concrete_am_layer(p: Pool, **kw) -> Result:
    return concrete_adamerging(*_test_time(p), granularity="layer", seed=p.seed, progress=p.progress, **kw)


@register("dam", DamOptions)
def _dam(p: Pool, **kw) -> Result:
    return dam(*_test_time(p), seed=p.seed, progress=p.progress, **kw)


def is_pool_method(name: str) -> bool:
    return name in POOL_METHODS


def pool_method_params(name: str) -> dict[str, object]:
    """The options of a data-driven method with their defaults (from its options model)."""
    return registry.get(name, "data_driven").defaults()


def run_pool_method(name: str, pool: Pool, **params) -> Result:
    """Any merging method by name, options validated by the registry: data-free ones get only the weights."""
    entry = registry.get(name, ("merge", "data_driven"))
    if entry.kind == "merge":
        return merge(name, pool.base, pool.models, **params), {}
    opts = registry.validate(name, params, "data_driven")
    return entry.fn(pool, **opts.model_dump(exclude_unset=True))
