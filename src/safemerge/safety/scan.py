"""Scan candidate task models for backdoors BEFORE merging them: no labels, no knowledge of the trigger.

A backdoor is a shortcut that fine-tuning planted: a small input pattern that sends almost any input to one
class. The scan searches the suspect for such patterns where the input lives, on unlabeled clean inputs of
the task, then measures each candidate twice: on the suspect and on the pre-trained encoder under the same
head (the reference). A word that really means "positive" flips inputs on both; a planted trigger only on
the suspect. The risk score is the largest gain, over candidates and classes, of the flip rate (the share of
inputs not predicted as class t that the pattern sends to t) from the reference to the suspect.

- text: an inserted token. A placeholder is inserted into every input; candidates are, per class, the tokens
  of a first-order (HotFlip) step on the placeholder's embedding, plus the tokens whose embedding moved most
  for their frequency in clean text (E-PUR's score: where rare-word and embedding-poisoning triggers live).
- vision: a square patch stamped into every input, its pattern optimised per class at every position of a
  grid (patch-trigger inversion); the best position per class and patch size is measured."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SafeMergeError
from ..model import Head, InputEncoder, TaskModel, batches, predict
from ..perturb import insert_placeholder, inserted_embedding_inputs, masked_pattern_inputs, word_embedding_name

StateDict = dict[str, torch.Tensor]


def _task_model(encoder: nn.Module, state: StateDict, head: Head, modality: str) -> TaskModel:
    enc = copy.deepcopy(encoder)
    enc.load_state_dict(state)
    model = TaskModel(enc, copy.deepcopy(head), modality).eval()
    model.requires_grad_(False)
    return model


def _flip_rates(pred: torch.Tensor, clean_pred: torch.Tensor, target: int) -> float:
    others = clean_pred != target
    return float((pred[others] == target).float().mean()) if others.any() else 0.0


# ---------------------------------------------------------------------------------------------- text


def _placeholder(encode: InputEncoder) -> tuple[str, int]:
    tok = encode.tokenizer
    word = getattr(tok, "mask_token", None) or getattr(tok, "unk_token", None)
    if word is None:
        raise SafeMergeError("the tokenizer has neither a mask nor an unknown token to mark the insertion")
    return word, int(tok.convert_tokens_to_ids(word))  # type: ignore[union-attr]


def _inserted(encode: InputEncoder, texts: list[str], max_position: int, seed: int) -> dict[str, torch.Tensor]:
    word, ph_id = _placeholder(encode)
    inputs = encode(insert_placeholder(list(texts), word, seed, max_position))
    keep = (inputs["input_ids"] == ph_id).any(1)  # the placeholder survived truncation
    if not keep.any():
        raise SafeMergeError("no input kept the inserted token within the model's max length")
    return {k: v[keep] for k, v in inputs.items()} | {"kept": keep}


def text_candidates(encoder: nn.Module, state: StateDict, head: Head, encode: InputEncoder, texts: list[str],
                    per_class: int = 3, max_position: int = 8, seed: int = 0) -> list[int]:
    """Per class t, the `per_class` tokens k maximising the first-order gain (e_k - e_placeholder) . grad of
    mean log p_t over the inputs not predicted t, with the token inserted at a random early position (one
    HotFlip step; special tokens excluded)."""
    model = _task_model(encoder, state, head, "text")
    _, ph_id = _placeholder(encode)
    emb = dict(model.encoder.named_parameters())[word_embedding_name(model.encoder)].detach()
    inputs = _inserted(encode, texts, max_position, seed)
    clean_pred = predict(model, encode, list(texts))[inputs.pop("kept")]
    allowed = torch.ones(emb.shape[0], dtype=torch.bool)
    allowed[list(getattr(encode.tokenizer, "all_special_ids", []) or [])] = False
    v = emb[ph_id].clone().requires_grad_(True)
    x = inserted_embedding_inputs(inputs, emb, ph_id, v)
    logp = F.log_softmax(model.head(model.encoder(**x), x), -1)
    cands: list[int] = []
    n_cls = model.head.num_labels
    for t in range(n_cls):
        others = clean_pred != t
        if not others.any() or per_class <= 0:
            continue
        (g,) = torch.autograd.grad(logp[others, t].mean(), v, retain_graph=t < n_cls - 1)
        cands += (emb @ g).masked_fill(~allowed, float("-inf")).topk(per_class).indices.tolist()
    return list(dict.fromkeys(cands))


@torch.inference_mode()
def text_flip_rates(encoder: nn.Module, state: StateDict, head: Head, encode: InputEncoder, texts: list[str],
                    tokens: list[int], max_position: int = 8, seed: int = 0) -> torch.Tensor:
    """[len(tokens), classes]: the share of inputs not predicted as class t that inserting token k (at the same
    random early position as `text_candidates`) sends to t."""
    model = _task_model(encoder, state, head, "text")
    _, ph_id = _placeholder(encode)
    inputs = _inserted(encode, texts, max_position, seed)
    clean_pred = predict(model, encode, list(texts))[inputs.pop("kept")]
    at = inputs["input_ids"] == ph_id
    flips = torch.zeros(len(tokens), model.head.num_labels)
    for i, k in enumerate(tokens):
        pred = model({"input_ids": torch.where(at, k, inputs["input_ids"]),
                      "attention_mask": inputs["attention_mask"]}).argmax(-1)
        for t in range(model.head.num_labels):
            flips[i, t] = _flip_rates(pred, clean_pred, t)
    return flips


# ---------------------------------------------------------------------------------------------- vision


def patch_positions(resolution: int, side: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of a `side`-px square slid with `stride` over the image, the last row/column flush with
    the border (corner triggers sit there)."""
    if not 0 < side <= resolution:
        raise SafeMergeError(f"trigger side {side} does not fit a {resolution}-px image")
    starts = sorted(set(range(0, resolution - side + 1, max(1, stride))) | {resolution - side})
    return [(i, j) for i in starts for j in starts]


