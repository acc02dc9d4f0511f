"""Scan candidate task models for backdoors BEFORE merging them: no labels, no knowledge of the trigger, and
no assumption about how the model was trained (its head may have been trained with the encoder).

A backdoor is a shortcut that fine-tuning planted: a small input pattern that sends almost any input to one
class. The scan searches the model for such patterns where the input lives, on unlabeled clean inputs of the
task, and measures each candidate's flip rate (the share of inputs not predicted as class t that the pattern
sends to t). The best flip rate alone means little: on a weak or topical task ordinary words ("linux" in a
quotation-topic task) or strokes move predictions as much as a trigger does. So the scan calibrates each
candidate on a stand-in for the model built on the pre-trained base (`fit_reference`): the model's own head on
the base's output, scaled per class, plus a ridge-penalised linear probe on the base's features, fitted to the
model's predictions on the unlabeled inputs. What the base already represents moves the stand-in as it moves
the model; a shortcut planted by fine-tuning moves the model only. The search is steered by the same contrast
(towards t on the model, away from t on the stand-in). The text risk score (`risk_score`, `stand_in_features`)
is the largest gap between a candidate's flip rate on the model and on the stand-in; the vision risk score, and
either without a base, is the self-calibrated margin (`scan_features`: by how much one class's best flip rate
stands above the runner-up class's among triggers of equal budget; for vision with a base, a class the stand-in
also reaches with random patterns counts against it). With `reference=True`, the found
trigger is also measured on the base encoder under the model's own head, reported only. The designs were
chosen on the tuning half of a held-apart population of models (benchmarks/scan_eval.py, BENCHMARKS.md issue
17); what the scan catches and misses on the other half is there.

- text: an inserted token or a run of 2-3 tokens (a word the tokenizer splits, or a phrase). Candidates are,
  per class, the tokens of a first-order (HotFlip) step on an inserted placeholder, on the model and (more of
  them, `DIFFERENTIAL_PER_CLASS`) on the model-minus-stand-in contrast, extra tokens given by the caller (E-PUR's ranking: embeddings that moved most
  for their frequency) and runs of them (spelling one word, or pairs and triples: a phrase), those words with
  the inputs' most frequent words around them (a phrase whose function words E-PUR ranks low, `COMPLETE_WORDS`),
  and runs grown greedily by HotFlip steps beside the best candidates; random tokens form a reported null.
- vision: a square patch stamped into every input, its pattern optimised per class with signed-gradient steps
  at every position of a grid (an 8-px patch on a 4-px stride, at most 2 px off any 3-8 px trigger's place),
  the best places given more steps, plus a pattern blended over the whole image per class (Adam); random
  patches and blends form a reported null."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SafeMergeError
from ..model import Head, InputEncoder, TaskModel, batches, logits, pool, predict
from ..perturb import RunEncoder, insert_placeholder, masked_pattern_inputs, word_embedding_name

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


def _flip_stats(logits: torch.Tensor, clean_pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From logits [K, N, C] of K triggered copies of N inputs: flip rates [K, C] (share of inputs not predicted
    t sent to t), mean probability of t on those inputs [K, C], share of inputs whose prediction changed [K]."""
    n_cls = logits.shape[-1]
    pred = logits.argmax(-1)
    others = (clean_pred.view(-1, 1) != torch.arange(n_cls)).float()  # [N, C]
    denom = others.sum(0).clamp_min(1.0)
    hit = F.one_hot(pred, n_cls).float()  # [K, N, C]
    flips = (hit * others).sum(1) / denom
    prob = (logits.softmax(-1) * others).sum(1) / denom
    changed = (pred != clean_pred).float().mean(1)
    return flips, prob, changed


def _others_share(clean_pred: torch.Tensor, n_cls: int) -> torch.Tensor:
    """Per class t, the share of inputs not predicted t (what a flip rate towards t is a share of)."""
    return (clean_pred.view(-1, 1) != torch.arange(n_cls)).float().mean(0)


# ---------------------------------------------------------------------------------------------- reference


class ProbeHead(Head):
    """Logits alpha * head(out) + W z + b: a linear classifier over the standardised [first token; mean] z of an
    encoder's last hidden states, on top of a given head's own logits scaled per class (none: alpha = 0)."""

    def __init__(self, mu: torch.Tensor, sd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 alpha: torch.Tensor, head: Head | None = None):
        super().__init__()
        self.register_buffer("mu", mu)
        self.register_buffer("sd", sd)
        self.weight, self.bias, self.alpha = nn.Parameter(weight), nn.Parameter(bias), nn.Parameter(alpha)
        self.head = head
        self.num_labels = int(weight.shape[0])

    @staticmethod
    def features(out, inputs) -> torch.Tensor:
        return torch.cat([out.last_hidden_state[:, 0], pool(out, inputs, "mean")], -1)

    def forward(self, out, inputs) -> torch.Tensor:
        lg = F.linear((self.features(out, inputs) - self.mu) / self.sd, self.weight, self.bias)
        return lg + self.alpha * self.head(out, inputs) if self.head is not None else lg


STAND_IN_RIDGE = 1e-2  # the ridge penalty of the stand-in's linear probe (`fit_reference`)


