"""Data-free merge methods: each is one frozen spec composed of the engine's building blocks, registered once
with its options model. The same spec runs in memory (`merge`) and streaming from disk
(`streaming.streaming_merge`), over the same chunks, so both give identical tensors.

Task vectors are tau_i = theta_i - theta_0; per-model `weight` and `density` (a number for every model, or a
list with one per model) follow mergekit: weights scale each (sparsified) task vector before the sign election,
and `normalize` divides by the summed weights (of the agreeing models, under a sign consensus).

    merged = merge("ties", base, [sd1, sd2], density=0.2)
    merged = merge("task_arithmetic", base, [sd1, sd2], weight=[1.0, 0.5], scaling=0.4)

Adding a method: write its options model and one spec in `SPECS` below (a `TaskArithmetic` with another
sparsification/consensus, or a class with `prepare` and `merge_tensor`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal, Union

import numpy as np
import torch
from pydantic import Field, model_validator

from ..errors import SafeMergeError
from . import engine, registry
from .engine import (Cut, DictSink, Inputs, Pruner, StateDictInputs, TensorJob, dare_keep, dare_mask,
                     SLERP_DOT_THRESHOLD, SLERP_EPS, della_mask, per_model, run, select_cuts, sum_rows,
                     task_vector)
from .registry import Options

StateDict = Mapping[str, torch.Tensor]
Density = Annotated[float, Field(gt=0, le=1)]
PerModel = Union[float, list[float]]
PerModelDensity = Union[Density, list[Density]]

__all__ = ["METHODS", "SPECS", "dare_keep", "get_method", "merge", "method_params", "task_vectors", "weight_average"]


# ------------------------------------------------------------------------------------------------ options
class LinearOptions(Options):
    weight: PerModel = Field(1.0, description="per-model weight")
    normalize: bool = Field(True, description="divide by the summed weights")


class TaskArithmeticOptions(Options):
    weight: PerModel = Field(1.0, description="per-model weight of its task vector")
    scaling: float = Field(0.3, description="lambda: theta_0 + lambda * sum_i w_i tau_i")
    normalize: bool = Field(False, description="divide the sum by the summed weights")


class TiesOptions(Options):
    weight: PerModel = 1.0
    density: PerModelDensity = Field(0.2, description="share of each task vector kept (largest magnitudes)")
    scaling: float = 1.0
    normalize: bool = Field(True, description="disjoint mean (divide by the agreeing models' weights)")
    trim: Literal["global", "tensor"] = Field("global", description="rank magnitudes over the whole task vector "
                                              "(the paper) or within each tensor (mergekit)")


class DareOptions(Options):
    weight: PerModel = 1.0
    density: PerModelDensity = Field(0.5, description="keep probability of each entry")
    scaling: float = 0.3
    normalize: bool = False
    rescale: bool = Field(True, description="divide kept entries by the density")
    seed: int = 0


class DareTiesOptions(DareOptions):
    scaling: float = 1.0
    normalize: bool = True


class BreadcrumbsOptions(Options):
    weight: PerModel = 1.0
    density: PerModelDensity = Field(0.9, description="share of each tensor's task vector kept")
    gamma: float = Field(0.01, ge=0, lt=1, description="share of the largest magnitudes dropped as outliers")
    scaling: float = 0.3
    normalize: bool = False


class DellaOptions(Options):
    weight: PerModel = 1.0
    density: PerModelDensity = Field(0.5, description="mean keep probability")
    epsilon: float = Field(0.15, ge=0, description="keep probabilities span density +- epsilon by magnitude rank")
    scaling: float = 1.0
    normalize: bool = True
    rescale: bool = Field(True, description="divide kept entries by their keep probability")
    seed: int = 0

    @model_validator(mode="after")
    def _span(self) -> DellaOptions:
        for d in self.density if isinstance(self.density, list) else [self.density]:
            if d < 1 and not (0 < d - self.epsilon and d + self.epsilon < 1):
                raise ValueError(f"density +- epsilon must lie in (0, 1) (density {d}, epsilon {self.epsilon})")
        return self


class SlerpOptions(Options):
    t: float = Field(0.5, ge=0, le=1, description="0: the base model, 1: the other model")


class ModelStockOptions(Options):
    filter_wise: bool = Field(False, description="one interpolation ratio per row instead of per tensor")


# -------------------------------------------------------------------------------------------------- specs
def magnitude_k(density: float, n: int) -> int:
    """Entries kept by a magnitude trim (mergekit's count: at least one)."""
    return n if density >= 1 else max(1, int(density * n))


def breadcrumbs_ks(density: float, gamma: float, n: int) -> tuple[int, int]:
    """Breadcrumbs keeps the magnitudes ranked (descending) in [k1, k2): the top k1 are outliers."""
    if density >= 1:
        return 0, n
    target = int(density * n)
    k1 = n - max(0, n - target - int(gamma * n)) - target
    return k1, k1 + target


def global_cuts(inputs: Inputs, densities: Sequence[float]) -> dict[str, list[Cut]]:
    """TIES's global trim: per model, the cut of the k largest |tau_i| over every floating tensor (in sorted
    name order), split into one cut per tensor that carries its share of the tie quota."""
    names = sorted(n for n in inputs.names() if inputs.dtype(n).is_floating_point)
    workspace = engine.Workspace()
    jobs = [TensorJob(inputs, n, workspace) for n in names]
    total = sum(j.numel for j in jobs)
    m = inputs.n_models

    def stream(every: int = 1):
        for job in jobs:
            yield from job.tv_stream(every, lazy=True)

    whole = [c[0] for c in select_cuts(stream, [total] * m, [[magnitude_k(d, total)] for d in densities])]
    cuts = [replace(c, chunk_equal=None) for c in whole]  # the whole model's chunk counts do not apply per tensor
    out = {n: list(cuts) for n in names}
    partial = [i for i, c in enumerate(cuts) if not c.keeps_all and c.ties != c.n_equal]
    if not partial:
        return out
    # each tensor's ties, so that the quota goes to the first ones in stream order: from the counting pass's
    # per-chunk counts (model i's stream is every tensor's chunks in order), else one more pass
    known = all(whole[i].chunk_equal is not None for i in partial)
    left = {i: cuts[i].ties for i in partial}
    start = 0
    for job in jobs:
        n_chunks = len(job.grid)
        if known:
            per_chunk = {i: whole[i].chunk_equal[start: start + n_chunks] for i in partial}  # type: ignore[index]
        else:
            per_chunk = {i: None for i in partial}
            eq = dict.fromkeys(partial, 0)
            for i, a in job.tv_stream():
                if i in eq:
                    eq[i] += int((a == cuts[i].value).sum())
        start += n_chunks
        for i in partial:
            n_eq = sum(per_chunk[i]) if per_chunk[i] is not None else eq[i]
            take = min(left[i], n_eq)
            left[i] -= take
            out[job.name][i] = Cut(cuts[i].k, cuts[i].n, cuts[i].value, take, n_eq, chunk_equal=per_chunk[i])
    return out


class _NoPreparation:
    """Methods that need no whole-model pass before the tensors: everything is per tensor."""

    def prepare(self, inputs: Inputs, o: Any) -> Any:
        return None


class _Masks:
    """DARE's keep masks of a chunk, [models, numel] booleans in a buffer reused by every chunk; `none`: the
    empty masks the fused loops take when there are none."""

    def __init__(self, m: int):
        self.m, self.none, self._buf = m, np.ones((m, 0), dtype=np.bool_), np.empty(0, dtype=np.bool_)

    def __call__(self, ch: Any, seed: int, dens: list[float]) -> np.ndarray:
        if self._buf.size < self.m * ch.numel:
            self._buf = np.empty(self.m * ch.numel, dtype=np.bool_)
        masks = self._buf[: self.m * ch.numel].reshape(self.m, ch.numel)
        for i in range(self.m):
            dare_mask(seed, i, ch.job.name, ch.index, ch.numel, dens[i], out=masks[i])
        return masks


@dataclass(frozen=True)
class TaskArithmetic:
    """Generalised task arithmetic (mergekit's): theta_0 + lambda * combine_i(w_i * sparsify(tau_i)), where
    combine is a plain sum or TIES's sign consensus with the disjoint sum, optionally normalised by weights."""

    name: str
    options: type[Options]
    sparsify: Literal["none", "magnitude", "random", "breadcrumbs", "della"] = "none"
    consensus: bool = False
    min_models: int = 1
    max_models: int | None = None

    def prepare(self, inputs: Inputs, o: Any) -> Any:
        if self.sparsify == "magnitude" and o.trim == "global":
            return global_cuts(inputs, per_model(o.density, inputs.n_models, "density"))
        return None

    def _magnitude_cuts(self, job: TensorJob, dens: list[float], state: Any, tvs: torch.Tensor | None) -> list[Cut]:
        """Per model, the cut of the magnitude trim: the whole model's share (global, from `prepare`) or the
        tensor's own."""
        if state is not None:
            return state[job.name]
        n, m = job.numel, job.n_models
        stream = ((lambda every=1: job.tv_stream(every, signed=True, lazy=True)) if tvs is None
                  else job.cached_stream(tvs, signed=True))
        return [c[0] for c in select_cuts(stream, [n] * m, [[magnitude_k(d, n)] for d in dens], signed=True)]

    def _pruners(self, job: TensorJob, dens: list[float], o: Any, state: Any,
                 tvs: torch.Tensor | None) -> list | None:
        """Per model, an in-place function that zeroes what the magnitude trim (or breadcrumbs' band) drops."""
        n, m = job.numel, job.n_models
        if self.sparsify == "magnitude":
            return [lambda x, p=Pruner(c): p(x, inplace=True) for c in self._magnitude_cuts(job, dens, state, tvs)]
        if self.sparsify == "breadcrumbs":
            stream = job.tv_stream if tvs is None else job.cached_stream(tvs)
            cuts = select_cuts(stream, [n] * m, [list(breadcrumbs_ks(d, o.gamma, n)) for d in dens])

            def band(x: torch.Tensor, top: Pruner, keep: Pruner) -> None:
                outliers = top(x) if top.cut.k > 0 else None  # the k1 largest, to take back out
                keep(x, inplace=True)
                if outliers is not None:
                    x.sub_(outliers)

            return [lambda x, a=Pruner(c1), b=Pruner(c2): band(x, a, b) for c1, c2 in cuts]
        return None

    def merge_tensor(self, job: TensorJob, o: Any, state: Any) -> Iterator[torch.Tensor]:
        with job.held():  # a per-tensor trim passes over the tensor more than once
            yield from self._merge_tensor(job, o, state)

    def _merge_tensor(self, job: TensorJob, o: Any, state: Any) -> Iterator[torch.Tensor]:
        m = job.n_models
        w = per_model(o.weight, m, "weight")
        dens = per_model(getattr(o, "density", 1.0), m, "density")
        # the factor of each sparsified task vector: its weight, and DARE's 1 / density
        scale = [wi / d if self.sparsify == "random" and o.rescale and d < 1 else wi for wi, d in zip(w, dens)]
        fused = self.consensus and self.sparsify in ("none", "magnitude", "random")
        # a per-tensor trim in float32 passes over the tensor several times: hold its task vectors when they fit
        tvs = (job.task_vectors() if not fused and self.sparsify in ("magnitude", "breadcrumbs") and state is None
               and job.numel * m <= engine.CACHE_ELEMENTS and any(d < 1 for d in dens) else None)
        total_w = sum(w) if abs(sum(w)) >= 1e-8 else 1.0
        if self.consensus:
            yield from self._consensus(job, o, state, tvs, w, dens, scale, fused)
            return
        if self.sparsify in ("none", "random"):
            yield from self._weighted(job, o, dens, scale, total_w)
            return
        prune = self._pruners(job, dens, o, state, tvs)
        for ch in job.chunks():
            b = ch.base()
            x = tvs[:, ch.start: ch.stop] if tvs is not None else ch.models().sub_(b)  # task vectors
            for i in range(m if prune is not None else 0):  # the magnitude trim or breadcrumbs' band
                prune[i](x[i])
            for row, f in zip(x, scale):
                if f != 1:
                    row.mul_(f)
            acc = sum_rows(x, out=job.scratch("acc", ch.numel))
            if o.normalize:
                acc.div_(total_w)
            if o.scaling != 1:
                acc.mul_(o.scaling)
            yield acc.add_(b)

    def _weighted(self, job: TensorJob, o: Any, dens: list[float], scale: list[float],
                  total_w: float) -> Iterator[torch.Tensor]:
        """The weighted sum of the (DARE-masked) task vectors, scaled, plus the base: one fused loop over the
        stored inputs (`kernels.weighted_merge`)."""
        from .kernels import weighted_merge

        factor = np.asarray(scale, dtype=np.float32)
        divisor = np.float32(total_w if o.normalize else 1.0)
        masks = _Masks(job.n_models)
        random = self.sparsify == "random"
        for ch in job.chunks():
            xs, base = ch.stack()
            acc = job.scratch("acc", ch.numel)
            if weighted_merge(xs, base, True, ch.numel, masks(ch, o.seed, dens) if random else masks.none, random,
                              factor, divisor, np.float32(o.scaling), acc.numpy()):
                job.nonfinite = True
            yield acc

    def _consensus(self, job: TensorJob, o: Any, state: Any, tvs: torch.Tensor | None, w: list[float],
                   dens: list[float], scale: list[float], fused: bool) -> Iterator[torch.Tensor]:
        """The sparsified task vectors' sign election and disjoint mean, fused per entry (`kernels.py`). `fused`
        (no sparsification, the magnitude trim or DARE's masks): the loop reads the stored inputs and does
        everything; breadcrumbs' band and DELLA's factors are applied to float32 task vectors before it."""
        from .kernels import consensus_merge

        m = job.n_models
        thr = np.full(m, -1.0, dtype=np.float32)  # keep every entry
        left = np.zeros(m, dtype=np.int64)
        pruners = ([Pruner(c) for c in self._magnitude_cuts(job, dens, state, tvs)]
                   if self.sparsify == "magnitude" else None)
        prune = self._pruners(job, dens, o, state, tvs) if self.sparsify == "breadcrumbs" else None
        random = self.sparsify == "random"
        factor = np.asarray(scale, dtype=np.float32)
        weight = np.asarray(w, dtype=np.float32)
        dare = _Masks(m)
        for ch in job.chunks():
            if fused:
                xs, base = ch.stack()
                start = 0
            else:
                b = ch.base()
                tv = tvs[:, ch.start: ch.stop] if tvs is not None else ch.models().sub_(b)
                for i in range(m):
                    if prune is not None:
                        prune[i](tv[i])
                    elif self.sparsify == "della" and dens[i] < 1:
                        tv[i].mul_(della_mask(tv[i].view(ch.rows()), dens[i], o.epsilon, o.seed, i, job.name,
                                              ch.index, o.rescale).reshape(-1))
                xs, start = (tuple(tvs.numpy()), ch.start) if tvs is not None else (tuple(tv.numpy()), 0)
                base = b.numpy()
            if pruners is not None:
                for i, p in enumerate(pruners):
                    thr[i], left[i] = p.plan()
                counted = left > 0  # the loop shares these quotas out and gives back what is left
            masks = dare(ch, o.seed, dens) if random else dare.none
            acc = job.scratch("acc", ch.numel)
            if consensus_merge(xs, base, fused, start, ch.numel, thr, left, masks, random, factor, weight,
                               bool(o.normalize), np.float32(o.scaling), acc.numpy()):
                job.nonfinite = True
            if pruners is not None:
                for i in np.flatnonzero(counted):
                    pruners[i].used(int(left[i]))
            yield acc


@dataclass(frozen=True)
class Linear(_NoPreparation):
    """Weighted average of the models' weights (mergekit's `linear`): sum_i w_i theta_i (/ sum_i w_i)."""

    name: str
    options: type[Options] = LinearOptions
    min_models: int = 1
    max_models: int | None = None

    def merge_tensor(self, job: TensorJob, o: Any, state: Any) -> Iterator[torch.Tensor]:
        from .kernels import weighted_merge

        w = np.asarray(per_model(o.weight, job.n_models, "weight"), dtype=np.float32)
        total = np.float32(float(w.sum()) if o.normalize and abs(float(w.sum())) >= 1e-8 else 1.0)
        no_masks = np.ones((job.n_models, 0), dtype=np.bool_)
        for ch in job.chunks():
            xs, base = ch.stack()
            acc = job.scratch("acc", ch.numel)
            if weighted_merge(xs, base, False, ch.numel, no_masks, False, w, total, np.float32(1.0), acc.numpy()):
                job.nonfinite = True
            yield acc


@dataclass(frozen=True)
class Slerp(_NoPreparation):
    """Spherical interpolation, row by row, from the base (t = 0) to the one other model (t = 1)."""

    name: str
    options: type[Options] = SlerpOptions
    min_models: int = 1
    max_models: int | None = 1

    def merge_tensor(self, job: TensorJob, o: Any, state: Any) -> Iterator[torch.Tensor]:
        from .kernels import slerp_rows

        for ch in job.chunks():
            (x,), base = ch.stack()
            rows = ch.rows()[0]
            acc = job.scratch("acc", ch.numel)
            if slerp_rows(base, x, rows, ch.numel // rows, o.t, SLERP_DOT_THRESHOLD, SLERP_EPS, acc.numpy()):
                job.nonfinite = True
            yield acc


@dataclass(frozen=True)
class ModelStock(_NoPreparation):
    """Model Stock (Jang et al., 2024): theta_0 + t * (mean_i theta_i - theta_0), t = N cos / (1 + (N - 1) cos)
    from the mean pairwise cosine of the task vectors, per tensor (or per row with `filter_wise`)."""

    name: str
    options: type[Options] = ModelStockOptions
    min_models: int = 2
    max_models: int | None = None

    @staticmethod
    def ratio(dots: torch.Tensor, norms: torch.Tensor, n: int) -> torch.Tensor:
        """t from pairwise dot products [pairs, ...] and squared norms [models, ...] (mergekit's clamps)."""
        cos = []
        p = 0
        for a in range(n):
            for b in range(a + 1, n):
                prod = norms[a].sqrt() * norms[b].sqrt()
                cos.append((dots[p] / prod.clamp(min=1e-6)).clamp(-1, 1))
                p += 1
        c = torch.stack(cos).mean(0)
        den = 1 + (n - 1) * c
        singular = den.abs() < 1e-6
        return torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))

    def merge_tensor(self, job: TensorJob, o: Any, state: Any) -> Iterator[torch.Tensor]:
        n = job.n_models
        rows = o.filter_wise and len(job.shape) > 1
        if not rows:  # one ratio for the tensor: a first pass over its chunks for the cosines
            dots = torch.zeros(n * (n - 1) // 2, dtype=torch.float64)
            norms = torch.zeros(n, dtype=torch.float64)
            for ch in job.chunks():
                tvs = [ch.tv(i) for i in range(n)]
                p = 0
                for a in range(n):
                    norms[a] += float(torch.dot(tvs[a], tvs[a]))
                    for b in range(a + 1, n):
                        dots[p] += float(torch.dot(tvs[a], tvs[b]))
                        p += 1
            t_all = self.ratio(dots, norms, n).to(torch.float32)
        for ch in job.chunks():
            b = ch.base()
            if rows:
                shape = (ch.rows()[0], -1)
                tvs = [ch.tv(i).view(shape) for i in range(n)]
                norms_r = torch.stack([(x * x).sum(-1, keepdim=True) for x in tvs])
                dots_r = torch.stack([(tvs[a] * tvs[c]).sum(-1, keepdim=True) for a in range(n)
                                      for c in range(a + 1, n)])
                t = self.ratio(dots_r, norms_r, n).expand(shape[0], b.numel() // shape[0]).reshape(-1)
            else:
                t = t_all
            avg = ch.model(0)
            for i in range(1, n):
                avg.add_(ch.model(i))
            avg.div_(n)
            yield t * avg + (1 - t) * b


SPECS: list = [
    Linear("weight_average"),
    TaskArithmetic("task_arithmetic", TaskArithmeticOptions),
    TaskArithmetic("ties", TiesOptions, sparsify="magnitude", consensus=True),
    TaskArithmetic("dare", DareOptions, sparsify="random"),
    TaskArithmetic("dare_ties", DareTiesOptions, sparsify="random", consensus=True),
    TaskArithmetic("breadcrumbs", BreadcrumbsOptions, sparsify="breadcrumbs"),
    TaskArithmetic("breadcrumbs_ties", BreadcrumbsOptions, sparsify="breadcrumbs", consensus=True),
    TaskArithmetic("della", DellaOptions, sparsify="della", consensus=True),
    Slerp("slerp"),
    ModelStock("model_stock"),
]
DOCS = {
    "weight_average": "theta = sum_i w_i theta_i / sum_i w_i (mergekit: linear)",
    "task_arithmetic": "theta_0 + lambda * sum_i w_i tau_i (Ilharco et al., 2023)",
    "ties": "trim to the top-density magnitudes, elect signs, disjoint mean (Yadav et al., 2023)",
    "dare": "drop entries at random, rescale the rest, task arithmetic (Yu et al., 2024; mergekit: dare_linear)",
    "dare_ties": "DARE's random drop, then TIES's sign election and disjoint mean",
    "breadcrumbs": "drop the largest (gamma) and smallest magnitudes per tensor, task arithmetic (Davari & "
                   "Belilovsky, 2023)",
    "breadcrumbs_ties": "breadcrumbs' band, then TIES's sign election",
    "della": "drop at random with probabilities by magnitude rank, rescale, sign election (Deep et al., 2024)",
    "slerp": "spherical interpolation between the base and one model, per row",
    "model_stock": "interpolate towards the models' mean by their task vectors' angle (Jang et al., 2024)",
}
for _spec in SPECS:
    registry.add(_spec.name, "merge", _spec.options, _spec, DOCS.get(_spec.name, ""))


# -------------------------------------------------------------------------------------------- entry points
def check_model_count(name: str, spec: Any, n: int) -> None:
    if n == 0:
        raise SafeMergeError("nothing to merge: no models given")
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        want = (f"exactly {spec.min_models}" if spec.max_models == spec.min_models else
                f"at least {spec.min_models}" if spec.max_models is None else f"{spec.min_models} to {spec.max_models}")
        raise SafeMergeError(f"merge method '{name}' merges {want} model(s) besides the base, not {n}")


def check_per_model(name: str, opts: Any, n: int) -> None:
    """Per-model options given as lists must have one value per model."""
    for key in ("weight", "density"):
        value = getattr(opts, key, None)
        if isinstance(value, list) and len(value) != n:
            raise SafeMergeError(f"merge method '{name}': parameter '{key}' has {len(value)} values for {n} models")


def merge(method: str, base: StateDict, models: Sequence[StateDict], **params) -> dict[str, torch.Tensor]:
    """Merge state dicts in memory by method name, options checked against the registry."""
    entry = registry.get(method, "merge")
    opts = registry.validate(method, params, "merge")
    check_model_count(method, entry.fn, len(models))
    check_per_model(method, opts, len(models))
    from ..io import check_same_keys

    for i, m in enumerate(models):
        check_same_keys(base, m, f"model {i}")
    sink = DictSink()
    run(entry.fn, opts, StateDictInputs(base, models), sink)
    return sink.out


def get_method(name: str):
    """The in-memory merge function of a method: fn(base, models, **params)."""
    registry.get(name, "merge")
    return lambda base, models, **params: merge(name, base, models, **params)


def method_params(name: str) -> dict[str, object]:
    """The options of a method with their defaults."""
    return registry.get(name, "merge").defaults()


class _Methods(Mapping):
    """`METHODS[name](base, models, **params)`: a live view of the registered data-free methods."""

    def __getitem__(self, name: str):
        if name not in registry.names("merge"):
            raise KeyError(name)
        return get_method(name)

    def __iter__(self):
        return iter(registry.names("merge"))

    def __len__(self) -> int:
        return len(registry.names("merge"))


METHODS = _Methods()


def task_vectors(base: StateDict, models: Sequence[StateDict]) -> list[dict[str, torch.Tensor]]:
    keys = [k for k, v in base.items() if v.is_floating_point()]
    return [{k: task_vector(m[k], base[k]) for k in keys} for m in models]


def weight_average(base: StateDict, models: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """theta = mean_i theta_i."""
    return merge("weight_average", base, models)
