"""Purify one suspect task model with the clean pre-trained weights, before it is merged: Fine-mixing and
E-PUR (Zhang et al., "Fine-mixing: Mitigating Backdoors in Fine-tuned Language Models", EMNLP 2022).

- Fine-mixing: keep a share `keep_ratio` of the suspect's fine-tuned update and reset the rest to the
  pre-trained weights (`mix_states`), then fine-tune the mix on a little clean labeled data (`fine_mixing`).
  The backdoor lives in the update; most of it goes, and the clean data brings the task accuracy back. When
  a scan found the trigger, the fine-tuning step also unlearns it (the clean data again with the trigger put
  in and the true labels) and keeps as much of the update as that allows.
- E-PUR (text): word embeddings that moved far from the pre-trained ones although their token is rare in clean
  text are where rare-word and embedding-poisoning triggers live; reset them (`e_pur`).

The paper's equations were not recovered (shared/METHODS.md, section 4): the choices it leaves open are named
parameters, and their docstrings say which reading is the default. Only the encoder is purified; the task head
is kept as it is."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from ..backbones import Backbone
from ..io import check_finite, check_same_keys
from ..merging.engine import dare_keep, topk_masks
from ..errors import SafeMergeError
from ..evaluate import accuracy
from ..model import Head, InputEncoder, TaskModel, predict
from ..data import Split
from ..training import TrainConfig, finetune

if TYPE_CHECKING:
    from .scan import ScanResult

StateDict = dict[str, torch.Tensor]
MixMode = Literal["random", "sel"]
KEEP_RATIOS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
# the fine-tuning step's encoder learning rate when it also unlearns a found trigger, per modality (chosen on
# the scan population's tuning half, benchmarks/purify_unlearn.py: on MiniLM 1e-5, the clean step's own, left
# the trigger in; on DINOv2 1e-4 cost up to 35 points of accuracy)
UNLEARN_LR = {"text": 1e-4, "vision": 1e-5}


def check_keep_ratio(keep_ratio: float) -> float:
    if not isinstance(keep_ratio, (int, float)) or math.isnan(keep_ratio) or not 0.0 <= keep_ratio <= 1.0:
        raise SafeMergeError(f"keep ratio {keep_ratio} is outside [0, 1]")
    return float(keep_ratio)


def check_pair(base: StateDict, suspect: StateDict, source: str = "suspect model") -> None:
    """Same tensor names and shapes as the base, and finite: else a one-line error naming the tensor."""
    check_same_keys(base, suspect, source, "the pre-trained model")
    check_finite(suspect, source)
    check_finite(base, "the pre-trained model")


def _mixable(base: StateDict) -> list[str]:
    return [k for k in sorted(base) if base[k].is_floating_point()]


def mixing_mask(base: StateDict, suspect: StateDict, keep_ratio: float, mode: MixMode = "random",
                scope: Literal["global", "tensor"] = "global", seed: int = 0) -> dict[str, torch.Tensor]:
    """Boolean masks (True = keep the suspect's weight) over every floating-point tensor.

    `mode="random"`: each weight kept with probability `keep_ratio` (Bernoulli, seeded). `mode="sel"`: the
    round(keep_ratio * n) weights with the largest |suspect - base| are kept, ties broken by position so the
    count is exact; `scope="global"` ranks all weights of the encoder together (the default reading, as in
    the paper's "Sel" variant), `scope="tensor"` keeps the top share of every tensor."""
    keep_ratio = check_keep_ratio(keep_ratio)
    if mode not in ("random", "sel"):
        raise SafeMergeError(f"unknown mixing mode '{mode}' (known: random, sel)")
    if scope not in ("global", "tensor"):
        raise SafeMergeError(f"unknown mixing scope '{scope}' (known: global, tensor)")
    keys = _mixable(base)
    if mode == "random":  # the engine's DARE keep mask (chunk-seeded Bernoulli draws)
        return {k: dare_keep(k, base[k].shape, keep_ratio, seed, 0) for k in keys}
    # the engine's exact top-k (ties kept in position order, as a stable descending sort would)
    return topk_masks({k: suspect[k].float() - base[k].float() for k in keys}, keep_ratio, scope)


def mix_states(base: StateDict, suspect: StateDict, keep_ratio: float, mode: MixMode = "random",
               scope: Literal["global", "tensor"] = "global", seed: int = 0) -> StateDict:
    """theta_mix = theta0 + M * (theta_bd - theta0), computed as a selection so keep_ratio 1 gives the suspect
    and 0 the pre-trained weights bit for bit. Non-float tensors (position ids) come from the suspect."""
    check_pair(base, suspect)
    masks = mixing_mask(base, suspect, keep_ratio, mode, scope, seed)
    return {k: torch.where(masks[k], suspect[k], base[k]) if k in masks else suspect[k].clone() for k in suspect}


# ---------------------------------------------------------------------------------------------- E-PUR


def word_embedding_key(state: StateDict) -> str:
    """The state-dict key of the input word embeddings (BERT-style encoders)."""
    keys = [k for k in state if k.endswith("word_embeddings.weight")]
    if len(keys) != 1:
        raise SafeMergeError("E-PUR needs a text encoder with one word-embedding matrix "
                             f"(found {len(keys)} tensors named '*word_embeddings.weight')")
    return keys[0]


def token_frequencies(tokenizer, texts: Sequence[str], vocab_size: int, max_length: int | None = None) -> torch.Tensor:
    """How often each token id occurs in `texts` tokenized as the model sees them (special tokens included,
    so [CLS]/[SEP] count as the frequent tokens they are)."""
    if not len(texts):
        raise SafeMergeError("E-PUR needs clean texts to count token frequencies (got none)")
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=max_length is not None,
                    max_length=max_length)["input_ids"]
    flat = torch.tensor([i for row in ids for i in row], dtype=torch.long)
    return torch.bincount(flat, minlength=vocab_size)[:vocab_size].float()


@dataclass
class EPurResult:
    state: StateDict = field(repr=False)
    ranking: list[int]  # token ids, most suspicious first
    scores: torch.Tensor = field(repr=False)  # delta_k / log(max(f_k, c)) per token id
    flagged: list[int]  # the reset token ids (the first top_n of the ranking)

    def rank_of(self, token_id: int) -> int:
        """1-based rank of a token in the ranking (1 = the most suspicious)."""
        return self.ranking.index(token_id) + 1


def e_pur(base: StateDict, suspect: StateDict, frequencies: torch.Tensor, top_n: int = 100, c: float = 20.0,
          embedding_key: str | None = None, first: Sequence[int] = ()) -> EPurResult:
    """Embedding purification: delta_k = ||e_k(suspect) - e_k(base)||, score_k = delta_k / log(max(f_k, c)),
    reset the word embeddings of the `top_n` highest-scoring tokens to the pre-trained ones.

    `frequencies[k]` = count of token k in clean text (`token_frequencies`); `c` (20) keeps tokens that are
    rare or absent in the clean data from dividing by ~0. `top_n` is a reading (the paper's value was not
    recovered): 100 of MiniLM's 30,522 rows, few enough to leave clean accuracy where it was. Tokens in `first`
    (the pieces of a trigger the scan found) are ranked before all others: when fine-tuning also moved the
    task's own words (more so with a head frozen during fine-tuning), drift alone can rank a planted word's
    pieces below the top few."""
    check_pair(base, suspect)
    key = embedding_key or word_embedding_key(suspect)
    if key not in suspect:
        raise SafeMergeError(f"no tensor '{key}' in the suspect model")
    e0, e1 = base[key].float(), suspect[key].float()
    if frequencies.shape != (e0.shape[0],):
        raise SafeMergeError(f"token frequencies cover {tuple(frequencies.shape)} tokens, the embedding has "
                             f"{e0.shape[0]} rows (tokenizer of another model?)")
    if top_n < 0 or c <= 1:
        raise SafeMergeError(f"E-PUR needs top_n >= 0 and c > 1 (got top_n={top_n}, c={c})")
    delta = (e1 - e0).norm(dim=1)
    scores = delta / torch.log(frequencies.float().clamp_min(c))
    ranking = torch.argsort(scores, descending=True, stable=True).tolist()
    if first:
        lead = list(dict.fromkeys(int(t) for t in first if 0 <= int(t) < len(scores)))
        seen = set(lead)
        ranking = lead + [t for t in ranking if t not in seen]
    flagged = ranking[:top_n]
    state = {k: v.clone() for k, v in suspect.items()}
    state[key][flagged] = base[key][flagged].to(state[key].dtype)
    return EPurResult(state, ranking, scores, flagged)


# ---------------------------------------------------------------------------------------------- Fine-mixing


def clean_subset(split: Split, fraction: float, seed: int = 0) -> Split:
    """A class-stratified random share `fraction` of a labeled split (at least one example per class present),
    the defender's small clean data set."""
    if not isinstance(fraction, (int, float)) or math.isnan(fraction) or not 0.0 < fraction <= 1.0:
        raise SafeMergeError(f"clean fraction {fraction} is outside (0, 1]")
    g = torch.Generator().manual_seed(seed)
    idx = []
    for cls in split.y.unique().tolist():
        members = (split.y == cls).nonzero().flatten()
        n = max(1, int(round(fraction * len(members))))
        idx.append(members[torch.randperm(len(members), generator=g)[:n]])
    chosen = torch.cat(idx) if idx else torch.empty(0, dtype=torch.long)
    return split.subset(chosen[torch.randperm(len(chosen), generator=g)])


def with_trigger_copies(clean: Split, put_in: Callable) -> Split:
    """`clean` followed by a copy of it with a trigger put in (`put_in`) and the same, true labels."""
    x = put_in(clean.x)
    if len(x) != len(clean):
        raise SafeMergeError(f"putting the trigger in returned {len(x)} inputs for {len(clean)}")
    return clean.concat(Split(list(x) if isinstance(clean.x, list) else torch.as_tensor(x), clean.y))


def check_head_fits(head: Head, num_classes: int, task: str) -> None:
    if head.num_labels != num_classes:
        raise SafeMergeError(f"task head '{task}' has {head.num_labels} labels; the task's data has {num_classes} classes")


@dataclass
class FineTuneConfig:
    """The fine-tuning step on the clean data: `epochs` passes (at least `min_steps` steps) with AdamW at encoder
    learning rate `lr` and the head frozen (`head_lr=0`: the task head is kept, only the encoder is purified).
    `lr` = 1e-5 is a reading: the zoo's own text rate (1e-4) overfits 20 to 100 examples and costs accuracy
    (measured on tweet_sentiment's validation split), 1e-5 keeps it."""

    epochs: float = 3.0
    batch_size: int = 16
    lr: float = 1e-5
    head_lr: float = 0.0
    min_steps: int = 5
    seed: int = 0

    def train_config(self, n: int) -> TrainConfig:
        bs = max(1, min(self.batch_size, n))
        steps = max(self.min_steps, math.ceil(self.epochs * n / bs))
        return TrainConfig(steps=steps, batch_size=bs, lr=self.lr, head_lr=self.head_lr, seed=self.seed)


def finetune_state(encoder: nn.Module, head: nn.Linear, state: StateDict, encode: InputEncoder, clean: Split,
                   cfg: FineTuneConfig) -> StateDict:
    """Fine-tune the encoder weights `state` (under a copy of `head`) on `clean`; returns the new encoder state.
    `encoder` is a template of the architecture; it is not modified."""
    if len(clean) == 0:
        raise SafeMergeError("the clean fine-tuning set is empty")
    enc = copy.deepcopy(encoder).requires_grad_(True)
    enc.load_state_dict(state)
    model = TaskModel(enc, copy.deepcopy(head), encode.modality)
    finetune(model, encode, clean, cfg.train_config(len(clean)), desc="fine-mixing: fine-tune")
    return {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}


@dataclass
class FineMixResult:
    state: StateDict = field(repr=False)
    keep_ratio: float
    val_acc: float  # clean validation accuracy of the returned model
    reference_acc: float  # the suspect's clean validation accuracy
    trials: list[dict]  # every keep ratio tried, in order: {"keep_ratio", "val_acc" (the mix's), and with a
    # fine-tuning step "finetuned_val_acc", "finetuned" (whether it was kept); with a trigger, "trigger_rate"}
    finetuned: bool  # whether the returned model is the fine-tuned mix (False: the mix alone)
    trigger_rate: float | None = None  # the found trigger's flip rate on the returned model
    warning: str = ""  # why the choice is not a clean pass (no ratio removed the trigger within the ACC drop)


def fine_mixing(encoder: nn.Module, head: nn.Linear, base: StateDict, suspect: StateDict, encode: InputEncoder,
                clean: Split | None, val: Split, mode: MixMode = "random", keep_ratios: Sequence[float] = KEEP_RATIOS,
                max_acc_drop: float = 2.0, select_on: Literal["finetuned", "mix"] = "finetuned",
                finetune_cfg: FineTuneConfig | None = None, scope: Literal["global", "tensor"] = "global",
                seed: int = 0, trigger_rate: Callable[[StateDict], float] | None = None,
                max_trigger_rate: float = 0.2, unlearn: Callable | None = None,
                largest_first: bool = False) -> FineMixResult:
    """Fine-mixing: the smallest keep ratio of `keep_ratios` whose clean validation accuracy stays within
    `max_acc_drop` points of the suspect's, mixed (`mix_states`) and then fine-tuned on `clean`.

    With `trigger_rate` (a state's flip rate under the trigger a scan found, `scan.trigger_flip_rate`), a
    ratio passes only if that rate is also at most `max_trigger_rate`: on a weak task validation accuracy
    alone passes ratios that keep the backdoor. If no ratio passes both, the largest ratio that removes the
    trigger is returned (its accuracy loss is reported in `warning`), else the one with the lowest rate.

    With `unlearn` (inputs -> the same inputs with the found trigger put in, `scan.stamp_found`; text: with
    `encode` the `scan.trigger_encoder` that reads the placeholders it puts in as the run's tokens), the
    fine-tuning step also learns the clean data with the trigger in and the true labels (Neural Cleanse's
    unlearning): a weak task's accuracy needs most of the update kept, and then mixing alone keeps the backdoor.
    `largest_first` (with a trigger to measure) tries the ratios from the largest down and keeps the first that
    removes the trigger within the accuracy drop: as much of the update as the trigger allows, where the
    smallest ratio within the drop sits at the edge of the accuracy budget.

    `select_on="finetuned"` (default) judges each keep ratio by the accuracy after the fine-tuning step, since
    that step is part of the method and is what brings the accuracy back; `"mix"` judges the mix alone (one
    fine-tuning instead of one per ratio tried). The fine-tuned model is kept only if its validation accuracy
    is at least the mix's: on a few dozen examples the step can cost accuracy instead of restoring it (it
    does on DINOv2), and then the mix is the better purification. Ratios are tried in increasing order (see
    `largest_first`) and the search stops at the first that passes; if none does, the largest is used (with a
    trigger: the largest that removes it, else the one that leaves the least of it). `clean=None` skips the
    fine-tuning step (the paper's "mixing without fine-tuning" ablation). `val` is a labeled clean validation
    split; the `encoder` template is not modified."""
    ratios = sorted({check_keep_ratio(r) for r in keep_ratios}, reverse=largest_first and trigger_rate is not None)
    if not ratios:
        raise SafeMergeError("fine-mixing needs at least one keep ratio")
    if select_on not in ("finetuned", "mix"):
        raise SafeMergeError(f"unknown selection '{select_on}' (known: finetuned, mix)")
    check_pair(base, suspect)
    if len(val) == 0:
        raise SafeMergeError("fine-mixing needs a non-empty clean validation split")
    cfg = finetune_cfg or FineTuneConfig(seed=seed)
    if clean is not None and unlearn is not None and len(clean):
        clean = with_trigger_copies(clean, unlearn)
    modality = encode.modality
    enc = copy.deepcopy(encoder).eval()

    def val_acc(state: StateDict) -> float:
        enc.load_state_dict(state)
        return accuracy(TaskModel(enc, head, modality), encode, val)

    def removes(state: StateDict) -> bool:
        return trigger_rate is not None and float(trigger_rate(state)) <= max_trigger_rate

    def finetuned_if_better(state: StateDict, acc: float, trial: dict) -> tuple[StateDict, float, bool]:
        tuned = finetune_state(encoder, head, state, encode, clean, cfg)  # type: ignore[arg-type]
        tuned_acc = val_acc(tuned)
        # unlearning may cost a little accuracy: the tuned model is also better if only it removes the trigger
        keep = tuned_acc >= acc or (unlearn is not None and removes(tuned) and not removes(state))
        trial.update(finetuned_val_acc=round(tuned_acc, 2), finetuned=keep)
        return (tuned, tuned_acc, True) if keep else (state, acc, False)

    reference = val_acc(suspect)
    threshold = reference - max_acc_drop
    per_ratio_ft = clean is not None and select_on == "finetuned"
    trials: list[dict] = []
    chosen: tuple[float, StateDict, float, bool] | None = None
    tried: list[tuple[float, StateDict, float, bool, float | None]] = []
    for r in ratios:
        state = mix_states(base, suspect, r, mode, scope, seed)
        acc = val_acc(state)
        trials.append({"keep_ratio": r, "val_acc": round(acc, 2)})
        tuned = False
        if per_ratio_ft:
            state, acc, tuned = finetuned_if_better(state, acc, trials[-1])
        rate = None
        if trigger_rate is not None:
            rate = float(trigger_rate(state))
            trials[-1]["trigger_rate"] = round(rate, 4)
        tried.append((r, state, acc, tuned, rate))
        chosen = (r, state, acc, tuned)
        if acc >= threshold and (rate is None or rate <= max_trigger_rate):
            break
    else:
        if trigger_rate is not None:
            safe = [t for t in tried if t[4] is not None and t[4] <= max_trigger_rate]
            pick = max(safe, key=lambda t: t[0]) if safe else min(tried, key=lambda t: (t[4], -t[0]))
            chosen = pick[:4]
    assert chosen is not None
    r, state, acc, tuned = chosen
    if clean is not None and not per_ratio_ft:
        state, acc, tuned = finetuned_if_better(state, acc, trials[-1])
    rate = float(trigger_rate(state)) if trigger_rate is not None else None
    warning = ""
    if rate is not None and rate > max_trigger_rate:
        warning = (f"no keep ratio brought the found trigger's flip rate to {max_trigger_rate:.0%} or less "
                   f"(lowest: {rate:.0%} at keep ratio {r:g})")
    elif acc < threshold:
        warning = (f"removing the found trigger costs {reference - acc:.1f} points of validation accuracy "
                   f"(more than {max_acc_drop:g})")
    return FineMixResult(state, r, acc, reference, trials, tuned, rate, warning)


# ---------------------------------------------------------------------------------------------- suspects


@dataclass
class Suspect:
    """A task model to purify or scan, checked against its pre-trained base, with examples of its task."""

    path: Path
    manifest: dict
    state: StateDict = field(repr=False)  # the suspect encoder (keys as the base names them)
    head: Head = field(repr=False)
    task: str
    backbone: Backbone = field(repr=False)  # the pre-trained base
    base: StateDict = field(repr=False)
    train: Split = field(repr=False)  # clean labeled examples to fine-tune on (purify)
    val: Split = field(repr=False)  # held-out examples: judge a keep ratio (labeled), search triggers (unlabeled ok)
    encode: InputEncoder = field(repr=False)
    texts: list[str] = field(default_factory=list, repr=False)  # unlabeled texts to count token frequencies


def purify_state(s: Suspect, method: Literal["fine-mixing", "e-pur", "both"] = "fine-mixing",
                 clean_fraction: float = 0.05, mode: MixMode = "random", keep_ratios: Sequence[float] = KEEP_RATIOS,
                 max_acc_drop: float = 2.0, select_on: Literal["finetuned", "mix"] = "finetuned",
                 top_n: int = 100, c: float = 20.0, epochs: float = 3.0, lr: float = 1e-5,
                 seed: int = 0, scan: bool = True, max_trigger_rate: float = 0.2, unlearn: bool = True,
                 unlearn_lr: float | None = None, found: ScanResult | None = None,
                 unlearn_targets: Literal["labels", "suspect"] = "labels") -> tuple[StateDict, dict]:
    """Purify a loaded suspect; returns the encoder state and a summary (what was done, chosen keep ratio,
    flagged tokens). E-PUR counts token frequencies in the task's training texts (labels unused) and runs
    before fine-mixing in "both", so the mix starts from purified embeddings. Fine-mixing's clean data is a
    stratified `clean_fraction` of the training split; its keep ratio is judged on the validation split.

    With `scan` (default), the suspect is scanned first; if it is flagged, a keep ratio must also bring the
    found trigger's flip rate to `max_trigger_rate` or less (`fine_mixing`), and the purified model is
    scanned again: both scores are in the summary ("scan"). With `unlearn` (default) and a flagged suspect,
    Fine-mixing's fine-tuning step also unlearns the found trigger (`fine_mixing`), at learning rate
    `unlearn_lr` (default: `UNLEARN_LR` of the modality) instead of `lr`, and the keep ratios are tried from
    the largest down. `unlearn_targets`: what the unlearning step teaches on the clean examples and their
    triggered copies: the true "labels", or the "suspect"'s own predictions on the clean examples (the trigger
    should change nothing; the model keeps its function instead of fitting a few dozen labels; "labels"
    purified more on the tuning half, BENCHMARKS.md). `found`: a
    `ScanResult` of this suspect to use instead of scanning it first."""
    from .scan import (CONFIRM_INPUTS, _task_model, scan_state, scan_suspect, stamp_found, trigger_encoder,
                       trigger_flip_rate)

    if method not in ("fine-mixing", "e-pur", "both"):
        raise SafeMergeError(f"unknown purification method '{method}' (known: fine-mixing, e-pur, both)")
    if unlearn_targets not in ("labels", "suspect"):
        raise SafeMergeError(f"unknown unlearning targets '{unlearn_targets}' (known: labels, suspect)")
    modality = s.backbone.modality
    state, summary = s.state, {"method": method}
    if found is None and scan:
        found = scan_suspect(s, seed=seed)
    inputs = s.val.x[:48]
    rate_of, put_in = None, None
    if found is not None and found.flagged:
        def rate_of(st: StateDict) -> float:
            return trigger_flip_rate(s.backbone.model, st, s.head, s.encode, inputs, found, seed)

        if unlearn:
            def put_in(x):
                return stamp_found(found, x, s.backbone.tokenizer, seed + 1)
    if method in ("e-pur", "both"):
        if modality != "text":
            raise SafeMergeError(f"{s.path}: E-PUR purifies word embeddings; this is a {modality} model "
                                 "(use --method fine-mixing)")
        tok = s.backbone.tokenizer
        key = word_embedding_key(s.base)
        freq = token_frequencies(tok, list(s.train.x), s.base[key].shape[0], s.encode.max_length)
        lead = list(found.pattern.get("run", ())) if rate_of is not None and found is not None else []
        res = e_pur(s.base, state, freq, top_n=top_n, c=c, embedding_key=key, first=lead)
        state = res.state
        summary["e_pur"] = {"top_n": top_n, "c": c, "flagged": tok.convert_ids_to_tokens(res.flagged[:20]),
                            "frequency_source": "the clean training texts",
                            "first": tok.convert_ids_to_tokens(lead)}
    if method in ("fine-mixing", "both"):
        clean = clean_subset(s.train, clean_fraction, seed) if clean_fraction < 1 else s.train
        if put_in is not None:
            lr = UNLEARN_LR[modality] if unlearn_lr is None else unlearn_lr
            if unlearn_targets == "suspect" and len(clean):
                suspect = _task_model(s.backbone.model, s.state, s.head, modality)
                clean = Split(clean.x, predict(suspect, s.encode, clean.x).clone())
        cfg = FineTuneConfig(epochs=epochs, lr=lr, seed=seed)
        encode = trigger_encoder(found, s.encode) if put_in is not None and found is not None else s.encode
        res_m = fine_mixing(s.backbone.model, s.head, s.base, state, encode, clean, s.val,
                            mode=mode, keep_ratios=keep_ratios, max_acc_drop=max_acc_drop, select_on=select_on,
                            finetune_cfg=cfg, seed=seed, trigger_rate=rate_of, max_trigger_rate=max_trigger_rate,
                            unlearn=put_in, largest_first=put_in is not None)
        state = res_m.state
        summary["fine_mixing"] = {"mode": mode, "keep_ratio": res_m.keep_ratio, "finetuned": res_m.finetuned,
                                  "val_acc": round(res_m.val_acc, 2),
                                  "suspect_val_acc": round(res_m.reference_acc, 2), "trials": res_m.trials,
                                  "clean_fraction": clean_fraction, "clean_examples": len(clean),
                                  "max_acc_drop": max_acc_drop, "select_on": select_on, "epochs": epochs,
                                  "lr": cfg.lr, "trigger_rate": res_m.trigger_rate,
                                  "max_trigger_rate": max_trigger_rate if rate_of else None,
                                  "unlearned": found.trigger if put_in is not None and found is not None else None,
                                  "unlearn_targets": unlearn_targets if put_in is not None else None,
                                  "warning": res_m.warning}
    if found is not None and scan:
        after = scan_state(s.backbone.model, s.base, state, s.head, s.encode, inputs, None, seed=seed,
                           fit_inputs=s.val.x[:256],
                           confirm_inputs=s.val.x[len(inputs):len(inputs) + CONFIRM_INPUTS])
        summary["scan"] = {"threshold": found.threshold, "before": found.row(), "after": after.row(),
                           "trigger_checked": rate_of is not None}
    return state, summary