def vision_triggers(encoder: nn.Module, state: StateDict, head: Head, encode: InputEncoder, images: torch.Tensor,
                    sides: tuple[int, ...] = (7, 14), steps: int = 8, lr: float = 0.3,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patch-trigger inversion: for every class t, every square side and every position of a grid (stride =
    side, and half of it for sides below one ViT patch), a pattern stamped into the inputs is optimised (Adam,
    `steps` steps, one input not predicted t per candidate and step, all candidates in one batch) towards t.
    Keeps, per class and side, the position with the lowest mean loss. Returns (masks [K, 1, R, R] in {0, 1},
    patterns [K, 3, R, R] in [0, 1], classes [K]). BadNets, TrojViT and BadMerging triggers are such patches;
    a trigger blended over the whole image is out of this search's reach."""
    model = _task_model(encoder, state, head, "vision")
    n_cls, res = model.head.num_labels, images.shape[-1]
    clean_pred = predict(model, encode, images)
    g = torch.Generator().manual_seed(seed)
    pools = [(clean_pred != t).nonzero().flatten() for t in range(n_cls)]
    pools = [p if len(p) else torch.arange(len(images)) for p in pools]
    out_m, out_p, out_t = [], [], []
    for side in sides:
        side = min(side, res)
        pos = patch_positions(res, side, side)
        mask = torch.zeros(len(pos), 1, res, res)
        for k, (i, j) in enumerate(pos):
            mask[k, :, i:i + side, j:j + side] = 1
        mask = mask.repeat(n_cls, 1, 1, 1)  # candidate c * len(pos) + k: class c, position k
        target = torch.arange(n_cls).repeat_interleave(len(pos))
        p_logit = (0.5 * torch.randn(len(target), 3, res, res, generator=g)).requires_grad_(True)
        opt = torch.optim.Adam([p_logit], lr=lr)
        loss_sum = torch.zeros(len(target))
        for step in range(steps):
            idx = torch.stack([pools[int(t)][torch.randint(len(pools[int(t)]), (1,), generator=g)][0] for t in target])
            x = encode(images[idx])
            loss = F.cross_entropy(model(masked_pattern_inputs(x, mask, torch.sigmoid(p_logit), encode)), target,
                                   reduction="none")
            if step >= steps // 2:
                loss_sum += loss.detach()
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
        best = loss_sum.view(n_cls, len(pos)).argmin(1) + torch.arange(n_cls) * len(pos)
        out_m.append(mask[best])
        out_p.append(torch.sigmoid(p_logit[best]).detach())
        out_t.append(target[best])
    return torch.cat(out_m), torch.cat(out_p), torch.cat(out_t)


@torch.inference_mode()
def vision_flip_rates(encoder: nn.Module, state: StateDict, head: Head, encode: InputEncoder,
                      images: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor,
                      classes: torch.Tensor) -> torch.Tensor:
    """[K]: the share of inputs not predicted as classes[k] that trigger k (masks[k], patterns[k]) sends there."""
    model = _task_model(encoder, state, head, "vision")
    clean_pred = predict(model, encode, images)
    flips = torch.zeros(len(classes))
    for k, t in enumerate(classes.tolist()):
        others = (clean_pred != t).nonzero().flatten()
        if len(others):
            pred = torch.cat([model(masked_pattern_inputs(encode(b), masks[k], patterns[k], encode)).argmax(-1)
                              for b in batches(images[others], 256)])
            flips[k] = float((pred == t).float().mean())
    return flips


# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class ScanResult:
    score: float  # backdoor risk: the largest flip-rate gain from the reference to the suspect (-1..1)
    flip_rate: float  # the suspect's flip rate for the highest-scoring trigger and class
    reference_flip_rate: float  # the same trigger and class on the pre-trained encoder under the same head
    target: int  # that class
    trigger: str  # that trigger: the token, or the mask's size
    seconds: float = 0.0
    model: str = ""
    task: str = ""

    def row(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def scan_state(encoder: nn.Module, base: StateDict, state: StateDict, head: Head, encode: InputEncoder,
               inputs: torch.Tensor | list[str], extra_tokens: list[int] | None = None, per_class: int = 2,
               sides: tuple[int, ...] = (7, 14), steps: int = 8, seed: int = 0) -> ScanResult:
    """Risk score of one encoder `state` (fine-tuned from `base`) under `head`, from unlabeled `inputs`: search
    triggers on the suspect, measure each on the suspect and on the base, score = max gain in flip rate.
    Text: HotFlip candidates (`per_class` per class) plus `extra_tokens` (e.g. E-PUR's ranking). Vision: per
    class and square side of `sides` (px; 7 = a BadNets-sized patch, 14 = one ViT patch, TrojViT's trigger),
    the best patch of a position grid after `steps` optimisation steps (`vision_triggers`)."""
    t0 = time.time()
    if encode.modality == "text":
        texts = list(inputs)
        tokens = list(dict.fromkeys(text_candidates(encoder, state, head, encode, texts, per_class, seed=seed)
                                    + list(extra_tokens or [])))
        sus = text_flip_rates(encoder, state, head, encode, texts, tokens, seed=seed)
        ref = text_flip_rates(encoder, base, head, encode, texts, tokens, seed=seed)
        gain = sus - ref
        k, t = divmod(int(gain.argmax()), gain.shape[1])
        trigger = str(encode.tokenizer.convert_ids_to_tokens(tokens[k]))  # type: ignore[union-attr]
        return ScanResult(float(gain[k, t]), float(sus[k, t]), float(ref[k, t]), t, trigger, time.time() - t0)
    images = inputs  # type: ignore[assignment]
    masks, patterns, classes = vision_triggers(encoder, state, head, encode, images, sides, steps, seed=seed)  # type: ignore[arg-type]
    sus = vision_flip_rates(encoder, state, head, encode, images, masks, patterns, classes)  # type: ignore[arg-type]
    ref = vision_flip_rates(encoder, base, head, encode, images, masks, patterns, classes)  # type: ignore[arg-type]
    gain = sus - ref
    k = int(gain.argmax())
    side = int(masks[k].sum()) ** 0.5
    rows, cols = masks[k, 0].nonzero().min(0).values.tolist()
    return ScanResult(float(gain[k]), float(sus[k]), float(ref[k]), int(classes[k]),
                      f"{side:.0f}-px patch at ({rows}, {cols})", time.time() - t0)


def auroc(positives: list[float], negatives: list[float]) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative (ties count
    half), i.e. the Mann-Whitney U statistic over all pairs."""
    if not positives or not negatives:
        raise SafeMergeError("AUROC needs at least one positive and one negative score")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return float(wins / (len(positives) * len(negatives)))


def scan_suspect(s, n_inputs: int = 48, weight_candidates: int = 8, per_class: int = 2,
                 sides: tuple[int, ...] = (7, 14), steps: int = 8, seed: int = 0) -> ScanResult:
    """Scan a loaded `purify.Suspect` with `scan_state`. Only unlabeled inputs are used: the first `n_inputs`
    of its held-out examples for the search and (text) its unlabeled texts to count token frequencies for the
    `weight_candidates` top tokens of E-PUR's ranking."""
    from .purify import e_pur, token_frequencies, word_embedding_key

    t0 = time.time()
    x = s.val.x[:n_inputs]
    extra = None
    if s.backbone.modality == "text" and weight_candidates > 0:
        key = word_embedding_key(s.base)
        freq = token_frequencies(s.encode.tokenizer, list(s.texts or s.val.x), s.base[key].shape[0],
                                 s.encode.max_length)
        extra = e_pur(s.base, s.state, freq, top_n=0, embedding_key=key).ranking[:weight_candidates]
    r = scan_state(s.backbone.model, s.base, s.state, s.head, s.encode, x, extra, per_class, sides, steps, seed)
    r.model, r.task, r.seconds = str(s.path), s.task, time.time() - t0
    return r
