"""Concrete subspace merging (Tang et al., 2023) and DAM, Defense-Aware Merging (Yang et al., ICLR 2025).

One concrete (relaxed Bernoulli) mask over the task vectors, shared by all tasks, selects the subspace the
tasks are merged in: theta = theta_0 + sum_i lambda_i * (m * tau_i). Where m ~ 0 the weight falls back to
theta_0. Concrete TA learns the mask on entropy at a fixed lambda; Concrete AdaMerging alternates an inner
lambda step with a mask step, then runs AdaMerging under the frozen mask. DAM adds, per task, a universal
input perturbation pushed away from the merged model's own predictions, and trains the mask to keep the
predictions confident under it as well (clean entropy + lambda_adv * perturbed entropy): parameters that
carry backdoor-like shortcuts get masked out. All of them are test-time methods: they adapt on UNLABELED
test inputs, as in the papers.

Cost (the issue's budget: a DAM step <= 1.5x an AdaMerging step) is kept by two readings of the reference
loop, both parameters:
- `inner="amortized"`: the inner lambda step (reset lambda to `init`, one Adam step) uses the lambda
  gradient of the previous mask step instead of its own forward/backward pass; `inner="exact"` is the
  reference's separate pass.
- `adv_batch_size` (default a quarter of the batch): only the first examples of each clean batch get a
  perturbed copy (the reference perturbs the whole batch); their clean predictions are the pseudo-labels of
  the perturbation step, whose gradient is taken from the same forward pass (inputs only, no weight
  gradients), every `perturb_every` steps.

`perturbation="reference"` runs the reference loop's perturbation instead (FusionBench's
clip_safe_concrete_adamerging): every step, a perturbation step on a whole separate batch per task (merged
weights detached; Adam at `adv_lr`; unbounded unless `perturb_bound` is given), then the mask step on another
batch with its perturbed copy. For vision the mask step feeds `clamp(x + delta, 0, 1)` of the NORMALISED pixels,
as the reference does (this clamp also corrupts every below-mean pixel); for text delta is added to the token
embeddings, unclamped. Either way `info["perturbation_effect"]` reports what the final perturbation does to the
merged model: flip rate of its predictions and entropy change, on x + delta against x.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .adamerging import BatchSampler, MergedEncoder, adamerging_lambdas, check_pool, entropy, frozen_heads
from ..errors import SafeMergeError
from ..memory import large_blocks_mapped, release_memory
from ..model import Head, InputEncoder
from ..perturb import perturbed_inputs, project, word_embedding_name

StateDict = Mapping[str, torch.Tensor]
MASK_KINDS = ("relaxed", "hard", "threshold")
PERTURBATIONS = ("amortized", "reference")
AMORTIZED_BOUND = 0.0066  # per input element: the reference's L1 bound of 1000 on a 3x224x224 input


class ConcreteMask:
    """One logit tensor per backbone parameter tensor, shared by all tasks (initialised to `init`)."""

    def __init__(self, shapes: Mapping[str, torch.Size], init: float = 0.0, temperature: float = 0.5):
        if temperature <= 0:
            raise SafeMergeError(f"concrete mask: temperature must be > 0, not {temperature}")
        self.logits = {n: torch.full(tuple(s), float(init), requires_grad=True) for n, s in shapes.items()}
        self.temperature = temperature

    def parameters(self) -> list[torch.Tensor]:
        return list(self.logits.values())

    def sample(self, generator: torch.Generator | None = None, kind: str = "relaxed",
               rescale: bool = True) -> dict[str, torch.Tensor]:
        """relaxed: m = sigmoid((log u - log(1-u) + x) / t), u ~ U(0, 1), differentiable in x; hard: a
        Bernoulli(sigmoid(x)) sample; threshold: 1 where sigmoid(x) >= 0.5. Rescaled per tensor to mean 1
        (m / mean(m)), so the mask selects a subspace without shrinking the update."""
        if kind not in MASK_KINDS:
            raise SafeMergeError(f"concrete mask: kind must be one of {', '.join(MASK_KINDS)}, not '{kind}'")
        if kind == "relaxed":
            noise = self.noise(generator)
            return {n: self.relaxed(n, noise[n], rescale) for n in self.logits}
        out = {}
        for n, x in self.logits.items():
            m = torch.bernoulli(torch.sigmoid(x.detach()), generator=generator) if kind == "hard" else (
                (x.detach() >= 0).float())
            out[n] = m / m.mean().clamp_min(1e-8) if rescale else m
        return out

    def noise(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The relaxed sample's randomness: logistic noise log u - log(1-u), u ~ U(0, 1), per tensor."""
        return {n: torch.rand(x.shape, generator=generator).clamp_(1e-6, 1 - 1e-6).logit_()
                for n, x in self.logits.items()}

    def relaxed(self, name: str, noise: torch.Tensor, rescale: bool = True) -> torch.Tensor:
        """The relaxed mask of tensor `name` under drawn `noise` (differentiable in its logits)."""
        m = torch.sigmoid((noise + self.logits[name]) / self.temperature)
        return m / m.mean().clamp_min(1e-8) if rescale else m

    def density(self) -> float:
        """Share of entries the mask keeps with probability >= 0.5."""
        kept = sum(int((x >= 0).sum()) for x in self.logits.values())
        return kept / max(1, sum(x.numel() for x in self.logits.values()))