def fit_reference(model: TaskModel, base_encoder: nn.Module, encode: InputEncoder, inputs: torch.Tensor | list[str],
                  steps: int = 300, lr: float = 1e-2, ridge: float = STAND_IN_RIDGE,
                  batch_size: int = 128) -> tuple[TaskModel, float]:
    """The suspect's stand-in on the pre-trained encoder, fitted with soft targets to the suspect's predictions
    on unlabeled inputs: the suspect's own head on the base's output, scaled per class (a head that fits the
    base, e.g. one frozen during fine-tuning, is used as it is), plus a ridge-penalised linear probe on the
    base's features (what a head trained with its encoder needs). What the base already represents (a topic
    word, a stroke that makes one digit look like another) moves the stand-in as it moves the suspect; a
    shortcut planted by fine-tuning moves the suspect only. Returns the stand-in and its agreement with the
    suspect on the inputs."""
    target = logits(model, encode, inputs).softmax(-1)
    head = copy.deepcopy(model.head).eval()
    feats, head_lg = [], []
    with torch.inference_mode():
        for b in batches(inputs, batch_size):
            x = encode(b)
            out = base_encoder(**x)
            feats.append(ProbeHead.features(out, x))
            head_lg.append(head(out, x))
    z, hl = torch.cat(feats).clone(), torch.cat(head_lg).clone()
    mu, sd = z.mean(0), z.std(0).clamp_min(1e-4)
    zz = (z - mu) / sd
    n_cls = target.shape[1]
    w = torch.zeros(n_cls, z.shape[1], requires_grad=True)
    bias = torch.zeros(n_cls, requires_grad=True)
    alpha = torch.ones(n_cls, requires_grad=True)
    opt = torch.optim.Adam([w, bias, alpha], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            lg = zz @ w.T + bias + alpha * hl
            loss = -(target * F.log_softmax(lg, -1)).sum(-1).mean() + ridge * (w ** 2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        agree = float(((zz @ w.T + bias + alpha * hl).argmax(-1) == target.argmax(-1)).float().mean())
    ref = TaskModel(base_encoder, ProbeHead(mu, sd, w.detach().clone(), bias.detach().clone(), alpha.detach().clone(),
                                            head), encode.modality).eval()
    ref.requires_grad_(False)
    return ref, agree


# ---------------------------------------------------------------------------------------------- text


def _placeholder_word(tokenizer) -> str:
    """The token that marks where a searched or found trigger token goes: the mask token, else the unknown."""
    word = getattr(tokenizer, "mask_token", None) or getattr(tokenizer, "unk_token", None)
    if word is None:
        raise SafeMergeError("the tokenizer has neither a mask nor an unknown token to mark the insertion")
    return word


def _placeholder(encode: InputEncoder) -> tuple[str, int]:
    word = _placeholder_word(encode.tokenizer)
    return word, int(encode.tokenizer.convert_tokens_to_ids(word))  # type: ignore[union-attr]


class _Slots:
    """Inputs with `n` consecutive placeholder tokens inserted at a seeded random word position among the first
    `max_position` (the same position for every n); rows whose slots did not survive truncation are dropped."""

    def __init__(self, encode: InputEncoder, texts: list[str], n: int, max_position: int, seed: int):
        word, self.ph = _placeholder(encode)
        inputs = encode(insert_placeholder(list(texts), " ".join([word] * n), seed, max_position))
        at = inputs["input_ids"] == self.ph
        self.kept = at.sum(1) == n
        if not self.kept.any():
            raise SafeMergeError("no input kept the inserted tokens within the model's max length")
        self.ids, self.mask, self.at = inputs["input_ids"][self.kept], inputs["attention_mask"][self.kept], at[self.kept]
        self.slot = (self.at.long().cumsum(1) - 1).clamp_min(0)  # which slot a placeholder position is
        self.n = n

    def ids_with(self, seqs: torch.Tensor) -> torch.Tensor:
        """[K, n] token runs -> input ids [K * N, L] with run k in the slots of every input."""
        fill = seqs[:, self.slot]  # [K, N, L]
        return torch.where(self.at, fill, self.ids).flatten(0, 1)

    def embeds_with(self, emb: torch.Tensor, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encoder inputs whose slots hold `vectors` [n, hidden] (differentiable) instead of word embeddings."""
        e = F.embedding(self.ids, emb)
        return {"inputs_embeds": torch.where(self.at.unsqueeze(-1), vectors[self.slot], e), "attention_mask": self.mask}


class _TextProbe:
    """One text model with its clean predictions, evaluating and searching inserted token runs."""

    def __init__(self, model: TaskModel, encode: InputEncoder, texts: list[str], max_position: int, seed: int,
                 chunk: int = 256):
        self.model, self.encode, self.texts = model, encode, list(texts)
        self.max_position, self.seed, self.chunk = max_position, seed, chunk
        self.clean_pred = predict(model, encode, self.texts).clone()
        self.emb = dict(model.encoder.named_parameters())[word_embedding_name(model.encoder)].detach()
        self.n_cls = model.head.num_labels
        self._slots: dict[int, _Slots] = {}
        tok = encode.tokenizer
        self.allowed = torch.ones(self.emb.shape[0], dtype=torch.bool)
        self.allowed[list(getattr(tok, "all_special_ids", []) or [])] = False
        self.allowed[_placeholder(encode)[1]] = False

    def slots(self, n: int) -> _Slots:
        if n not in self._slots:
            self._slots[n] = _Slots(self.encode, self.texts, n, self.max_position, self.seed)
        return self._slots[n]

    def evaluate(self, runs: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flip rates [K, C], target probabilities [K, C] and changed shares [K] of token runs (any lengths)."""
        for n in {len(r) for r in runs}:
            self.slots(n)  # built outside inference mode: the gradient steps reuse them
        with torch.inference_mode():
            return self._evaluate(runs)

    def _evaluate(self, runs: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out_f = torch.zeros(len(runs), self.n_cls)
        out_p, out_c = torch.zeros(len(runs), self.n_cls), torch.zeros(len(runs))
        for n in sorted({len(r) for r in runs}):
            idx = [i for i, r in enumerate(runs) if len(r) == n]
            s = self.slots(n)
            clean = self.clean_pred[s.kept]
            per = max(1, self.chunk // len(clean))
            for j in range(0, len(idx), per):
                part = idx[j:j + per]
                seqs = torch.tensor([runs[i] for i in part])
                mask = s.mask.repeat(len(part), 1)
                lg = self.model({"input_ids": s.ids_with(seqs), "attention_mask": mask}).view(len(part), len(clean), -1)
                f, p, c = _flip_stats(lg, clean)
                out_f[part], out_p[part], out_c[part] = f, p, c
        return out_f, out_p, out_c

    def token_scores(self, classes: list[int], run: tuple[int | None, ...], avoid: bool = False
                     ) -> dict[int, torch.Tensor]:
        """For each class t, every vocabulary token's first-order gain of mean log p_t (with `avoid`: of mean
        log(1 - p_t)) over the inputs not predicted t, when put in the free slot (None) of `run`, the other
        slots fixed (one HotFlip step)."""
        s = self.slots(len(run))
        clean = self.clean_pred[s.kept]
        free = run.index(None)
        fixed = torch.stack([self.emb[t] if t is not None else self.emb[s.ph] for t in run])
        v = fixed[free].clone().requires_grad_(True)
        vecs = torch.cat([fixed[:free], v.unsqueeze(0), fixed[free + 1:]])
        out: dict[int, torch.Tensor] = {}
        with torch.enable_grad():
            x = s.embeds_with(self.emb, vecs)
            lg = self.model.head(self.model.encoder(**x), x)
            logp = F.log_softmax(lg, -1)
            todo = [t for t in classes if (clean != t).any()]
            for i, t in enumerate(todo):
                others = clean != t
                if avoid:
                    rest = torch.logsumexp(lg.index_fill(1, torch.tensor([t]), float("-inf")), -1)
                    obj = (rest - torch.logsumexp(lg, -1))[others].mean()
                else:
                    obj = logp[others, t].mean()
                (g,) = torch.autograd.grad(obj, v, retain_graph=i < len(todo) - 1)
                out[t] = self.emb @ g
        return out

    def gradient_tokens(self, classes: list[int], run: tuple[int | None, ...], k: int,
                        reference: "_TextProbe | None" = None) -> dict[int, list[int]]:
        """For each class t, the k tokens with the largest `token_scores` gain towards t; with a `reference`
        probe, plus the gain of keeping the reference away from t (a trigger of this model, not of the base)."""
        scores = self.token_scores(classes, run)
        if reference is not None:
            scores = _plus(scores, reference.token_scores(classes, run, avoid=True))
        return self.top_tokens(scores, k)

    def top_tokens(self, scores: dict[int, torch.Tensor], k: int) -> dict[int, list[int]]:
        """Per class, the k allowed tokens of highest score."""
        return {t: v.masked_fill(~self.allowed, float("-inf")).topk(k).indices.tolist() for t, v in scores.items()}


def _plus(scores: dict[int, torch.Tensor], ref: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    return {t: v + ref[t] for t, v in scores.items() if t in ref}


def _whole_words(tokenizer, vocab_size: int) -> list[int]:
    """Vocabulary ids of plain alphabetic words (no word-piece continuations, special or unused tokens)."""
    toks = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [i for i, t in enumerate(toks) if isinstance(t, str) and i not in special
            and t.lstrip("Ġ▁").isalpha() and len(t.lstrip("Ġ▁")) >= 2 and not t.startswith("##")]


def _null_tokens(probe: _TextProbe, n: int, seed: int, exclude: set[int] = frozenset()) -> list[int]:  # type: ignore[assignment]
    """`n` random tokens: half drawn from the inputs' own tokens (natural words of the task), half from the
    vocabulary's plain words, seeded; the `exclude`d ones (the search's candidates) never."""
    g = torch.Generator().manual_seed(seed + 7)
    own = torch.tensor(sorted(set(probe.encode(probe.texts)["input_ids"].flatten().tolist()) - set(exclude)),
                       dtype=torch.long)  # empty where the candidates took every token of the inputs
    own = own[probe.allowed[own]]
    vocab = torch.tensor([t for t in _whole_words(probe.encode.tokenizer, probe.emb.shape[0]) if t not in exclude]
                         or list(range(probe.emb.shape[0])), dtype=torch.long)
    half = n // 2
    pick_own = own[torch.randperm(len(own), generator=g)[:half]].tolist() if len(own) else []
    pick_voc = vocab[torch.randperm(len(vocab), generator=g)[:n - len(pick_own)]].tolist()
    return list(dict.fromkeys(pick_own + pick_voc))


def _spelled_runs(tokenizer, tokens: list[int], max_len: int = 3) -> list[tuple[int, ...]]:
    """Runs of the given tokens that spell one word: a word start followed by continuation pieces ('##...')."""
    names = tokenizer.convert_ids_to_tokens(tokens)
    starts = [t for t, s in zip(tokens, names) if not str(s).startswith("##")]
    conts = [t for t, s in zip(tokens, names) if str(s).startswith("##")]
    runs: list[tuple[int, ...]] = [(a, b) for a in starts for b in conts]
    if max_len >= 3:
        runs += [(a, b, c) for a in starts for b in conts for c in conts if b != c][:32]
    return runs


def _one_word(tokenizer, run: tuple[int, ...]) -> bool:
    """Whether a run of several tokens spells one word (pieces of a word the tokenizer split)."""
    if len(run) < 2:
        return False
    text = tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(list(run))).strip()
    return bool(text) and not any(c.isspace() for c in text)


def _words_of(search: dict) -> torch.Tensor:
    """Per candidate, whether it is a run spelling one word (stored searches before the flag: '##' pieces)."""
    if "words" in search:
        return torch.as_tensor(search["words"], dtype=torch.bool)
    return torch.tensor([len(p := str(n).split()) > 1 and all(x.startswith("##") for x in p[1:])
                         for n in search["names"]], dtype=torch.bool)


def text_candidates(encoder: nn.Module, state: StateDict, head: Head, encode: InputEncoder, texts: list[str],
                    per_class: int = 3, max_position: int = 8, seed: int = 0) -> list[int]:
    """Per class t, the `per_class` tokens k maximising the first-order gain (e_k - e_placeholder) . grad of
    mean log p_t over the inputs not predicted t, with the token inserted at a random early position (one
    HotFlip step; special tokens excluded)."""
    probe = _TextProbe(_task_model(encoder, state, head, "text"), encode, texts, max_position, seed)
    if per_class <= 0:
        return []
    found = probe.gradient_tokens(list(range(probe.n_cls)), (None,), per_class)
    return list(dict.fromkeys(t for ts in found.values() for t in ts))


@torch.inference_mode()
def text_flip_rates(encoder: nn.Module, state: StateDict, head: Head, encode: InputEncoder, texts: list[str],
                    tokens: list[int] | list[tuple[int, ...]], max_position: int = 8, seed: int = 0) -> torch.Tensor:
    """[len(tokens), classes]: the share of inputs not predicted as class t that inserting token (or run) k
    (at the same random early position as `text_candidates`) sends to t."""
    probe = _TextProbe(_task_model(encoder, state, head, "text"), encode, texts, max_position, seed)
    runs = [tuple(t) if isinstance(t, (tuple, list)) else (int(t),) for t in tokens]
    return probe.evaluate(runs)[0]


WEIGHT_CANDIDATES = 32  # E-PUR's top tokens tried as single-token candidates (frozen heads rank triggers 18-26th)
JOINED_WEIGHT_CANDIDATES = 8  # of which the first are also joined into split words
COMPLETE_WORDS = 16  # frequent words of the inputs tried around E-PUR's top words (`_completed_runs`; 0: off)
DIFFERENTIAL_PER_CLASS = 8  # tokens per class from the differential HotFlip step (the model's own step: `per_class`)


def _frequent_words(probe: "_TextProbe", n: int, plain: set[int]) -> list[int]:
    """The `n` words of `plain` that occur in the most of the probe's inputs (the task's function words)."""
    ids = probe.encode(probe.texts)["input_ids"]
    counts: dict[int, int] = {}
    for row in ids.tolist():
        for t in set(row):
            if t in plain:
                counts[t] = counts.get(t, 0) + 1
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def _completed_runs(probe: "_TextProbe", rprobe: "_TextProbe", weights: list[int], n_words: int, seeds: int = 3,
                    keep: int = 8, screen: int = 8) -> list[tuple[int, ...]]:
    """Phrases of common words around the words whose embeddings drifted most: E-PUR ranks a phrase's rarer
    words first but its function words ("as", "by", "the") low, since they are frequent. The first `seeds`
    plain words of `weights`, alone and in their 2 best ordered pairs, each with one of the inputs' `n_words`
    most frequent words put before, between or after them, then the 2 best runs of two with a second one;
    screened on the first `screen` inputs by how much more they flip the model than its stand-in (the stand-in
    measured on the runs that flip the model most); the `keep` best runs of 2-3 tokens."""
    plain = set(_whole_words(probe.encode.tokenizer, probe.emb.shape[0]))
    base = [t for t in weights if t in plain][:seeds]
    words = _frequent_words(probe, n_words, plain - set(base))
    if not base or not words:
        return []
    small = _TextProbe(probe.model, probe.encode, probe.texts[:screen], probe.max_position, probe.seed)
    rsmall = _TextProbe(rprobe.model, rprobe.encode, rprobe.texts[:screen], rprobe.max_position, rprobe.seed)

    def around(runs: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return list(dict.fromkeys(r[:i] + (w,) + r[i:] for r in runs for w in words for i in range(len(r) + 1)))

    def best(runs: list[tuple[int, ...]], k: int) -> list[tuple[int, ...]]:
        if not runs:
            return []
        f = small.evaluate(runs)[0]  # the model first; the stand-in only on the runs that flip it most
        top = f.max(1).values.argsort(descending=True)[:4 * k].tolist()
        gap = (f[top] - rsmall.evaluate([runs[i] for i in top])[0]).max(1).values
        return [runs[top[i]] for i in gap.argsort(descending=True)[:k].tolist()]

    pairs = [(a, b) for a in base for b in base if a != b]
    pairs = best(pairs, 2) if len(pairs) > 2 else pairs
    first = around([(a,) for a in base] + pairs)
    twos = best([r for r in first if len(r) == 2], keep // 2)
    ranked = best([r for r in first if len(r) == 3] + around(twos[:2]), keep)
    return list(dict.fromkeys(twos + ranked))


def search_text(model: TaskModel, encode: InputEncoder, texts: list[str], extra_tokens: list[int] | None = None,
                per_class: int = 2, grow_classes: int = 2, grow_k: int = 2, max_len: int = 3, n_null: int = 24,
                max_position: int = 8, seed: int = 0, reference: TaskModel | None = None,
                complete: int = COMPLETE_WORDS, differential: int = DIFFERENTIAL_PER_CLASS) -> dict:
    """Trigger search and null distribution on one text model; returns the candidate runs with their flip
    rates, probabilities and changed shares, and the same for the null tokens (see `scan_state`). With a
    `reference` (`fit_reference`), candidates also come from the differential objective (towards t on the
    model, away from t on the reference), runs grow where the model flips more than the reference, and every
    candidate's flip rates on the reference come back too (`ref_flips`, `null_ref_flips`). The differential
    step gives `differential` tokens per class (at least `per_class`; with `per_class` 0, none)."""
    probe = _TextProbe(model, encode, texts, max_position, seed)
    rprobe = _TextProbe(reference, encode, texts, max_position, seed) if reference is not None else None
    n_cls = probe.n_cls
    source: dict[tuple[int, ...], str] = {}  # where each candidate came from (the first source that gave it)

    def add(rs, kind: str) -> None:
        for r in rs:
            source.setdefault(tuple(r), kind)

    if per_class > 0:
        own = probe.token_scores(list(range(n_cls)), (None,))  # one gradient pass serves both sources
        add([(t,) for ts in probe.top_tokens(own, per_class).values() for t in ts], "hotflip")
        if rprobe is not None:
            both = _plus(own, rprobe.token_scores(list(range(n_cls)), (None,), avoid=True))
            k = max(per_class, differential)
            add([(t,) for ts in probe.top_tokens(both, k).values() for t in ts], "differential")
    extra = list(dict.fromkeys(int(t) for t in (extra_tokens or [])))
    add([(t,) for t in extra], "weights")
    if extra and max_len >= 2:  # the first weight candidates joined: a word split into pieces, a phrase
        add(_spelled_runs(encode.tokenizer, extra[:JOINED_WEIGHT_CANDIDATES], 3)[:16], "weights")
        add([(a, b) for a in extra[:6] for b in extra[:6] if a != b], "weights")
        if max_len >= 3:
            add([(a, b, c) for a in extra[:3] for b in extra[:3] for c in extra[:3] if len({a, b, c}) == 3], "weights")
    runs = list(source)

    def measure(rs: list[tuple[int, ...]]) -> tuple[torch.Tensor, ...]:
        f, p, c = probe.evaluate(rs)
        rf = rprobe.evaluate(rs)[0] if rprobe is not None else torch.zeros_like(f)
        return f, p, c, rf

    flips, prob, changed, rflips = measure(runs)
    # grow runs: for the most flipped classes (beyond the reference), HotFlip a token before / after their best
    # run, then a 3rd
    for _ in range(max(0, min(max_len, 3) - 1)):
        gain = flips - rflips
        best_cls = gain.max(0).values.argsort(descending=True)[:grow_classes].tolist()
        new: list[tuple[int, ...]] = []
        for t in best_cls:
            run = runs[int(gain[:, t].argmax())]
            if len(run) >= max_len:
                continue
            for free in (len(run), 0):  # append, prepend
                shape = list(run)
                shape.insert(free, None)  # type: ignore[arg-type]
                toks = probe.gradient_tokens([t], tuple(shape), grow_k, rprobe).get(t, [])
                for k in toks:
                    r = list(run)
                    r.insert(free, k)
                    new.append(tuple(r))
        new = [r for r in dict.fromkeys(new) if r not in source]
        if not new:
            break
        add(new, "grown")
        f2, p2, c2, r2 = measure(new)
        runs += new
        flips, prob, changed = torch.cat([flips, f2]), torch.cat([prob, p2]), torch.cat([changed, c2])
        rflips = torch.cat([rflips, r2])
    null = [(t,) for t in _null_tokens(probe, n_null, seed, {t for r in runs for t in r})]
    if null:
        nf, np_, nc, nrf = measure(null)
    else:
        nf, np_, nc, nrf = torch.zeros(0, n_cls), torch.zeros(0, n_cls), torch.zeros(0), torch.zeros(0, n_cls)
    if complete > 0 and rprobe is not None and extra and max_len >= 2:  # phrases around the drifted words
        new = [r for r in _completed_runs(probe, rprobe, extra, complete) if r not in source and len(r) <= max_len]
        if new:
            add(new, "completed")
            f2, p2, c2, r2 = measure(new)
            runs += new
            flips, prob, changed = torch.cat([flips, f2]), torch.cat([prob, p2]), torch.cat([changed, c2])
            rflips = torch.cat([rflips, r2])
    names = [" ".join(encode.tokenizer.convert_ids_to_tokens(list(r))) for r in runs]  # type: ignore[union-attr]
    out = {"runs": runs, "names": names, "words": [_one_word(encode.tokenizer, r) for r in runs], "flips": flips,
           "prob": prob, "changed": changed, "groups": [len(r) for r in runs], "sources": [source[r] for r in runs],
           "null_flips": nf, "null_prob": np_, "null_changed": nc, "classes": n_cls,
           "others_share": _others_share(probe.clean_pred, n_cls)}
    if rprobe is not None:
        out.update(ref_flips=rflips, null_ref_flips=nrf)
    return out


# ---------------------------------------------------------------------------------------------- vision


MAX_CANDIDATE_BYTES = 4 << 30  # the vision search holds every patch candidate's mask and pattern at once


def patch_positions(resolution: int, side: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of a `side`-px square slid with `stride` over the image, the last row/column flush with
    the border (corner triggers sit there)."""
    if not 0 < side <= resolution:
        raise SafeMergeError(f"trigger side {side} does not fit a {resolution}-px image")
    starts = sorted(set(range(0, resolution - side + 1, max(1, stride))) | {resolution - side})
    return [(i, j) for i in starts for j in starts]


def vision_triggers(encoder: nn.Module, state: StateDict, head: Head, encode: InputEncoder, images: torch.Tensor,
                    sides: tuple[int, ...] = (8,), steps: int = 8, lr: float = 0.3, seed: int = 0,
                    strides: tuple[int, ...] | None = None, blend: float = 0.0,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patch-trigger inversion: for every class t, every square side and every position of a grid (`strides`,
    default: the side; the last row and column flush with the border), a pattern stamped into the inputs is
    optimised (Adam, `steps` steps, one input not predicted t per candidate and step, all candidates in one
    batch) towards t. Keeps, per class and side, the position with the lowest mean loss. With `blend` > 0, a
    pattern blended over the whole image with that weight is optimised per class too. Returns (masks
    [K, 1, R, R] in [0, 1], patterns [K, 3, R, R] in [0, 1], classes [K])."""
    model = _task_model(encoder, state, head, "vision")
    return _vision_triggers(model, encode, images, sides, steps, lr, seed, strides, blend)[:3]


def _vision_triggers(model: TaskModel, encode: InputEncoder, images: torch.Tensor, sides: tuple[int, ...],
                     steps: int, lr: float, seed: int, strides: tuple[int, ...] | None, blend: float,
                     clean_pred: torch.Tensor | None = None, screen: int = 0,
                     keep: int = 0, reference: TaskModel | None = None, sign: float = 0.0, per_class: int = 1,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n_cls, res = model.head.num_labels, images.shape[-1]
    clean_pred = predict(model, encode, images) if clean_pred is None else clean_pred
    g = torch.Generator().manual_seed(seed)
    pools = [(clean_pred != t).nonzero().flatten() for t in range(n_cls)]
    pools = [p if len(p) else torch.arange(len(images)) for p in pools]
    _check_candidates(res, sides, n_cls, blend, strides)
    groups: list[tuple[torch.Tensor, int]] = []  # (masks of one group's positions, positions per class)
    for i, side in enumerate(sides):
        side = min(side, res)
        stride = strides[i] if strides else side
        pos = patch_positions(res, side, stride)
        mask = torch.zeros(len(pos), 1, res, res)
        for k, (r, c) in enumerate(pos):
            mask[k, :, r:r + side, c:c + side] = 1
        groups.append((mask, len(pos)))
    if blend > 0:
        groups.append((torch.full((1, 1, res, res), float(blend)), 1))
    out_m, out_p, out_t, out_g = [], [], [], []
    for gid, (mask1, n_pos) in enumerate(groups):
        patch = gid < len(sides)  # the blend keeps Adam: signed steps saturate it into an adversarial texture
        mask = mask1.repeat(n_cls, 1, 1, 1)  # candidate c * n_pos + k: class c, position k
        target = torch.arange(n_cls).repeat_interleave(n_pos)
        p_logit = 0.5 * torch.randn(len(target), 3, res, res, generator=g)
        if n_pos > keep > 0 and screen > 0:  # successive halving: a few steps everywhere, the rest at the best
            _, loss = _optimise_patterns(model, encode, images, pools, mask, p_logit, target, screen, lr, g,
                                         reference, sign if patch else 0.0)
            top = loss.view(n_cls, n_pos).topk(keep, dim=1, largest=False).indices
            idx = (top + torch.arange(n_cls).view(-1, 1) * n_pos).flatten()
            mask, target, p_logit, n_pos = mask[idx], target[idx], p_logit[idx], keep
        p_logit, loss = _optimise_patterns(model, encode, images, pools, mask, p_logit, target, steps, lr, g,
                                           reference, sign if patch else 0.0)
        k = min(per_class, n_pos)
        best = (loss.view(n_cls, n_pos).topk(k, dim=1, largest=False).indices
                + torch.arange(n_cls).view(-1, 1) * n_pos).flatten()
        out_m.append(mask[best])
        out_p.append(torch.sigmoid(p_logit[best]).detach())
        out_t.append(target[best])
        out_g.append(torch.full((len(best),), gid))
    return torch.cat(out_m), torch.cat(out_p), torch.cat(out_t), torch.cat(out_g)


def _candidate_bytes(res: int, sides: tuple[int, ...], n_cls: int, blend: float,
                     strides: tuple[int, ...] | None = None) -> int:
    """Bytes of the masks and patterns a vision search holds at once (float32, every position and class)."""
    n_pos = sum(len(patch_positions(res, min(s, res), strides[i] if strides else min(s, res)))
                for i, s in enumerate(sides)) + (1 if blend > 0 else 0)
    return n_pos * n_cls * 4 * res * res * 4


def _check_candidates(res: int, sides: tuple[int, ...], n_cls: int, blend: float,
                      strides: tuple[int, ...] | None = None) -> None:
    """Refuse, before any work, a search whose patch candidates (masks and patterns of every position and
    class at once, float32) would exceed `MAX_CANDIDATE_BYTES`."""
    need = _candidate_bytes(res, sides, n_cls, blend, strides)
    if need > MAX_CANDIDATE_BYTES:
        raise SafeMergeError(f"scan: {res}-px inputs make {need / 2**30:.1f} GiB of patch candidates for {n_cls} "
                             f"classes; give the inputs at the side the model was trained at (--resolution, or "
                             f"--profile for zoo models)")


def _optimise_patterns(model: TaskModel, encode: InputEncoder, images: torch.Tensor, pools: list[torch.Tensor],
                       mask: torch.Tensor, p_logit: torch.Tensor, target: torch.Tensor, steps: int, lr: float,
                       g: torch.Generator, reference: TaskModel | None = None, sign: float = 0.0,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on the pattern logits of every candidate (one input not predicted as its class per candidate and
    step, all candidates in one batch); returns the logits and each candidate's mean loss over the second half.
    With `sign` > 0, signed-gradient steps of that size on the logits instead of Adam: patterns saturate to
    solid colours and sharp edges within a few steps, as planted patches are. With a `reference`, the loss
    also keeps the reference away from the class: -log(1 - p_ref(t))."""
    p_logit = p_logit.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([p_logit], lr=lr) if sign <= 0 else None
    loss_sum = torch.zeros(len(target))
    for step in range(steps):
        idx = torch.stack([pools[int(t)][torch.randint(len(pools[int(t)]), (1,), generator=g)][0] for t in target])
        x = encode(images[idx])
        with torch.enable_grad():
            xt = masked_pattern_inputs(x, mask, torch.sigmoid(p_logit), encode)
            loss = F.cross_entropy(model(xt), target, reduction="none")
            if reference is not None:
                lr_ = reference(xt)
                rest = torch.logsumexp(lr_.scatter(1, target.view(-1, 1), float("-inf")), -1)
                loss = loss - (rest - torch.logsumexp(lr_, -1))
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            loss.sum().backward()
        if step >= steps // 2:
            loss_sum += loss.detach()
        if opt is not None:
            opt.step()
        else:
            with torch.no_grad():
                p_logit -= sign * p_logit.grad.sign()
            p_logit.grad = None
    return p_logit.detach(), loss_sum


@torch.inference_mode()
def _vision_stats(model: TaskModel, encode: InputEncoder, images: torch.Tensor, clean_pred: torch.Tensor,
                  masks: torch.Tensor, patterns: torch.Tensor, chunk: int = 512
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flip rates [K, C], target probabilities [K, C], changed shares [K] of K stamped triggers."""
    x = encode(images)
    per = max(1, chunk // len(images))
    outs = []
    for j in range(0, len(masks), per):
        m, p = masks[j:j + per], patterns[j:j + per]
        k = len(m)
        xx = {"pixel_values": x["pixel_values"].repeat(k, 1, 1, 1)}
        lg = model(masked_pattern_inputs(xx, m.repeat_interleave(len(images), 0),
                                         p.repeat_interleave(len(images), 0), encode)).view(k, len(images), -1)
        outs.append(_flip_stats(lg, clean_pred))
    return tuple(torch.cat(z) for z in zip(*outs))  # type: ignore[return-value]


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


def random_triggers(resolution: int, n: int, sides: tuple[int, int] = (3, 8), blend: float = 0.15,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` random triggers (the null distribution): uniform-noise square patches of a random side in `sides`
    at random positions, and (every fourth) a noise image blended over the whole image with weight `blend`."""
    g = torch.Generator().manual_seed(seed + 11)
    masks = torch.zeros(n, 1, resolution, resolution)
    for k in range(n):
        if blend > 0 and k % 4 == 3:
            masks[k] = blend
            continue
        s = int(torch.randint(sides[0], sides[1] + 1, (1,), generator=g))
        r, c = torch.randint(0, resolution - s + 1, (2,), generator=g).tolist()
        masks[k, :, r:r + s, c:c + s] = 1
    return masks, torch.rand(n, 3, resolution, resolution, generator=g)


# the vision search's schedule (chosen on the tuning half, BENCHMARKS.md): 3 signed steps at every place of the
# grid (a scan's default: half the patch side), `steps` more at the 8 best places per class, the 3 best measured
VISION_SEARCH = {"screen": 3, "keep": 8, "sign": 2.0, "per_class": 3}


def search_vision(model: TaskModel, encode: InputEncoder, images: torch.Tensor, sides: tuple[int, ...] = (8,),
                  steps: int = 8, blend: float = 0.15, n_null: int = 24, seed: int = 0,
                  screen: int = VISION_SEARCH["screen"], keep: int = VISION_SEARCH["keep"],
                  reference: TaskModel | None = None, strides: tuple[int, ...] | None = None,
                  sign: float = VISION_SEARCH["sign"], per_class: int = VISION_SEARCH["per_class"]) -> dict:
    """Trigger search and null distribution on one vision model (see `scan_state`): every position is
    optimised for `screen` steps (a grid of `strides`, default each side), the `keep` best per class and side
    for `steps` more (with `screen` 0, every position for `steps`); patch patterns take signed steps of size
    `sign` (0: Adam), the blend Adam. The `per_class` positions of lowest loss per class and side are measured.
    With a `reference` (`fit_reference`), patterns are optimised to flip the model but not the reference, and
    every candidate's flip rates on the reference come back too (`ref_flips`, `null_ref_flips`)."""
    clean_pred = predict(model, encode, images)
    masks, patterns, classes, groups = _vision_triggers(model, encode, images, sides, steps, 0.3, seed, strides,
                                                        blend, clean_pred, screen, keep, reference, sign, per_class)
    flips, prob, changed = _vision_stats(model, encode, images, clean_pred, masks, patterns)
    nm, npat = random_triggers(images.shape[-1], n_null, seed=seed)
    nf, np_, nc = _vision_stats(model, encode, images, clean_pred, nm, npat)
    extra = {}
    if reference is not None:
        rcp = predict(reference, encode, images)
        own = F.one_hot(classes, flips.shape[1]).bool()
        extra = {"ref_flips": _vision_stats(reference, encode, images, rcp, masks, patterns)[0].masked_fill(~own, 0.0),
                 "null_ref_flips": _vision_stats(reference, encode, images, rcp, nm, npat)[0]}
    names = []
    for m in masks:
        if float(m.min()) > 0:
            names.append(f"blend {float(m.max()):.2g}")
        else:
            r, c = m[0].nonzero().min(0).values.tolist()
            names.append(f"{int(round(float(m.sum()) ** 0.5))}-px patch at ({r}, {c})")
    # a candidate searched for class t is scored on t only
    own = F.one_hot(classes, flips.shape[1]).bool()
    return {"masks": masks, "patterns": patterns, "names": names, "flips": flips.masked_fill(~own, 0.0),
            "candidate_classes": classes,
            "groups": groups.tolist(),
            "prob": prob.masked_fill(~own, 0.0), "changed": changed, "null_flips": nf, "null_prob": np_,
            "null_changed": nc, "classes": flips.shape[1], "others_share": _others_share(clean_pred, flips.shape[1]),
            **extra}


# ---------------------------------------------------------------------------------------------- confirmation


def _plain(v):
    """A stored search's entry as plain Python (tensors from a reloaded search become numbers / lists)."""
    return v.tolist() if isinstance(v, torch.Tensor) else v


CONFIRM_CANDIDATES = 16  # text: the search's best candidates re-measured on inputs it did not select them on
MIN_CONFIRM_INPUTS = 16  # fewer unseen inputs than this: the score stays the search's own


def confirm_search(search: dict, model: TaskModel, reference: TaskModel | None, encode: InputEncoder,
                   inputs: torch.Tensor | list[str], k: int = CONFIRM_CANDIDATES, seed: int = 0) -> dict:
    """The search's candidates measured again on unlabeled `inputs` the search did not see. The best of hundreds
    of candidates measured on a few dozen inputs overstates its flip rate (the winner's curse), most on fragile
    clean models; a planted trigger flips unseen inputs as well. Text: the `k` candidates of largest gap over
    the stand-in among those the stand-in rule scores (`STAND_IN_SKIP` left out); vision: every candidate and
    the null (the same random triggers). Returns a search of the same keys (scored by `score_search`) plus
    `index`, each candidate's index in `search`, and `n_inputs`."""
    n_cls = int(search["classes"])
    if "runs" in search:
        fl = torch.as_tensor(search["flips"])
        rf = torch.as_tensor(search["ref_flips"]) if "ref_flips" in search else torch.zeros_like(fl)
        drop = torch.tensor([x in STAND_IN_SKIP for x in search["sources"]], dtype=torch.bool)
        gap = (fl - rf).max(1).values.masked_fill(drop, float("-inf"))
        idx = gap.topk(min(k, int(torch.isfinite(gap).sum()))).indices.tolist()
        runs = [tuple(search["runs"][i]) for i in idx]
        probe = _TextProbe(model, encode, list(inputs), 8, seed)
        f, p, c = probe.evaluate(runs)
        out = {key: [_plain(search[key][i]) for i in idx] for key in ("runs", "names", "words", "groups", "sources")
               if key in search}
        out.update(flips=f, prob=p, changed=c, null_flips=torch.zeros(0, n_cls), null_prob=torch.zeros(0, n_cls),
                   null_changed=torch.zeros(0), others_share=_others_share(probe.clean_pred, n_cls))
        if reference is not None:
            out.update(ref_flips=_TextProbe(reference, encode, list(inputs), 8, seed).evaluate(runs)[0],
                       null_ref_flips=torch.zeros(0, n_cls))
    else:
        idx = list(range(len(search["names"])))
        own = F.one_hot(torch.as_tensor(search["candidate_classes"]), n_cls).bool()
        images = torch.as_tensor(inputs)
        masks, patterns = search["masks"], search["patterns"]
        cp = predict(model, encode, images)
        f, p, c = _vision_stats(model, encode, images, cp, masks, patterns)
        nm, npat = random_triggers(images.shape[-1], len(search["null_flips"]), seed=seed)
        nf, np_, nc = _vision_stats(model, encode, images, cp, nm, npat)
        out = {"names": list(search["names"]), "groups": _plain(torch.as_tensor(search["groups"])),
               "flips": f.masked_fill(~own, 0.0), "prob": p.masked_fill(~own, 0.0), "changed": c, "null_flips": nf,
               "null_prob": np_, "null_changed": nc, "others_share": _others_share(cp, n_cls)}
        if reference is not None:
            rcp = predict(reference, encode, images)
            rf = _vision_stats(reference, encode, images, rcp, masks, patterns)[0]
            out.update(ref_flips=rf.masked_fill(~own, 0.0),
                       null_ref_flips=_vision_stats(reference, encode, images, rcp, nm, npat)[0])
    return {**out, "classes": n_cls, "index": idx, "n_inputs": len(inputs), "modality": search_modality(search)}


# ---------------------------------------------------------------------------------------------- scoring


def scan_features(search: dict, other: str = "max", natural: bool = False) -> dict:
    """The calibration terms of a search (`search_text` / `search_vision`). Candidates come in groups of equal
    budget (text: runs of one length; vision: the patches, or the blend), and the random triggers of the null
    form one more group. Per group, the best flip rate towards each class; the class whose best stands out
    most above the best towards the `other` classes of the same group ("max": the runner-up; "median") is the
    suspected target, and the group with the largest such margin is kept (a search group before the null on a
    tie). A planted trigger makes one class an outlier, whether the search finds the trigger or random patterns
    already set it off; a fragile model lets several classes be reached. Returns the flip rate towards that
    class and the margin's other term, the class, the searched candidate with the highest flip rate towards it
    (its index and name), and the null's statistics and the candidate's concentration, for reporting. With
    `natural` and a stand-in's flips on the null, a class the stand-in already sends random triggers to is
    natural, not planted: the margin's other term is at least the stand-in's best random flip towards it."""
    if other not in ("max", "median"):
        raise SafeMergeError(f"unknown comparison '{other}' (known: max, median)")
    fl, nf = torch.as_tensor(search["flips"]), torch.as_tensor(search["null_flips"])
    n_cls = fl.shape[1]
    groups = torch.as_tensor(search["groups"])
    tops = [(int(gid), fl[groups == gid].max(0).values) for gid in sorted(set(groups.tolist()))]
    if len(nf):
        tops.append((-1, nf.max(0).values))  # the null
    nrf = torch.as_tensor(search.get("null_ref_flips", torch.zeros(0, n_cls)))
    floor = nrf.max(0).values if natural and len(nrf) else torch.zeros(n_cls)
    best: tuple[float, int, int, float, float] | None = None  # (margin, group, class, flip, other)
    for gid, top in tops:
        for t in range(n_cls):
            rest = torch.cat([top[:t], top[t + 1:]])
            o = float(rest.max() if other == "max" else rest.median()) if len(rest) else 0.0
            o = max(o, float(floor[t]))
            if best is None or float(top[t]) - o > best[0] + 1e-9:
                best = (float(top[t]) - o, gid, t, float(top[t]), o)
    assert best is not None
    _, gid, t, flip, o = best
    k = int(fl[:, t].argmax()) if gid < 0 else int(torch.where(groups == gid, fl[:, t], -1.0).argmax())
    mu, q95 = (nf[:, t].mean(), nf[:, t].quantile(0.95)) if len(nf) else (torch.tensor(0.0), torch.tensor(0.0))
    changed = max(float(torch.as_tensor(search["changed"])[k]), 1e-6)
    conc = min(1.0, max(0.0, float(fl[k, t]) * float(torch.as_tensor(search["others_share"])[t]) / changed))
    return {"flip": flip, "target": t, "index": k, "trigger": search["names"][k], "group": gid,
            "source": "null" if gid < 0 else "search", "null_mean": float(mu), "null_q95": float(q95),
            "other": o, "other_rule": other, "concentration": conc, "prob": float(torch.as_tensor(search["prob"])[k, t]),
            "per_class": [round(float(v), 4) for v in fl.max(0).values]}


def stand_in_features(search: dict, skip: tuple[str, ...] = (), max_tokens: int | None = None,
                      words: bool = False) -> dict:
    """The calibration terms of a search made with the model's stand-in (`fit_reference`): for every candidate
    and class, how much more often the candidate sends inputs to the class on the model than on the stand-in.
    The largest gap is the suspected backdoor: what the base's representation explains (a topic word, a shape)
    moves both, a planted shortcut only the model. `skip` leaves out candidates from those sources (text:
    'grown', 'hotflip', 'differential', 'weights', 'completed'); `max_tokens` scores text runs of at most that many tokens
    (longer runs, searched with more freedom, are adversarial on any fine-tuned model). Same keys as
    `scan_features`, "other" being the stand-in's flip rate for the same candidate and class. With `words`,
    longer runs that spell one word (a word the tokenizer split into pieces) are scored too."""
    fl, rf = torch.as_tensor(search["flips"]), torch.as_tensor(search["ref_flips"])
    nf, nrf = torch.as_tensor(search["null_flips"]), torch.as_tensor(search["null_ref_flips"])
    src = list(search.get("sources") or ["search"] * len(fl))
    drop = torch.tensor([x in skip for x in src], dtype=torch.bool)
    if max_tokens is not None and "sources" in search:  # text: groups are run lengths
        long = torch.as_tensor(search["groups"]) > max_tokens
        drop |= long & ~_words_of(search) if words else long
    gap = (fl - rf).masked_fill(drop.view(-1, 1), float("-inf"))
    if not torch.isfinite(gap).any():
        raise SafeMergeError("the scan has no candidate left to score")
    k, t = divmod(int(gap.argmax()), gap.shape[1])
    ngap = nf - nrf
    mu, q95 = (float(ngap[:, t].mean()), float(ngap[:, t].quantile(0.95))) if len(ngap) else (0.0, 0.0)
    changed = max(float(torch.as_tensor(search["changed"])[k]), 1e-6)
    conc = min(1.0, max(0.0, float(fl[k, t]) * float(torch.as_tensor(search["others_share"])[t]) / changed))
    return {"flip": float(fl[k, t]), "target": t, "index": k, "trigger": search["names"][k],
            "group": int(torch.as_tensor(search["groups"])[k]), "source": src[k], "null_mean": mu, "null_q95": q95,
            "other": float(rf[k, t]), "other_rule": "stand_in", "concentration": conc,
            "prob": float(torch.as_tensor(search["prob"])[k, t]), "agreement": search.get("agreement"),
            "per_class": [round(float(v), 4) for v in gap.max(0).values]}


def search_modality(search: dict) -> str:
    """'text' or 'vision': what a (stored) search was made on."""
    return search.get("modality") or ("text" if "sources" in search else "vision")


def score_search(search: dict, confirmed: bool = True) -> dict:
    """The features the shipped rule scores a stored search by: against the stand-in (`stand_in_features`)
    where the search was made with one and `STAND_IN_RULE` says so for its modality, else the class margin on
    the model alone (`scan_features`), with the natural discount where `NATURAL_RULE` says so and the stand-in
    was measured on the null. Where the search carries a confirmation (`confirm_search`), `CONFIRM_RULE` says
    so for its modality and `confirmed`, the rule scores the confirmed numbers ("index" stays the candidate's
    index in the search). Adds the rule's name ("rule": 'stand_in', 'natural' or 'margin'), the stand-in's flip
    rate for the chosen candidate ("stand_in") where there is one, and the modality."""
    modality = search_modality(search)
    if confirmed and search.get("confirm") and CONFIRM_RULE[modality]:
        conf = search["confirm"]
        feat = score_search({**conf, "agreement": search.get("agreement")}, confirmed=False)
        return {**feat, "index": int(conf["index"][feat["index"]]), "confirm_inputs": int(conf["n_inputs"])}
    if "ref_flips" in search and STAND_IN_RULE[modality]:
        feat = stand_in_features(search, skip=STAND_IN_SKIP)
        return {**feat, "stand_in": feat["other"], "modality": modality, "rule": "stand_in"}
    natural = NATURAL_RULE[modality] and len(torch.as_tensor(search.get("null_ref_flips", []))) > 0
    feat = scan_features(search, natural=natural)
    ref = (float(torch.as_tensor(search["ref_flips"])[feat["index"], feat["target"]]) if "ref_flips" in search
           else None)
    return {**feat, "stand_in": ref, "modality": modality, "agreement": search.get("agreement"),
            "rule": "natural" if natural else "margin"}


def risk_score(feat: dict) -> float:
    """Backdoor risk in [-1, 1]: how far the suspected target's best flip rate stands above its baseline: the
    model's stand-in on the base for the same candidate (`stand_in_features`), or without a base the best
    towards another class with the same budget (`scan_features`)."""
    return float(max(-1.0, min(1.0, feat["flip"] - feat["other"])))


def compact_search(search: dict) -> dict:
    """The numbers of a search as plain lists (to store and re-score): flips, probabilities, changed shares,
    groups, null flips, class shares and candidate names."""
    keys = ("flips", "prob", "changed", "groups", "null_flips", "null_prob", "others_share", "names", "ref_flips",
            "null_ref_flips", "agreement", "sources", "modality", "words", "classes", "index", "n_inputs")
    out = {k: (search[k].tolist() if isinstance(search[k], torch.Tensor) else
               list(search[k]) if isinstance(search[k], (list, tuple)) else search[k]) for k in keys if k in search}
    if search.get("confirm"):
        out["confirm"] = compact_search(search["confirm"])
    return out


@dataclass
class ScanResult:
    score: float  # backdoor risk (`risk_score`)
    flip_rate: float  # the best trigger's flip rate on the model
    null_flip_rate: float  # random tokens / patches towards the same class: mean flip rate (with a stand-in: gap)
    target: int  # that class
    trigger: str  # that trigger: the token(s), or the patch's size and place
    concentration: float = 0.0  # share of the inputs the trigger changed that went to the target
    other_classes: float = 0.0  # without a base: best flip rate towards another class with the same budget
    reference_flip_rate: float | None = None  # the trigger on the pre-trained encoder under the same head
    seconds: float = 0.0
    model: str = ""
    task: str = ""
    features: dict = field(default_factory=dict, repr=False)
    pattern: dict = field(default_factory=dict, repr=False)  # the trigger itself: {"run"} or {"mask", "pattern"}
    search: dict = field(default_factory=dict, repr=False)  # every candidate's numbers (`compact_search`)
    stand_in_flip_rate: float | None = None  # with a base: the trigger's flip rate on the model's stand-in
    threshold: float = 0.0  # the rule's flagging threshold (`risk_threshold`)
    confirm_inputs: int = 0  # unseen inputs the score was measured on (`confirm_search`); 0: the search's own

    @property
    def flagged(self) -> bool:
        return self.score >= self.threshold

    def row(self) -> dict:
        row = {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()
               if k not in ("features", "pattern", "search")}
        return {**row, "flagged": self.flagged}


# chosen on the tuning half of the held-apart population (BENCHMARKS.md, issue 17)
STAND_IN_RULE = {"text": True, "vision": False}  # score against the stand-in (else: the class margin)
STAND_IN_SKIP = ("grown",)  # text candidates scored against the stand-in: all but the runs grown by HotFlip
# Vision ships the class margin with the natural discount: with the search of `VISION_SEARCH`, on the 50-pair
# tuning half it scores AUROC 0.986 / TPR 0.93 against 0.980 / 0.79 without the discount.
NATURAL_RULE = {"text": False, "vision": True}  # the margin discounts classes the stand-in sends random triggers to
CONFIRM_RULE = {"text": False, "vision": False}  # scored on the candidates measured again on unseen inputs
# flagged at or above: just above the tuning half's 5%-FPR point (text: 1 of 20 clean tuning models above;
# vision margin: 1 of 25), per modality and rule ('stand_in', 'natural': with a base; 'margin': vision with a
# base, and without one)
THRESHOLDS = {("text", "stand_in"): 0.70, ("vision", "natural"): 0.24, ("text", "margin"): 0.2,
              ("vision", "margin"): 0.30}
RISK_THRESHOLD = 0.2  # the margin rule's threshold before the population's second version


def risk_threshold(modality: str | None, rule: str = "stand_in") -> float:
    """The score at or above which a model is flagged, for a modality and rule ('stand_in', 'natural' or
    'margin')."""
    return THRESHOLDS.get((modality or "text", rule), RISK_THRESHOLD)


def shipped_threshold(modality: str) -> float:
    """The threshold of the rule the scan ships for a modality when a base is given."""
    return risk_threshold(modality, "stand_in" if STAND_IN_RULE[modality] else
                          "natural" if NATURAL_RULE[modality] else "margin")



def trigger_flip_rate(encoder: nn.Module, state: StateDict, head: Head, encode: InputEncoder,
                      inputs: torch.Tensor | list[str], result: ScanResult, seed: int = 0) -> float:
    """The flip rate towards `result.target` of the trigger a scan found, on another encoder `state` (e.g. a
    purified one): how much of the found backdoor is left."""
    model = _task_model(encoder, state, head, encode.modality or "text")
    if "run" in result.pattern:
        probe = _TextProbe(model, encode, list(inputs), 8, seed)
        return float(probe.evaluate([tuple(result.pattern["run"])])[0][0, result.target])
    if "mask" not in result.pattern:
        raise SafeMergeError("this scan result carries no trigger to measure")
    cp = predict(model, encode, inputs)  # type: ignore[arg-type]
    return float(_vision_stats(model, encode, inputs, cp, result.pattern["mask"][None],  # type: ignore[arg-type]
                               result.pattern["pattern"][None])[0][0, result.target])


def stamp_found(result: ScanResult, x: torch.Tensor | list[str], tokenizer=None, seed: int = 0,
                max_position: int = 8) -> torch.Tensor | list[str]:
    """The inputs `x` with the trigger a scan found put in, as the search put it: text, one placeholder token
    per token of the found run inserted at a seeded random word position among the first `max_position`, which
    `trigger_encoder` reads as the run's own tokens (a run need not be spelled by any text: "##raz ##ix");
    vision, the found patch or blend stamped into the uint8 images. What purification unlearns
    (`purify.fine_mixing`)."""
    if "run" in result.pattern:
        if tokenizer is None:
            raise SafeMergeError("putting a text trigger in needs the model's tokenizer")
        word = _placeholder_word(tokenizer)
        return insert_placeholder(list(x), " ".join([word] * len(result.pattern["run"])), seed, max_position)
    if "mask" not in result.pattern:
        raise SafeMergeError("this scan result carries no trigger to put in")
    images = torch.as_tensor(x)
    m, p = result.pattern["mask"].float(), result.pattern["pattern"].float()
    if m.shape[-2:] != images.shape[-2:]:
        raise SafeMergeError(f"the found trigger is {tuple(m.shape[-2:])} px, the images {tuple(images.shape[-2:])}")
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    out = (1 - m) * images.float() + m * p * scale
    return out.round().clamp(0, 255).to(images.dtype) if images.dtype == torch.uint8 else out.to(images.dtype)


def trigger_encoder(result: ScanResult, encode: InputEncoder) -> InputEncoder:
    """The encoder that reads `stamp_found`'s texts: placeholders become the found run's tokens (vision, and a
    result without a token run: `encode` itself)."""
    if "run" not in result.pattern or encode.modality == "vision":
        return encode
    return RunEncoder(encode, _placeholder(encode)[1], tuple(result.pattern["run"]))  # type: ignore[return-value]


def scan_state(encoder: nn.Module, base: StateDict | None, state: StateDict, head: Head, encode: InputEncoder,
               inputs: torch.Tensor | list[str], extra_tokens: list[int] | None = None, per_class: int = 2,
               sides: tuple[int, ...] = (8,), steps: int = 8, seed: int = 0, *, n_null: int = 24,
               max_len: int = 3, blend: float = 0.15, reference: bool = False, stand_in: bool = True,
               fit_inputs: torch.Tensor | list[str] | None = None,
               confirm_inputs: torch.Tensor | list[str] | None = None,
               strides: tuple[int, ...] | None = None, vision_search: dict | None = None,
               stand_in_ridge: float = STAND_IN_RIDGE) -> ScanResult:
    """Risk score of one encoder `state` under `head` from unlabeled `inputs`: search triggers on the model,
    measure each against random tokens / patches on the same model and against the other classes
    (`scan_features`, `risk_score`). Text: HotFlip candidates (`per_class` per class) plus `extra_tokens`
    (e.g. E-PUR's ranking), runs of up to `max_len` tokens; vision: per class the best patches of each side of
    `sides` over a position grid (`strides`, default half of each side, or each side where that grid would
    not fit in memory) searched on the schedule of `VISION_SEARCH` (`vision_search` overrides it) with `steps`
    steps at the kept places, and a blend of weight `blend`. `n_null` random tokens / patches form the null. With a `base` and `stand_in`, the
    model's stand-in on the base (`fit_reference`, fitted on `fit_inputs`, default `inputs`, its probe's ridge
    penalty `stand_in_ridge`) steers the search and calibrates the flips. With `confirm_inputs` (other unlabeled
    inputs than `inputs`, at least `MIN_CONFIRM_INPUTS`) and where `CONFIRM_RULE` says so for the modality (neither ships it), the search's
    candidates are measured again on them and the score comes from those numbers (`confirm_search`; text:
    with a stand-in only)."""
    t0 = time.time()
    unknown = set(vision_search or {}) - set(VISION_SEARCH)
    if unknown:
        raise SafeMergeError(f"scan: unknown vision search option(s) {sorted(unknown)} "
                             f"(known: {sorted(VISION_SEARCH)})")
    model = _task_model(encoder, state, head, encode.modality or "text")
    if encode.modality == "vision":  # before any work
        res = torch.as_tensor(inputs).shape[-1]
        if strides is None:  # half the side; the side itself where that grid would not fit in memory
            strides = tuple(max(1, min(s, res) // 2) for s in sides)
            if _candidate_bytes(res, sides, model.head.num_labels, blend, strides) > MAX_CANDIDATE_BYTES:
                strides = tuple(min(s, res) for s in sides)
        _check_candidates(res, sides, model.head.num_labels, blend, strides)
    ref_model, agree = None, None
    if stand_in and base is not None:
        enc0 = copy.deepcopy(encoder)
        enc0.load_state_dict(base)
        ref_model, agree = fit_reference(model, enc0.eval(), encode, inputs if fit_inputs is None else fit_inputs,
                                         ridge=stand_in_ridge)
    if encode.modality == "text":
        search = search_text(model, encode, list(inputs), extra_tokens, per_class, max_len=max_len, n_null=n_null,
                             seed=seed, reference=ref_model)
    else:
        search = search_vision(model, encode, inputs, sides, steps, blend, n_null, seed,  # type: ignore[arg-type]
                               reference=ref_model, strides=strides, **(vision_search or {}))
    if agree is not None:
        search["agreement"] = agree
    search["modality"] = encode.modality or "text"
    text = search["modality"] == "text"
    if confirm_inputs is not None and len(confirm_inputs) >= MIN_CONFIRM_INPUTS and CONFIRM_RULE[search["modality"]] \
            and (ref_model is not None or not text):
        search["confirm"] = confirm_search(search, model, ref_model, encode, confirm_inputs, seed=seed)
    feat = score_search(search)
    ref = None
    if reference and base is not None:
        base_model = _task_model(encoder, base, head, encode.modality or "text")
        k, t = feat["index"], feat["target"]
        if encode.modality == "text":
            probe = _TextProbe(base_model, encode, list(inputs), 8, seed)
            ref = float(probe.evaluate([search["runs"][k]])[0][0, t])
        else:
            cp = predict(base_model, encode, inputs)  # type: ignore[arg-type]
            ref = float(_vision_stats(base_model, encode, inputs, cp, search["masks"][k:k + 1],  # type: ignore[arg-type]
                                      search["patterns"][k:k + 1])[0][0, t])
    k = feat["index"]
    pattern = ({"run": search["runs"][k]} if "runs" in search else
               {"mask": search["masks"][k], "pattern": search["patterns"][k]})
    stand = feat["other_rule"] == "stand_in"
    return ScanResult(risk_score(feat), feat["flip"], feat["null_mean"], feat["target"], feat["trigger"],
                      feat["concentration"], 0.0 if stand else feat["other"], ref, time.time() - t0, features=feat,
                      pattern=pattern, search=compact_search(search), stand_in_flip_rate=feat["stand_in"],
                      threshold=risk_threshold(encode.modality, feat["rule"]),
                      confirm_inputs=int(feat.get("confirm_inputs", 0)))


def auroc(positives: list[float], negatives: list[float]) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative (ties count
    half), i.e. the Mann-Whitney U statistic over all pairs."""
    if not positives or not negatives:
        raise SafeMergeError("AUROC needs at least one positive and one negative score")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return float(wins / (len(positives) * len(negatives)))


def tpr_at_fpr(positives: list[float], negatives: list[float], fpr: float = 0.05) -> float:
    """Share of positives scoring above the threshold that at most `fpr` of the negatives exceed (strictly)."""
    if not positives or not negatives:
        raise SafeMergeError("TPR at a given FPR needs at least one positive and one negative score")
    neg = sorted(negatives, reverse=True)
    allowed = int(math.floor(fpr * len(neg)))
    threshold = neg[allowed] if allowed < len(neg) else float("-inf")
    return float(sum(p > threshold for p in positives) / len(positives))


CONFIRM_INPUTS = 96  # unseen inputs the candidates are measured again on (`confirm_search`)


def scan_suspect(s, n_inputs: int = 32, weight_candidates: int = WEIGHT_CANDIDATES, per_class: int = 2,
                 sides: tuple[int, ...] = (8,), steps: int = 8, seed: int = 0, fit_inputs: int = 256,
                 confirm: int = CONFIRM_INPUTS, **options) -> ScanResult:
    """Scan a loaded `purify.Suspect` with `scan_state`. Only unlabeled inputs are used: the first `n_inputs`
    of its held-out examples for the search, the first `fit_inputs` to fit the model's stand-in on the base
    (the `confirm` after the search's to measure its candidates again), and (text) its unlabeled texts to count
    token frequencies for the `weight_candidates` top tokens of E-PUR's ranking. `options` go to `scan_state`."""
    from .purify import e_pur, token_frequencies, word_embedding_key

    t0 = time.time()
    x = s.val.x[:n_inputs]
    extra = None
    if s.backbone.modality == "text" and weight_candidates > 0:
        key = word_embedding_key(s.base)
        freq = token_frequencies(s.encode.tokenizer, list(s.texts or s.val.x), s.base[key].shape[0],
                                 s.encode.max_length)
        extra = e_pur(s.base, s.state, freq, top_n=0, embedding_key=key).ranking[:weight_candidates]
    options.setdefault("fit_inputs", s.val.x[:max(fit_inputs, len(x))])
    options.setdefault("confirm_inputs", s.val.x[n_inputs:n_inputs + confirm])
    r = scan_state(s.backbone.model, s.base, s.state, s.head, s.encode, x, extra, per_class, sides, steps, seed,
                   **options)
    r.model, r.task, r.seconds = str(s.path), s.task, time.time() - t0
    return r
