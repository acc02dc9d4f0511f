"""Post-hoc backdoor defenses applied to a MERGED multi-task encoder: the baselines of the DAM paper
(METHODS.md 2.3). Each gets the merged encoder state dict, the pre-trained one, every task's frozen head and a
small clean labeled split per task (about 5% of its training data), and returns a purified encoder state dict
(same keys and dtypes). Losses are summed over tasks: each task's batch goes through the shared encoder
and its own head.

- `awm`: Adversarial Weight Masking (Chai & Chen, 2022): a soft mask in [0, 1] on the merge's update
  theta_merged - theta_0, trained against one universal input perturbation per task.
- `sau`: Shared Adversarial Unlearning (Wei et al., 2023): PGD finds adversarial examples that the current
  model and the frozen merged reference misclassify alike; the encoder is fine-tuned to unlearn them.
- `anp`: Adversarial Neuron Pruning (Wu & Wang, 2021): neuron masks trained under adversarial multiplicative
  neuron noise; neurons whose mask falls below a threshold are pruned.

Perturbations live where the input lives (`perturb.py`): normalized pixels for vision, the word-embedding
output for text. Their sizes are given in "input units": normalized pixels for vision (or raw [0, 1] pixels
where the reference implementation works in those) and the RMS of the word-embedding entries for text, so one
number means a comparable perturbation in both modalities. The forward pass is functional
(`torch.func.functional_call` over a parameter dict), as in `adaptive.py`."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from pydantic import Field

from ..merging import registry
from ..merging.adamerging import entropy
from ..merging.registry import Options
from ..errors import SafeMergeError
from ..model import Head, InputEncoder, as_head
from ..perturb import perturbed_inputs, pixel_range, project, word_embedding_name, zero_perturbation
from ..data import Split

StateDict = Mapping[str, torch.Tensor]
Params = dict[str, torch.Tensor]
DefenseFn = Callable[..., dict[str, torch.Tensor]]
DEFENSES: dict[str, DefenseFn] = {}
# the DAM reference perturbs CLIP ViT-B/32 inputs (3 x 224 x 224); its L1 bound of 1000 is for that size
_REFERENCE_INPUT_NUMEL = 3 * 224 * 224


def register(name: str, options: type[Options]) -> Callable[[DefenseFn], DefenseFn]:
    """Register a defense in the one registry, with its options model."""
    def deco(fn: DefenseFn) -> DefenseFn:
        DEFENSES[name] = fn
        registry.add(name, "defense", options, fn)
        return fn
    return deco


# Options models: each defense's keyword options with its signature's defaults (checked in tests).
class AwmOptions(Options):
    steps: int = Field(10, ge=0)
    batch_size: int = Field(16, ge=1)
    mask_lr: float = 0.05
    delta_lr: float = 10.0
    delta_steps: int = Field(1, ge=0)
    bound: Optional[float] = None
    labeled: bool = True
    clean_weight: Optional[float] = None
    adv_weight: Optional[float] = None
    l1: float = 1e-8
    granularity: Literal["entry", "row"] = "entry"


class SauOptions(Options):
    steps: int = Field(2, ge=0)
    batch_size: int = Field(16, ge=1)
    lr: float = 1e-4
    eps: float = 0.2
    pgd_steps: int = Field(5, ge=0)
    pgd_step_size: float = 0.2
    beta1: float = 0.01
    beta2: float = 1.0
    lmd1: float = 1.0
    lmd2: float = 0.0
    lmd3: float = 1.0
    reference: Literal["merged", "base"] = "merged"
    pixel_units: bool = True


class AnpOptions(Options):
    steps: int = Field(10, ge=0)
    batch_size: int = Field(16, ge=1)
    eps: float = 0.4
    noise_steps: int = Field(1, ge=1)
    alpha: float = 0.2
    lr: float = 0.2
    momentum: float = 0.9
    threshold: float = 0.2
    neurons: Literal["mlp", "attn", "mlp+attn"] = "mlp+attn"


class _Net:
    """The encoder as a function of a parameter dict, with the tasks' frozen heads."""

    def __init__(self, encoder: nn.Module, base: StateDict, merged: StateDict, heads: Sequence[Head],
                 data: Sequence[Split], encode: InputEncoder, who: str):
        if not heads or len(heads) != len(data):
            raise SafeMergeError(f"{who}: give one head and one clean split per task ({len(heads)} heads, "
                                 f"{len(data)} splits)")
        if any(len(d) == 0 for d in data):
            raise SafeMergeError(f"{who}: a task's clean split is empty")
        self.encoder = copy.deepcopy(encoder).eval().requires_grad_(False)
        self.names = [n for n, _ in self.encoder.named_parameters()]
        missing = [n for n in self.names if n not in base or n not in merged]
        if missing:
            raise SafeMergeError(f"{who}: tensor '{missing[0]}' missing from the base or merged state dict")
        self.merged = {n: merged[n].detach().float() for n in self.names}
        self.base = {n: base[n].detach().float() for n in self.names}
        self.buffers = {k: v for k, v in merged.items() if k not in self.merged}
        self.like = merged
        self.heads = [as_head(copy.deepcopy(h), encode.modality).float().eval().requires_grad_(False) for h in heads]
        self.encode = encode
        self.modality = encode.modality
        self.emb_name = word_embedding_name(self.encoder) if self.modality == "text" else None
        self.unit = 1.0 if self.emb_name is None else float(self.base[self.emb_name].pow(2).mean().sqrt())

    @property
    def n_tasks(self) -> int:
        return len(self.heads)

    def logits(self, params: Mapping[str, torch.Tensor], i: int, inputs: Mapping[str, torch.Tensor],
               delta: torch.Tensor | None = None) -> torch.Tensor:
        """Task i's logits; `delta` is added where the input lives: universal ([3, R, R] or [L, hidden]) or
        per example ([B, 3, R, R] or [B, L, hidden])."""
        if delta is not None:
            inputs = self.perturbed(params, inputs, delta)
        out = functional_call(self.encoder, {**self.buffers, **params}, args=(), kwargs=dict(inputs),
                              strict=False)
        return self.heads[i](out, inputs)

    def perturbed(self, params: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor],
                  delta: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = params[self.emb_name] if self.emb_name else None
        if self.modality == "vision" or delta.ndim == 2:
            return perturbed_inputs(inputs, delta, self.encode, emb)
        # per-example text perturbation [B, L, hidden] on non-padding positions
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        x = F.embedding(ids, emb)  # type: ignore[arg-type]
        x = x + delta[:, :ids.shape[1]] * mask.unsqueeze(-1).to(delta.dtype)
        return {"inputs_embeds": x, "attention_mask": mask}

    def state_dict(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A plain state dict in the keys and dtypes of `merged`."""
        return {k: (params[k].detach() if k in params else v).to(v.dtype).clone()
                for k, v in self.like.items()}


class _Batches:
    """Seeded random batches (without replacement within a batch) of each task's clean split, encoded."""

    def __init__(self, net: _Net, data: Sequence[Split], batch_size: int, seed: int):
        if batch_size < 1:
            raise SafeMergeError(f"batch_size must be at least 1, not {batch_size}")
        self.net, self.data, self.batch_size = net, data, batch_size
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        d = self.data[i]
        idx = torch.randperm(len(d), generator=self.g)[: self.batch_size]
        b = d.subset(idx)
        return self.net.encode(b.x), b.y


def _resolution(data: Sequence[Split]) -> int:
    x = data[0].x
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise SafeMergeError("vision data must be image tensors [N, 3, R, R]")
    return int(x.shape[-1])


# ---------------------------------------------------------------------------------------------------- AWM
@register("awm", AwmOptions)
def awm(encoder: nn.Module, base: StateDict, merged: StateDict, heads: Sequence[Head],
        data: Sequence[Split], encode: InputEncoder, *, seed: int = 0, progress: bool = True, steps: int = 10,
        batch_size: int = 16, mask_lr: float = 0.05, delta_lr: float = 10.0, delta_steps: int = 1,
        bound: float | None = None, labeled: bool = True, clean_weight: float | None = None,
        adv_weight: float | None = None, l1: float = 1e-8,
        granularity: Literal["entry", "row"] = "entry") -> dict[str, torch.Tensor]:
    """Adversarial Weight Masking on a merged model: theta = theta_merged - (1 - m) * (theta_merged - theta_0)
    with a soft mask m in [0, 1] (init 1 = the merged model; m = 0 falls back to the pre-trained weight).
    Each step alternates (a) `delta_steps` SGD steps (lr `delta_lr`) on one universal perturbation per task,
    maximising CE to the masked model's own predictions, then L1 projection onto `bound`, and (b) one Adam
    step (lr `mask_lr`) on the mask for `clean_weight * CE(x, y) + adv_weight * CE(x + delta, y)` (labeled,
    default 0.9 / 0.1) or `H(x) + adv_weight * H(x + delta)` (`labeled=False`, default 1 / 0.01), plus
    `l1 * sum|m|` (AWM's sparsity term, 1e-8), then clipping to [0, 1].

    reading: `granularity="entry"` masks every entry of the update (AWM masks every weight); "row" masks whole
    output rows (first dimension). `bound` is absolute, in the perturbation's own space; None scales the
    reference's L1 bound of 1000 on 3x224x224 CLIP inputs to our input size (0.0066 per entry, in input units:
    normalized pixels, or the word-embedding RMS for text). For text the SGD step is scaled by unit^2, the
    step that moves the same distance relative to the input scale. The perturbations persist across steps
    (AWM re-fits one per epoch of its loader; our budget is a few steps). `mask_lr` (open in METHODS) is
    0.05 so a mask entry can travel half-way to 0 within the default 10 steps; steps=10 costs about a
    minute on the real quick-profile models on 2 CPU cores (batch 16 x 6 tasks)."""
    net = _Net(encoder, base, merged, heads, data, encode, "awm")
    cw = clean_weight if clean_weight is not None else (0.9 if labeled else 1.0)
    aw = adv_weight if adv_weight is not None else (0.1 if labeled else 0.01)
    torch.manual_seed(seed)
    tau = {n: net.merged[n] - net.base[n] for n in net.names}

    def mask_shape(t: torch.Tensor) -> tuple[int, ...]:
        return tuple(t.shape) if granularity == "entry" or t.ndim < 2 else (t.shape[0],) + (1,) * (t.ndim - 1)

    masks = {n: torch.ones(mask_shape(t), requires_grad=True) for n, t in tau.items()}
    opt = torch.optim.Adam(list(masks.values()), lr=mask_lr)
    res = _resolution(data) if net.modality == "vision" else None
    deltas = [zero_perturbation(encode, net.encoder, res) for _ in range(net.n_tasks)]
    if bound is None:
        bound = 1000.0 * deltas[0].numel() / _REFERENCE_INPUT_NUMEL * net.unit
    step = delta_lr * net.unit ** 2
    batches = _Batches(net, data, batch_size, seed)

    def params() -> Params:
        return {n: net.merged[n] - (1 - masks[n]) * tau[n] for n in net.names}

    for _ in tqdm(range(steps), desc="awm", disable=not progress, leave=False):
        with torch.no_grad():
            frozen = params()
        for i in range(net.n_tasks):  # (a) universal perturbations against the current masked model
            x, _ = batches(i)
            with torch.no_grad():
                pseudo = net.logits(frozen, i, x).argmax(-1)
            for _ in range(delta_steps):
                d = deltas[i].clone().requires_grad_(True)
                (g,) = torch.autograd.grad(F.cross_entropy(net.logits(frozen, i, x, d), pseudo), d)
                deltas[i] = project(deltas[i] + step * g, "l1", bound)
        p = params()  # (b) the mask
        loss = l1 * sum(m.abs().sum() for m in masks.values())
        for i in range(net.n_tasks):
            x, y = batches(i)
            clean, adv = net.logits(p, i, x), net.logits(p, i, x, deltas[i])
            if labeled:
                loss = loss + cw * F.cross_entropy(clean, y) + aw * F.cross_entropy(adv, y)
            else:
                loss = loss + cw * entropy(clean) + aw * entropy(adv)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for m in masks.values():
                m.clamp_(0.0, 1.0)
    with torch.no_grad():
        return net.state_dict(params())


# ---------------------------------------------------------------------------------------------------- SAU
def _js(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-example Jensen-Shannon divergence of two softmax distributions (SAU's clamped form)."""
    p, q = p_logits.softmax(-1).clamp_min(1e-8), q_logits.softmax(-1).clamp_min(1e-8)
    mix = 0.5 * (p + q)
    return (0.5 * (p * p.log() + q * q.log()) - 0.5 * (p * mix.log() + q * mix.log())).sum(-1)


@register("sau", SauOptions)
def sau(encoder: nn.Module, base: StateDict, merged: StateDict, heads: Sequence[Head],
        data: Sequence[Split], encode: InputEncoder, *, seed: int = 0, progress: bool = True, steps: int = 2,
        batch_size: int = 16, lr: float = 1e-4, eps: float = 0.2, pgd_steps: int = 5,
        pgd_step_size: float = 0.2, beta1: float = 0.01, beta2: float = 1.0, lmd1: float = 1.0,
        lmd2: float = 0.0, lmd3: float = 1.0, reference: Literal["merged", "base"] = "merged",
        pixel_units: bool = True) -> dict[str, torch.Tensor]:
    """Shared Adversarial Unlearning on a merged model. Per step and task: PGD (L-inf `eps`, `pgd_steps` sign
    steps of `pgd_step_size`, started at +eps like the reference code's 'max' init) minimises
    `beta1 * L_adv + beta2 * JS`, where L_adv = -CE(., y) on examples whose prediction has not flipped yet
    (model and reference, averaged) and JS = the Jensen-Shannon divergence between the model's and the
    reference's predictions on examples not yet 'shared' (both flipped, to the same label): adversarial
    examples the two misclassify alike. The encoder (every parameter; heads frozen) then takes one Adam step
    (lr `lr`) on `lmd1 * CE(x, y) + lmd2 * CE(x_adv, y) + lmd3 * L_sar`, L_sar = -log(1 - p_model(y_ref |
    x_adv)) on the examples the reference gets wrong on x_adv (with a changed prediction), as in the
    reference code. Tasks' losses are summed into that one step.

    reading: the reference is the frozen merged model (`reference="merged"`; SAU's reference is the
    backdoored model being purified); "base" uses the pre-trained encoder. The reference code adds the
    perturbation to de-normalised [0, 1] images, so with `pixel_units=True` (default) `eps` and the step are
    raw-pixel sizes (divided by the channel std in normalized space); False: normalized units. For text they
    are in units of the word-embedding RMS, per entry of each token's embedding. One step costs about 13
    forward/backward passes per task, so the default steps=2 (two batches of 16 per task; the paper runs
    epochs over its 5% of clean data) stays near a minute on the real quick-profile models on 2 CPU cores."""
    net = _Net(encoder, base, merged, heads, data, encode, "sau")
    torch.manual_seed(seed)
    params = {n: t.clone().requires_grad_(True) for n, t in net.merged.items()}
    ref = net.merged if reference == "merged" else net.base
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    if net.modality == "vision":
        scale: torch.Tensor | float = (1.0 / encode.std) if pixel_units else 1.0
    else:
        scale = net.unit
    bound, step = eps * scale, pgd_step_size * scale
    batches = _Batches(net, data, batch_size, seed)

    def clip(d: torch.Tensor) -> torch.Tensor:
        if isinstance(bound, torch.Tensor):
            return torch.maximum(torch.minimum(d, bound), -bound)
        return d.clamp(-bound, bound)

    for _ in tqdm(range(steps), desc="sau", disable=not progress, leave=False):
        opt.zero_grad()
        for i in range(net.n_tasks):
            x, y = batches(i)
            with torch.no_grad():
                frozen = {n: p.detach() for n, p in params.items()}
                ori = net.logits(frozen, i, x).argmax(-1)
                ori_ref = net.logits(ref, i, x).argmax(-1)
            if net.modality == "vision":
                shape = x["pixel_values"].shape
            else:
                shape = (*x["input_ids"].shape, net.merged[net.emb_name].shape[1])  # type: ignore[index]
            delta = clip(torch.ones(shape) * bound)
            for _ in range(pgd_steps):  # shared adversarial examples
                d = delta.clone().requires_grad_(True)
                out, out_ref = net.logits(frozen, i, x, d), net.logits(ref, i, x, d)
                lab, lab_ref = out.argmax(-1), out_ref.argmax(-1)
                ok, ok_ref = lab == ori, lab_ref == ori_ref  # attacks that have not succeeded yet
                shared = ~ok & ~ok_ref & (lab == lab_ref)
                ce = F.cross_entropy(out, y, reduction="none")
                ce_ref = F.cross_entropy(out_ref, y, reduction="none")
                l_adv = -((ce * ok).sum() + (ce_ref * ok_ref).sum()) / 2 / len(y)
                l_js = (_js(out, out_ref) * ~shared).sum() / len(y)
                (g,) = torch.autograd.grad(beta1 * l_adv + beta2 * l_js, d)
                delta = clip(delta - step * g.sign())
                if bool(shared.all()):
                    break
            clean, adv = net.logits(params, i, x), net.logits(params, i, x, delta)
            with torch.no_grad():
                adv_ref = net.logits(ref, i, x, delta).argmax(-1)
            poison = (adv_ref != y) & (adv_ref != ori_ref)
            loss = lmd1 * F.cross_entropy(clean, y) + lmd2 * F.cross_entropy(adv, y)
            if bool(poison.any()):
                prob = adv.softmax(-1)
                pos = prob.gather(1, adv_ref[:, None]).squeeze(1)[poison]
                neg = 1 - pos  # the reference code averages two numerically different forms of -log(1 - pos)
                sar = -(torch.log(1e-6 + neg.clamp(max=0.999)).sum()
                        + torch.log(1 + 1e-6 - pos.clamp(min=0.001)).sum()) / 2
                loss = loss + lmd3 * sar / len(y)
            loss.backward()
        opt.step()
    with torch.no_grad():
        return net.state_dict(params)


# ---------------------------------------------------------------------------------------------------- ANP
_MLP_IN = re.compile(r"(intermediate\.dense|mlp\.fc1|ffn\.lin1)\.weight$")
_ATTN_OUT = re.compile(r"(attention\.output\.dense|attention\.o_proj|self_attn\.out_proj|attention\.out_lin)"
                       r"\.weight$")


def anp_neurons(names: Sequence[str], which: str = "mlp+attn") -> list[str]:
    """The weight tensors whose output units ANP masks: the first linear layer of each MLP block
    (`intermediate.dense`, `mlp.fc1`) and/or each attention output projection (`attention.output.dense`,
    `o_proj`, `out_proj`)."""
    pats = {"mlp": [_MLP_IN], "attn": [_ATTN_OUT], "mlp+attn": [_MLP_IN, _ATTN_OUT]}
    if which not in pats:
        raise SafeMergeError(f"anp: neurons must be one of {', '.join(pats)}, not '{which}'")
    return [n for n in names if any(p.search(n) for p in pats[which])]


@register("anp", AnpOptions)
def anp(encoder: nn.Module, base: StateDict, merged: StateDict, heads: Sequence[Head],
        data: Sequence[Split], encode: InputEncoder, *, seed: int = 0, progress: bool = True, steps: int = 10,
        batch_size: int = 16, eps: float = 0.4, noise_steps: int = 1, alpha: float = 0.2, lr: float = 0.2,
        momentum: float = 0.9, threshold: float = 0.2, neurons: str = "mlp+attn") -> dict[str, torch.Tensor]:
    """Adversarial Neuron Pruning on a merged model. A neuron is one output unit of the selected linear layers
    (`neurons`: the MLP's first layer and the attention output projection, by default both): its weight row
    is scaled by (m + delta) and its bias by (1 + xi). Per step: delta, xi ~ U(-eps, eps), then
    `noise_steps` sign steps of eps / noise_steps that maximise the summed task CE (kept in [-eps, eps]);
    then one SGD step (lr `lr`, `momentum`) on the masks m for `alpha * L_nat + (1 - alpha) * L_rob` (L_nat:
    masks only; L_rob: masks + noise), m clipped to [0, 1]. Finally each neuron with m < `threshold` is
    pruned: its weight row is zeroed (the bias stays, as ANP zeroes the masked BatchNorm weight); all other
    weights keep their merged values.

    reading: transformers have no BatchNorm, so the masked units are linear output units. The paper runs
    2000 iterations; one step here costs 3 forward/backward passes per task, so the default steps=10 stays
    near a minute on the real quick-profile models on 2 CPU cores."""
    net = _Net(encoder, base, merged, heads, data, encode, "anp")
    layers = anp_neurons(net.names, neurons)
    if not layers:
        raise SafeMergeError(f"anp: no '{neurons}' layers found in {type(encoder).__name__}")
    biases = {w: w[: -len("weight")] + "bias" for w in layers}
    g = torch.Generator().manual_seed(seed)
    masks = {w: torch.ones(net.merged[w].shape[0], requires_grad=True) for w in layers}
    opt = torch.optim.SGD(list(masks.values()), lr=lr, momentum=momentum)
    batches = _Batches(net, data, batch_size, seed)

    def params(coef_w: Mapping[str, torch.Tensor], coef_b: Mapping[str, torch.Tensor] | None) -> Params:
        p = dict(net.merged)
        for w in layers:
            p[w] = net.merged[w] * coef_w[w][:, None]
            b = biases[w]
            if coef_b is not None and b in p:
                p[b] = net.merged[b] * coef_b[w]
        return p

    def loss_of(p: Params, xs: Sequence[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        return sum(F.cross_entropy(net.logits(p, i, x), y)  # type: ignore[return-value]
                   for i, (x, y) in enumerate(xs))

    for _ in tqdm(range(steps), desc="anp", disable=not progress, leave=False):
        xs = [batches(i) for i in range(net.n_tasks)]
        noise = {w: (torch.rand(m.shape, generator=g) * 2 - 1) * eps for w, m in masks.items()}
        noise_b = {w: (torch.rand(m.shape, generator=g) * 2 - 1) * eps for w, m in masks.items()}
        if eps > 0:
            for _ in range(noise_steps):  # adversarial neuron perturbation
                nw = {w: v.clone().requires_grad_(True) for w, v in noise.items()}
                nb = {w: v.clone().requires_grad_(True) for w, v in noise_b.items()}
                p = params({w: masks[w].detach() + nw[w] for w in layers}, {w: 1 + nb[w] for w in layers})
                grads = torch.autograd.grad(loss_of(p, xs), list(nw.values()) + list(nb.values()))
                for w, gw, gb in zip(layers, grads[: len(layers)], grads[len(layers):]):
                    noise[w] = (noise[w] + eps / noise_steps * gw.sign()).clamp(-eps, eps)
                    noise_b[w] = (noise_b[w] + eps / noise_steps * gb.sign()).clamp(-eps, eps)
        loss = alpha * loss_of(params(masks, None), xs)
        if eps > 0:
            loss = loss + (1 - alpha) * loss_of(params({w: masks[w] + noise[w] for w in layers},
                                                       {w: 1 + noise_b[w] for w in layers}), xs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for m in masks.values():
                m.clamp_(0.0, 1.0)
    out = dict(net.merged)
    with torch.no_grad():
        for w in layers:
            pruned = masks[w] < threshold
            if bool(pruned.any()):
                out[w] = net.merged[w].clone()
                out[w][pruned] = 0.0
        return net.state_dict(out)


def anp_pruned(merged: StateDict, defended: StateDict, neurons: str = "mlp+attn") -> int:
    """How many neurons ANP pruned: rows that are zero in `defended` but not in `merged`."""
    n = 0
    for w in anp_neurons(list(merged), neurons):
        n += int(((defended[w] == 0).all(1) & (merged[w] != 0).any(1)).sum())
    return n


# ---------------------------------------------------------------------------------------------------- entry
def get_defense(name: str) -> DefenseFn:
    return registry.get(name, "defense").fn


def defense_params(name: str) -> dict[str, object]:
    """The options of a defense with their defaults (from its options model)."""
    return registry.get(name, "defense").defaults()


def defend(name: str, encoder: nn.Module, base: StateDict, merged: StateDict, heads: Sequence[Head],
           data: Sequence[Split], encode: InputEncoder, *, seed: int = 0, progress: bool = True,
           **params) -> dict[str, torch.Tensor]:
    """Purify a merged encoder with a post-hoc defense by name, options validated by the registry.
    `base`: the pre-trained encoder state dict; `heads[i]` / `data[i]`: task i's frozen head and small clean
    labeled split. Returns the defended encoder state dict (the keys and dtypes of `merged`)."""
    fn = get_defense(name)
    opts = registry.validate(name, params, "defense")
    return fn(encoder, base, merged, heads, data, encode, seed=seed, progress=progress,
              **opts.model_dump(exclude_unset=True))