def _head_rows(inputs: Mapping[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v[:n] for k, v in inputs.items()}


def concrete_merge(encoder: nn.Module, base: StateDict, models: Sequence[StateDict], heads: Sequence[Head],
                   inputs: Sequence[torch.Tensor | list[str]], encode: InputEncoder, *,
                   granularity: Literal["task", "layer"] = "layer", fixed_lambda: float | None = None,
                   adversarial: bool = False,
                   lambda_adv: float = 0.1, clean_weight: float = 1.0, masks: Literal["single", "two"] = "single",
                   mask_steps: int = 1000, adamerging_steps: int = 1000, lr: float = 1e-3,
                   inner: Literal["amortized", "exact"] = "amortized",
                   inner_lr: float = 1.0, adamerging_lr: float = 1e-3, init: float = 0.3, temperature: float = 0.5,
                   batch_size: int = 16, adv_batch_size: int | None = None, perturb_every: int = 4,
                   adv_lr: float = 1e-4, perturbation: Literal["amortized", "reference"] = "amortized",
                   perturb_norm: Literal["l1", "l2", "linf"] = "l1", perturb_bound: float | None = None,
                   final_mask: Literal["relaxed", "hard", "threshold"] = "relaxed",
                   effect_examples: int = 64, clamp: bool = True, seed: int = 0,
                   progress: bool = True, low_memory: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """The shared loop of Concrete TA / Concrete AdaMerging / DAM; returns (merged state dict, info).

    fixed_lambda: Concrete TA (lambda constant, no inner step, no AdaMerging stage).
    adversarial: DAM's perturbation step and perturbed entropy term (weight `lambda_adv`).
    masks: "single" (one mask on the combined loss, the reference code) or "two" (M1 trained on the clean
        term, M2 on the perturbed term, merged as M1 * M2: the paper's wording). `clean_weight=0` with
        "single" trains a mask on the perturbed term only (the ablation's "M2 only").
    perturbation: "amortized" (the shipped schedule: every `perturb_every` steps, first `adv_batch_size` rows of
        the clean batch) or "reference" (every step, a whole separate batch, the reference's clamp).
    perturb_bound: the perturbation's `perturb_norm` bound PER INPUT ELEMENT (reading: the reference's L1
        bound of 1000 on a 3x224x224 CLIP input is 0.0066 per element; scaled so it means the same at any
        input size). 0 or inf = unbounded; None = 0.0066 for "amortized", unbounded for "reference" (its code
        does not project).
    effect_examples: inputs per task on which the final perturbation's effect is measured.
    final_mask: how the mask is frozen after training: "relaxed" (one relaxed sample, the reference's
        'continuous'), "hard" (a Bernoulli sample) or "threshold" (sigmoid(x) >= 0.5).
    low_memory: no task-vector copies, merged tensors recomputed in backward (`MergedEncoder`), and large blocks
        mmap-ed in the mask loop (`memory.large_blocks_mapped`): about 1 GB less on DINOv2-S with 4 tasks, slower
        steps (BENCHMARKS.md). The numbers are the same either way.
    String choices are Literal-typed: the registry's options models (pool.py) validate them before a run.
    """
    who = "dam" if adversarial else "concrete merging"
    check_pool(models, heads, inputs, who)
    reference = adversarial and perturbation == "reference"
    if perturb_bound is None:
        perturb_bound = 0.0 if reference else AMORTIZED_BOUND
    merged = MergedEncoder(encoder, base, models, encode.modality, low_memory)
    heads = frozen_heads(heads, encode.modality)
    sample = BatchSampler(inputs, encode, batch_size, seed)
    g_mask = torch.Generator().manual_seed(seed + 1)
    shapes = {n: merged.base[n].shape for n in merged.names}
    mask_sets = [ConcreteMask(shapes, 0.0, temperature) for _ in range(2 if masks == "two" else 1)]
    mask_opt = torch.optim.Adam([p for m in mask_sets for p in m.parameters()], lr=lr, fused=True)
    T, n_t = merged.n_tasks, len(merged.names)
    lam_shape = (T,) if granularity == "task" else (T, n_t)
    lam = torch.full(lam_shape, init if fixed_lambda is None else fixed_lambda,
                     requires_grad=fixed_lambda is None)
    lam_opt = torch.optim.Adam([lam], lr=inner_lr) if fixed_lambda is None else None
    lam_grad: torch.Tensor | None = None
    n_adv = max(1, min(batch_size, adv_batch_size if adv_batch_size is not None else batch_size // 4))
    emb_name = word_embedding_name(merged.encoder) if encode.modality == "text" else None
    if adversarial:
        if encode.modality == "vision":
            shape: tuple[int, ...] = tuple(encode(inputs[0][:1])["pixel_values"].shape[1:])
        else:
            shape = (encode.max_length, merged.base[emb_name].shape[1])  # type: ignore[index]
        deltas = torch.zeros((T, *shape), requires_grad=True)
        adv_sample = BatchSampler(inputs, encode, batch_size, seed + 2)  # the reference's separate batches
        adv_opt = torch.optim.Adam([deltas], lr=adv_lr)
        bound = perturb_bound * deltas[0].numel() if perturb_norm == "l1" else perturb_bound
        bound = bound if bound > 0 else float("inf")

    def inputs_for(x: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], delta: torch.Tensor | None):
        emb = params[emb_name] if emb_name else None
        return perturbed_inputs(x, delta, encode, emb)

    def both_for(x: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], delta: torch.Tensor,
                 clamp01: bool):
        """The reference's combined batch: x, then x + delta (vision: optionally clamped to [0, 1] in
        normalised pixel space, as the reference's mask step does)."""
        if encode.modality == "vision":
            pv = x["pixel_values"]
            pert = pv + delta
            return {"pixel_values": torch.cat([pv, pert.clamp(0.0, 1.0) if clamp01 else pert])}
        both = {k: torch.cat([v, v]) for k, v in x.items()}
        n = len(x[next(iter(x))])
        rows = torch.cat([torch.zeros(n), torch.ones(n)]).view(-1, *([1] * delta.dim()))
        return inputs_for(both, params, delta.unsqueeze(0) * rows)

    n_updates = 0

    t0 = time.perf_counter()
    with large_blocks_mapped() if low_memory else nullcontext():  # each step allocates and frees large tensors
        for step in tqdm(range(mask_steps), desc=f"{who} mask ({granularity})", disable=not progress, leave=False):
            noises = [m.noise(g_mask) for m in mask_sets]  # the step's relaxed samples, computed per tensor when used
            # 1. inner lambda step: reset to init, one Adam step on the clean entropy
            if lam_opt is not None:
                if inner == "exact":
                    lam_grad = None
                    with torch.no_grad():
                        lam.fill_(init)
                    params = merged.params(lam, _relaxed(mask_sets, noises, detach=(True, True)))
                    loss = sum(entropy(merged.logits(heads[i], params, inputs_for(sample(i), params, None)))
                               for i in range(T))
                    lam_grad = torch.autograd.grad(loss, [lam])[0]
                with torch.no_grad():
                    lam.fill_(init)
                if lam_grad is not None:
                    lam.grad = lam_grad
                    lam_opt.step()
                    lam.grad = None
                    if clamp:
                        with torch.no_grad():
                            lam.clamp_(0.0, 1.0)
            lam_now = lam if (lam_opt is not None and inner == "amortized") else lam.detach()
            if reference:  # 2. the reference's perturbation step: its own batch, merged weights detached
                with torch.no_grad():
                    p_det = merged.params(lam_now.detach(), _relaxed(mask_sets, noises, detach=(True, True)))
                loss_adv = torch.zeros(())
                for i in range(T):
                    x = adv_sample(i)
                    n = len(x[next(iter(x))])
                    out = merged.logits(heads[i], p_det, both_for(x, p_det, deltas[i], clamp01=False))
                    loss_adv = loss_adv - F.cross_entropy(out[n:], out[:n].argmax(-1).detach())
                adv_opt.zero_grad()
                deltas.grad = torch.autograd.grad(loss_adv, [deltas])[0]
                adv_opt.step()
                n_updates += 1
                with torch.no_grad():
                    for i in range(T):
                        deltas[i] = project(deltas[i], perturb_norm, bound)
            # 2. + 3. the clean batch and perturbed copies of its first rows: mask loss and perturbation loss
            loss_mask: torch.Tensor = torch.zeros(())
            loss_adv: torch.Tensor = torch.zeros(())
            if masks == "single" or not adversarial:
                p_clean = p_adv = merged.params(lam_now, _relaxed(mask_sets, noises, detach=(False, False)))
            else:
                p_clean = merged.params(lam_now, _relaxed(mask_sets, noises, detach=(False, True)))
                p_adv = merged.params(lam_now, _relaxed(mask_sets, noises, detach=(True, False)))
            for i in range(T):
                x = sample(i)
                if not adversarial:
                    loss_mask = loss_mask + entropy(merged.logits(heads[i], p_clean, inputs_for(x, p_clean, None)))
                    continue
                if reference:  # 3. the reference's mask step: the whole batch and its clamped perturbed copy
                    n = len(x[next(iter(x))])
                    d = deltas[i].detach()
                    if p_clean is p_adv:
                        out = merged.logits(heads[i], p_clean, both_for(x, p_clean, d, clamp01=True))
                        clean, pert = out[:n], out[n:]
                    else:
                        clean = merged.logits(heads[i], p_clean, inputs_for(x, p_clean, None))
                        pert = merged.logits(heads[i], p_adv, both_for(x, p_adv, d, clamp01=True))[n:]
                    loss_mask = loss_mask + clean_weight * entropy(clean) + lambda_adv * entropy(pert)
                    continue
                if p_clean is p_adv:  # one forward pass over the clean batch and its perturbed rows
                    both = {k: torch.cat([v, v[:n_adv]]) for k, v in x.items()}
                    rows = torch.zeros(len(both[next(iter(both))]))
                    rows[-n_adv:] = 1.0
                    delta = deltas[i].unsqueeze(0) * rows.view(-1, *([1] * deltas[i].dim()))
                    out = merged.logits(heads[i], p_clean, inputs_for(both, p_clean, delta))
                    clean, pert = out[:-n_adv], out[-n_adv:]
                else:
                    clean = merged.logits(heads[i], p_clean, inputs_for(x, p_clean, None))
                    pert = merged.logits(heads[i], p_adv, inputs_for(_head_rows(x, n_adv), p_adv, deltas[i]))
                loss_mask = loss_mask + clean_weight * entropy(clean) + lambda_adv * entropy(pert)
                loss_adv = loss_adv - F.cross_entropy(pert, clean[:n_adv].argmax(-1).detach())
            update_delta = adversarial and not reference and step % perturb_every == 0
            if update_delta:  # perturbation: ascend the CE to the own predictions (inputs only: no weight grads)
                adv_opt.zero_grad()
                deltas.grad = torch.autograd.grad(loss_adv, [deltas], retain_graph=True)[0]
            learn = [p for m in mask_sets for p in m.parameters()]
            with_lam = lam_opt is not None and inner == "amortized"
            grads = torch.autograd.grad(loss_mask, learn + ([lam] if with_lam else []), allow_unused=True)
            for p, g in zip(learn, grads):
                p.grad = g
            if with_lam:
                lam_grad = grads[-1]
            mask_opt.step()
            mask_opt.zero_grad()
            if update_delta:
                adv_opt.step()
                n_updates += 1
                with torch.no_grad():
                    for i in range(T):
                        deltas[i] = project(deltas[i], perturb_norm, bound)
    t_mask = time.perf_counter() - t0
    # freeze the mask, then AdaMerging under it (Concrete TA keeps its fixed lambda)
    with torch.no_grad():
        frozen = _combine([m.sample(g_mask, kind=final_mask) for m in mask_sets])
    density = [m.density() for m in mask_sets]
    # the logits, their Adam state and the last step's tensors are not needed any more
    del mask_sets, mask_opt
    noises = p_clean = p_adv = params = p_det = out = clean = pert = loss_mask = loss_adv = None  # noqa: F841
    release_memory()
    t1 = time.perf_counter()
    if fixed_lambda is None and adamerging_steps > 0:
        lambdas = adamerging_lambdas(merged, heads, sample, granularity, adamerging_steps, adamerging_lr, init,
                                     clamp, masks=frozen, progress=progress, desc=f"{who} adamerging")
    else:
        lambdas = torch.full(lam_shape, init if fixed_lambda is None else fixed_lambda)
    t_am = time.perf_counter() - t1
    info = {"lambdas": lambdas, "mask_density": density,
            "seconds": {"mask": round(t_mask, 2), "adamerging": round(t_am, 2)},
            "seconds_per_step": {"mask": t_mask / max(1, mask_steps), "adamerging": t_am / max(1, adamerging_steps)}}
    with torch.no_grad():
        final = merged.params(lambdas, frozen)
        if adversarial:
            info["perturbations"] = deltas.detach()
            info["perturbation"] = perturbation
            info["perturbation_updates"] = n_updates
            info["perturbation_effect"] = _perturbation_effect(
                merged, heads, final, inputs, encode, deltas.detach(), reference, inputs_for, both_for,
                effect_examples)
        return merged.state_dict(final, base), info


@torch.no_grad()
def _perturbation_effect(merged: MergedEncoder, heads: Sequence[Head], params: Mapping[str, torch.Tensor],
                         inputs: Sequence[torch.Tensor | list[str]], encode: InputEncoder, deltas: torch.Tensor,
                         reference: bool, inputs_for, both_for, n_examples: int) -> dict:
    """What the final perturbation does to the merged model on each task's first `n_examples` inputs, fed as
    the mask step feeds them: flip rate (% of predictions that change on x + delta), mean entropy (nats) on
    x and on x + delta and its change, mean |delta| (vision: also in 0-255 pixel units). For the reference's
    vision clamp, `flip_rate_clamp_only` is the flip rate of the clamp with delta = 0."""
    per_task = []
    for i, x_raw in enumerate(inputs):
        x = encode(x_raw[:n_examples])
        n = len(x[next(iter(x))])
        d = deltas[i]
        if reference:
            out = merged.logits(heads[i], params, both_for(x, params, d, clamp01=True))
            clean, pert = out[:n], out[n:]
        else:
            clean = merged.logits(heads[i], params, inputs_for(x, params, None))
            pert = merged.logits(heads[i], params, inputs_for(x, params, d))
        row = {"flip_rate": 100.0 * float((clean.argmax(-1) != pert.argmax(-1)).float().mean()),
               "entropy_clean": float(_entropies(clean).mean()), "entropy_perturbed": float(_entropies(pert).mean())}
        row["entropy_change"] = row["entropy_perturbed"] - row["entropy_clean"]
        row["delta_mean_abs"] = float(d.abs().mean())
        if encode.modality == "vision":
            row["delta_mean_abs_255"] = float((d.abs() * encode.std[0]).mean() * 255)
            if reference:
                zero = merged.logits(heads[i], params, both_for(x, params, torch.zeros_like(d), clamp01=True))[n:]
                row["flip_rate_clamp_only"] = 100.0 * float((clean.argmax(-1) != zero.argmax(-1)).float().mean())
        per_task.append({k: round(v, 4) for k, v in row.items()})
    mean = {k: round(sum(r[k] for r in per_task) / len(per_task), 4) for k in per_task[0]}
    return {"per_task": per_task, "mean": mean}


def _entropies(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def _relaxed(mask_sets: Sequence[ConcreteMask], noises: Sequence[Mapping[str, torch.Tensor]],
             detach: tuple[bool, bool]):
    """The step's relaxed mask as a function of the tensor name (one mask, or the product of two, each factor
    optionally detached), so `MergedEncoder.params` can recompute it in the backward pass."""
    def mask(n: str) -> torch.Tensor:
        parts = []
        for m, z, d in zip(mask_sets, noises, detach):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not d):
                parts.append(m.relaxed(n, z[n]))
        return parts[0] if len(parts) == 1 else parts[0] * parts[1]
    return mask


def _combine(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One frozen mask, or the product of two."""
    if len(samples) == 1:
        return samples[0]
    a, b = samples
    return {n: a[n] * b[n] for n in a}


def concrete_task_arithmetic(encoder, base, models, heads, inputs, encode, *, scaling: float = 0.3,
                             steps: int = 2000, **kw) -> tuple[dict[str, torch.Tensor], dict]:
    """Concrete TA: the mask is trained on entropy at a fixed lambda (`scaling`), then frozen."""
    return concrete_merge(encoder, base, models, heads, inputs, encode, fixed_lambda=scaling, mask_steps=steps,
                          adamerging_steps=0, **kw)


def concrete_adamerging(encoder, base, models, heads, inputs, encode, **kw) -> tuple[dict[str, torch.Tensor], dict]:
    """Concrete AdaMerging: the DAM loop without the perturbation step and without the adversarial term."""
    kw.pop("adversarial", None)
    return concrete_merge(encoder, base, models, heads, inputs, encode, adversarial=False, **kw)


def dam(encoder, base, models, heads, inputs, encode, *, lambda_adv: float = 0.1,
        **kw) -> tuple[dict[str, torch.Tensor], dict]:
    """DAM, Defense-Aware Merging: concrete AdaMerging whose mask also keeps the merged model confident under
    a learned per-task universal perturbation (clean entropy + lambda_adv * perturbed entropy)."""
    return concrete_merge(encoder, base, models, heads, inputs, encode, adversarial=True, lambda_adv=lambda_adv,
                          **kw)
