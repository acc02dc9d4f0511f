"""Scan candidate task models for backdoors BEFORE merging them: no labels, no knowledge of the trigger.

A backdoor is a shortcut: a small input pattern that sends almost any input to one class. The scan searches
for such a pattern where the input lives and measures how well the best one found works, on unlabeled clean
inputs of the task, against the same search on the pre-trained encoder under the same head (the reference:
what the task itself makes easy, e.g. a word that really means "positive").

- text: an inserted token. One placeholder is inserted into every input; candidate tokens come from a
  first-order (HotFlip-style) search per class on the placeholder's embedding, plus, when the pre-trained
  weights are given, the tokens whose embedding moved most for their frequency in clean text (E-PUR's
  score: where rare-word and embedding-poisoning triggers live); every candidate is then inserted for real.
- vision: a stamped mask + pattern per class (Neural-Cleanse-style trigger inversion), with a budget on the
  mask's area.

The statistic is the flip rate: the share of inputs not predicted as class t that the pattern sends to t,
maximised over patterns and classes. The risk score is the suspect's flip rate minus the reference's."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SafeMergeError
from .model import InputEncoder, TaskModel, batches, pool
from .perturb import insert_placeholder, inserted_embedding_inputs, word_embedding_name

StateDict = dict[str, torch.Tensor]


@dataclass
class TriggerSearch:
    """The best trigger a search found on one model."""

    flip_rate: float  # share of inputs not predicted as `target` that the trigger sends to it (0..1)
    target: int
    trigger: str  # a description (the token, or the mask area)
    per_class: list[float] = field(default_factory=list)  # best flip rate per target class


def _task_model(encoder: nn.Module, state: StateDict, head: nn.Linear, modality: str) -> TaskModel:
    enc = copy.deepcopy(encoder)
    enc.load_state_dict(state)
    enc.eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    h = copy.deepcopy(head).eval()
    for p in h.parameters():
        p.requires_grad_(False)
    return TaskModel(enc, h, modality)


@torch.inference_mode()
def _preds(model: TaskModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(inputs).argmax(-1)


def text_trigger_search(encoder: nn.Module, state: StateDict, head: nn.Linear, encode: InputEncoder,
                        texts: list[str], per_class: int = 3, extra_candidates: list[int] | None = None,
                        max_position: int = 8, seed: int = 0, batch_size: int = 256) -> TriggerSearch:
    """Search one inserted token that sends the most inputs to one class.

    Candidates: for every class t, the `per_class` tokens k maximising the first-order gain
    (e_k - e_placeholder) . grad mean log p_t over the inputs not predicted t (one HotFlip step), plus
    `extra_candidates`. Each candidate is then inserted at the placeholder and its flip rates measured."""
    tok = encode.tokenizer
    placeholder = getattr(tok, "mask_token", None) or getattr(tok, "unk_token", None)
    if placeholder is None:
        raise SafeMergeError("the tokenizer has neither a mask nor an unknown token to mark the insertion")
    ph_id = int(tok.convert_tokens_to_ids(placeholder))
    model = _task_model(encoder, state, head, "text")
    emb_name = word_embedding_name(model.encoder)
    emb = dict(model.encoder.named_parameters())[emb_name].detach()
    with torch.inference_mode():
        clean_pred = torch.cat([_preds(model, encode(b)) for b in batches(texts, batch_size)])
    inputs = encode(insert_placeholder(list(texts), placeholder, seed, max_position))
    keep = (inputs["input_ids"] == ph_id).any(1)  # the placeholder survived truncation
    inputs = {k: v[keep] for k, v in inputs.items()}
    clean_pred = clean_pred[keep]
    n_cls = head.out_features
    if len(clean_pred) == 0:
        raise SafeMergeError("no input kept the inserted token within the model's max length")
    # 1. first-order candidates per class
    special = set(getattr(tok, "all_special_ids", []) or [])
    allowed = torch.ones(emb.shape[0], dtype=torch.bool)
    allowed[list(special)] = False
    v = emb[ph_id].clone().requires_grad_(True)
    out = model.encoder(**inserted_embedding_inputs(inputs, emb, ph_id, v))
    logp = F.log_softmax(model.head(pool(out, inputs, "text")), -1)
    cands: list[int] = []
    for t in range(n_cls):
        others = clean_pred != t
        if not others.any():
            continue
        (g,) = torch.autograd.grad(logp[others, t].mean(), v, retain_graph=t < n_cls - 1)
        gain = (emb @ g).masked_fill(~allowed, float("-inf"))
        cands += gain.topk(per_class).indices.tolist()
    cands += [c for c in (extra_candidates or []) if 0 <= c < emb.shape[0]]
    cands = list(dict.fromkeys(cands))
    # 2. insert every candidate for real
    flips = torch.zeros(len(cands), n_cls)
    at = inputs["input_ids"] == ph_id
    with torch.inference_mode():
        for i, k in enumerate(cands):
            ids = torch.where(at, torch.tensor(k), inputs["input_ids"])
            pred = _preds(model, {"input_ids": ids, "attention_mask": inputs["attention_mask"]})
            for t in range(n_cls):
                others = clean_pred != t
                flips[i, t] = (pred[others] == t).float().mean() if others.any() else 0.0
    best = int(flips.max(1).values.argmax())
    target = int(flips[best].argmax())
    return TriggerSearch(float(flips[best, target]), target, tok.convert_ids_to_tokens(cands[best]),
                         flips.max(0).values.tolist())


def vision_trigger_search(encoder: nn.Module, state: StateDict, head: nn.Linear, encode: InputEncoder,
                          images: torch.Tensor, area: float = 0.03, steps: int = 30, batch_size: int = 8,
                          lr: float = 0.1, penalty: float = 1.0, seed: int = 0) -> TriggerSearch:
    """Neural-Cleanse-style inversion for every class at once: a mask m and a pattern p per class, stamped as
    x' = (1 - m) x + m p, optimised (Adam, `steps` steps of `batch_size` inputs per class) on cross-entropy to
    the class plus `penalty` times the mask's mean. The found trigger is then cut to a hard mask of its
    `area` share most-weighted pixels (the budget: a BadNets patch covers 2% of a 42-px image) and its flip
    rates measured on all `images`."""
    from .perturb import masked_pattern_inputs

    model = _task_model(encoder, state, head, "vision")
    n_cls, res = head.out_features, images.shape[-1]
    with torch.inference_mode():
        clean_pred = torch.cat([_preds(model, encode(b)) for b in batches(images, 256)])
    g = torch.Generator().manual_seed(seed)
    m_logit = torch.full((n_cls, 1, res, res), -2.0, requires_grad=True)
    p_logit = (0.1 * torch.randn(n_cls, 3, res, res, generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([m_logit, p_logit], lr=lr)
    target = torch.arange(n_cls).repeat_interleave(batch_size)
    for _ in range(steps):
        # per class, inputs not predicted as that class
        idx = []
        for t in range(n_cls):
            pool_t = (clean_pred != t).nonzero().flatten()
            pool_t = pool_t if len(pool_t) else torch.arange(len(images))
            idx.append(pool_t[torch.randint(len(pool_t), (batch_size,), generator=g)])
        x = encode(images[torch.cat(idx)])["pixel_values"].view(n_cls, batch_size, 3, res, res)
        mask, pattern = torch.sigmoid(m_logit), torch.sigmoid(p_logit)
        xs = masked_pattern_inputs({"pixel_values": x}, mask.unsqueeze(1), pattern.unsqueeze(1), encode)
        logits = model({"pixel_values": xs["pixel_values"].flatten(0, 1)})
        loss = F.cross_entropy(logits, target) + penalty * mask.mean() * n_cls
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    k = max(1, int(round(area * res * res)))
    with torch.no_grad():
        soft = torch.sigmoid(m_logit).flatten(1)
        hard = torch.zeros_like(soft)
        hard.scatter_(1, soft.topk(k, dim=1).indices, 1.0)
        hard = hard.view(n_cls, 1, res, res)
        pattern = torch.sigmoid(p_logit)
    flips = torch.zeros(n_cls)
    with torch.inference_mode():
        for t in range(n_cls):
            others = (clean_pred != t).nonzero().flatten()
            if not len(others):
                continue
            preds = []
            for b in batches(images[others], 256):
                xb = masked_pattern_inputs(encode(b), hard[t], pattern[t], encode)
                preds.append(_preds(model, xb))
            flips[t] = (torch.cat(preds) == t).float().mean()
    target_cls = int(flips.argmax())
    return TriggerSearch(float(flips[target_cls]), target_cls, f"{k}-pixel mask", flips.tolist())


def auroc(positives: list[float], negatives: list[float]) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative (ties
    count half), i.e. the Mann-Whitney U statistic over all pairs."""
    if not positives or not negatives:
        raise SafeMergeError("AUROC needs at least one positive and one negative score")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return float(wins / (len(positives) * len(negatives)))


# ---------------------------------------------------------------------------------------------- model folders


@dataclass
class ScanResult:
    model: str
    task: str
    score: float  # backdoor risk: the suspect's best flip rate minus the reference's (-1..1)
    flip_rate: float
    reference_flip_rate: float
    target: int
    trigger: str
    seconds: float

    def row(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def _search(s, state: StateDict, inputs, extra: list[int] | None, n_inputs: int, seed: int, steps: int) -> TriggerSearch:
    if s.backbone.modality == "text":
        return text_trigger_search(s.backbone.model, state, s.head, s.encode, list(inputs[:n_inputs]),
                                   extra_candidates=extra, seed=seed)
    return vision_trigger_search(s.backbone.model, state, s.head, s.encode, inputs[:n_inputs], steps=steps,
                                 seed=seed)


def scan_models(models: list[str], base: str | None = None, profile: str | None = None, n_inputs: int = 48,
                weight_candidates: int = 8, steps: int = 30, seed: int = 0) -> list[ScanResult]:
    """Scan model folders (or zoo references): the risk score of each, with the reference search on the
    pre-trained encoder under the same head computed once per head. Only unlabeled inputs are used: the
    task's validation inputs for the search, and (text) its validation and test texts to count token
    frequencies for the `weight_candidates` E-PUR candidates."""
    import time

    from .backbones import fingerprint
    from .purify import e_pur, load_suspect, token_frequencies, word_embedding_key

    backbones: dict = {}
    references: dict[tuple, TriggerSearch] = {}
    out = []
    for ref in models:
        t0 = time.time()
        s = load_suspect(ref, base, profile, backbones)
        inputs = s.data.val.x
        extra = None
        if s.backbone.modality == "text" and weight_candidates > 0:
            key = word_embedding_key(s.base)
            freq = token_frequencies(s.backbone.tokenizer, list(s.data.val.x) + list(s.data.test.x),
                                     s.base[key].shape[0], s.encode.max_length)
            extra = e_pur(s.base, s.state, freq, top_n=0, embedding_key=key).ranking[:weight_candidates]
        found = _search(s, s.state, inputs, extra, n_inputs, seed, steps)
        hkey = (id(s.backbone), s.task, fingerprint(s.head.state_dict()))
        if hkey not in references:
            references[hkey] = _search(s, s.base, inputs, None, n_inputs, seed, steps)
        r = references[hkey]
        out.append(ScanResult(str(ref), s.task, found.flip_rate - r.flip_rate, found.flip_rate, r.flip_rate,
                              found.target, found.trigger, time.time() - t0))
    return out
