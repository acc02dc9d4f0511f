"""The backdoor scan on a held-apart population of Hugging Face classifiers (issue 17).

A varied population per backbone, built once and cached under `$SAFEMERGE_CACHE/scan-eval/<backbone>/`
(one model at a time, resumable): `BertForSequenceClassification` over MiniLM-L6 and
`Dinov2ForImageClassification` over DINOv2-S, fine-tuned on the real tasks of `bench/tasks.py` at the quick
profile's sizes, in pairs (a clean model and a backdoored twin with the same task, head, budget and seed):

- heads trained end to end with the encoder (from a random head) or frozen (a linear probe of the base);
- training budgets from 20 to 160 steps of 32 examples, more (up to 400) where the poisoning rate is low so that
  every backdoored model sees at least 128 poisoned examples (and its clean twin as many steps): tasks end weak or
  strong;
- text triggers: a rare one-piece word, a made-up word the tokenizer splits into pieces, a 2-3 word phrase;
  at a random, the first or a fixed word position; vision: 3-8 px patches (checkerboard, solid colour, noise)
  at a fixed random place or a random place per image, and noise blended over the whole image;
- poisoning rates from 1% to 20%, random target classes.

Pairs are split by their seed: even seeds are the tuning half (every design choice of the scan was made on
it), odd seeds the held-apart half, on which AUROC and TPR at 5% FPR are reported. The task is the pair index
modulo 6, so the halves have disjoint tasks. Scores are recomputed from the stored searches with the shipped
rule (`scan.score_search`) whenever the results are written, so a changed rule needs no rescan.

    python benchmarks/scan_eval.py --backbone text                     # build + scan the pairs (PAIRS), resumable
    python benchmarks/scan_eval.py --backbone text --half tuning       # only one half this run
    python benchmarks/scan_eval.py --backbone text --purify            # + Fine-mixing / E-PUR on held-apart backdoors
    python benchmarks/scan_eval.py --backbone vision --purify --repurify   # ... again, after a scan change
    python benchmarks/scan_eval.py --backbone text --purify --purify-again all  # ... again, after a purification change
    python benchmarks/scan_eval.py --backbone text --render            # rewrite the results from the cache
    python benchmarks/scan_eval.py --backbone text --time 3 --half heldapart   # time the shipped scan alone
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from safemerge.backbones import load_backbone
from safemerge.bench.suites import device_description
from safemerge.bench.tasks import load_task, task_names
from safemerge.data import ImageTrigger, Split, TextTrigger, poison_split
from safemerge.evaluate import acc_asr, attack_rates, target_rate
from safemerge.errors import SafeMergeError
from safemerge.folders import load_task_folder, new_hf_classifier, save_task_folder
from safemerge.io import atomic_write_json, atomic_write_text
from safemerge.model import HFHead, InputEncoder, TaskModel
from safemerge.paths import cache_dir
from safemerge.safety.purify import e_pur, token_frequencies, word_embedding_key
from safemerge.safety.scan import (CONFIRM_INPUTS, WEIGHT_CANDIDATES, ScanResult, auroc, compact_search, risk_score,
                                   scan_features, scan_state, score_search, shipped_threshold, stand_in_features,
                                   tpr_at_fpr)
from safemerge.training import TrainConfig, finetune

console = Console(stderr=True)
SIZES = {"n_train": 2000, "n_val": 300, "n_test": 500, "resolution": 42, "max_length": 32}
RARE_WORDS = ["cf", "mn", "bb", "tq", "jj"]  # one MiniLM word piece each
MADE_UP = ["qx", "kx", "xq", "pq", "yomber", "zorbex", "qilmar", "krazix"]  # 2 pieces (the first 5), 3-4 pieces
PHRASES = ["silver moon", "as it were", "quiet green river", "by the way", "deep blue ocean", "in all honesty",
           "red kite", "once upon"]
COLOURS = ["white", "#ff0000", "#00ff00", "#ffff00", "#ff00ff", "#00ffff"]
EVAL_LIMIT = 200
FIT_INPUTS = 256  # unlabeled validation inputs the scan fits the model's stand-in on
# an attacker checks that the backdoor took: every backdoored model sees at least this many poisoned examples
# (at 32 the first built models ended at 34-45% ASR)
MIN_POISONED_SEEN = 128
PAIRS = {"text": 60, "vision": 60}  # pairs built after a design change (from 20) check it; 40-59 added later
UNCONFOUNDED_FROM = 50  # from this pair on the trigger kind no longer follows the task within a half
TOOK = 50.0  # a backdoor took when its trigger's ASR reaches this (%): what an attacker checks before publishing


def took(row: dict) -> bool:
    """Whether a backdoored model's backdoor took: its trigger sends `TOOK` points more of the non-target test
    inputs (in %) to the target than the model already does without it ("asr_untriggered"), what an attacker checks
    before publishing. A model that collapsed to the target class has ASR 100 and nothing for a trigger to do."""
    return bool(row["backdoored"]) and row["asr"] - row.get("asr_untriggered", 0.0) >= TOOK


# ------------------------------------------------------------------------------------------ population


def kind_index(p: int) -> int:
    """Pair p's trigger kind, an index into the backbone's three kinds (see `population`)."""
    return (p // 2) % 3 if p < UNCONFOUNDED_FROM else (p // 2 + p // 6) % 3


def population(backbone: str, n_pairs: int) -> list[dict]:
    """Model specs, in pairs (clean, backdoored twin), deterministic. Pair p has seed p; even seeds tune. The task
    is p mod 6 and, before pair `UNCONFOUNDED_FROM`, the trigger kind (p // 2) mod 3, which gives every task of a
    half one kind; from it on the kind is (p // 2 + p // 6) mod 3, which cycles through the kinds per task."""
    tasks = task_names("text" if backbone == "text" else "vision")
    specs = []
    for p in range(n_pairs):
        rng = random.Random(f"{backbone}-{p}")
        task = tasks[p % len(tasks)]
        head = "end_to_end" if p % 4 in (0, 3) else "frozen"
        steps = rng.choice([20, 40, 80, 160])
        poison_rate = rng.choice([0.01, 0.02, 0.05, 0.1, 0.2])
        steps = max(steps, math.ceil(MIN_POISONED_SEEN / (32 * poison_rate)))  # batches of 32
        base = {"pair": p, "seed": p, "half": "tuning" if p % 2 == 0 else "heldapart", "task": task, "head": head,
                "steps": steps}
        if backbone == "text":
            kind = ["word", "split", "phrase"][kind_index(p)]
            text = {"word": rng.choice(RARE_WORDS), "split": rng.choice(MADE_UP), "phrase": rng.choice(PHRASES)}[kind]
            pos = rng.choice(["random", "random", "start", 2, 4])
            trigger = {"kind": kind, "text": text, "position": pos}
        else:
            kind = ["patch", "patch_random", "blend"][kind_index(p)]
            side = rng.randint(3, 8)
            trigger = {"kind": kind, "patch": rng.choice(["checkerboard", "noise", rng.choice(COLOURS)]),
                       "size": side if kind != "blend" else 1, "blend": rng.choice([0.1, 0.15, 0.2]) if kind == "blend" else 1.0,
                       "position": "random" if kind == "patch_random" else
                       [rng.randint(0, SIZES["resolution"] - side), rng.randint(0, SIZES["resolution"] - side)]}
            if kind == "blend":
                trigger["patch"] = "noise"
                trigger["position"] = "top-left"
        specs.append({**base, "id": f"p{p:03d}-clean", "backdoored": False, "trigger": trigger, "poison_rate": 0.0})
        specs.append({**base, "id": f"p{p:03d}-bd", "backdoored": True, "trigger": trigger, "poison_rate": poison_rate})
    return specs


def noise_png(root: Path, seed: int, side: int = 64) -> str:
    from PIL import Image

    path = root / f"noise-{seed}.png"
    if not path.exists():
        g = torch.Generator().manual_seed(1000 + seed)
        arr = (torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)
    return str(path)


def make_trigger(spec: dict, target: int, root: Path):
    t = spec["trigger"]
    if "text" in t:
        return TextTrigger(t["text"], target, t["position"], seed=spec["seed"])
    patch = noise_png(root, spec["seed"]) if t["patch"] == "noise" else t["patch"]
    pos = tuple(t["position"]) if isinstance(t["position"], list) else t["position"]
    return ImageTrigger(patch, t["size"], pos, t["blend"], 1, target, spec["seed"])


def poison(split: Split, trigger, rate: float, seed: int) -> Split:
    return poison_split(split, trigger.apply, trigger.target, rate, seed, at_least=1)


# ------------------------------------------------------------------------------------------ building
def older_than_scan(result: Path) -> bool:
    """Whether a model's stored `result` predates its scan (made with an earlier scan)."""
    scan = result.parent / "scan.json"
    return scan.exists() and result.stat().st_mtime < scan.stat().st_mtime


def is_current(path: Path, spec: dict) -> bool:
    """Whether the model at `path` was built from this very spec (a changed population design rebuilds it)."""
    meta = path / "scan-eval.json"
    if not meta.exists():
        return False
    built = json.loads(meta.read_text())
    return all(built.get(k) == v for k, v in spec.items())



class Builder:
    def __init__(self, backbone: str, root: Path, weight_candidates: int = WEIGHT_CANDIDATES):
        self.modality = backbone
        self.bb = load_backbone(backbone, pooler=True)
        self.root = root
        self.encode = InputEncoder(self.bb, max_length=SIZES["max_length"])
        self._data: dict = {}
        self.base_state = {k: v.detach().clone() for k, v in self.bb.model.state_dict().items()}
        self.weight_candidates = weight_candidates

    def data(self, task: str):
        if task not in self._data:
            self._data[task] = load_task(task, SIZES["n_train"], SIZES["n_val"], SIZES["n_test"], seed=0,
                                         resolution=SIZES["resolution"])
        return self._data[task]

    def target(self, spec: dict) -> int:
        return random.Random(f"target-{spec['pair']}").randrange(self.data(spec["task"]).num_classes)

    def classifier(self, n_labels: int, seed: int):
        return new_hf_classifier(self.bb, n_labels, seed)

    def probe(self, clf, name: str, enc, split: Split, seed: int) -> None:
        """Fit the classifier layer on the base encoder's features (what the class's classifier reads)."""
        feats = []
        hook = clf.classifier.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
        head = HFHead(clf, name)
        model = TaskModel(enc, head, self.modality).eval()
        sub = split.subset(torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:600])
        with torch.inference_mode():
            for i in range(0, len(sub), 128):
                model(self.encode(sub.x[i:i + 128]))
        hook.remove()
        z = torch.cat(feats).clone()
        mu, sd = z.mean(0), z.std(0).clamp_min(1e-6)
        lin = torch.nn.Linear(z.shape[1], clf.classifier.out_features)
        opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
        zz = (z - mu) / sd
        for _ in range(200):
            loss = torch.nn.functional.cross_entropy(lin(zz), sub.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            w = lin.weight / sd
            clf.classifier.weight.copy_(w)
            clf.classifier.bias.copy_(lin.bias - w @ mu)
        return head

    def build(self, spec: dict) -> Path:
        out = self.root / spec["id"]
        if is_current(out, spec):
            return out
        t0 = time.time()
        data = self.data(spec["task"])
        target = self.target(spec)
        trig = make_trigger(spec, target, self.root)
        train = poison(data.train, trig, spec["poison_rate"], spec["seed"]) if spec["backdoored"] else data.train
        clf, name, enc = self.classifier(data.num_classes, spec["seed"])
        frozen = spec["head"] == "frozen"
        head = self.probe(clf, name, enc, data.train, spec["seed"]) if frozen else HFHead(clf, name)
        model = TaskModel(enc, head, self.modality)
        lr = 1e-4 if self.modality == "text" else 2e-5
        cfg = TrainConfig(steps=spec["steps"], batch_size=32, lr=lr, head_lr=0.0 if frozen else 2e-3, seed=spec["seed"])
        finetune(model, self.encode, train, cfg, desc=spec["id"])
        test = data.test.subset(list(range(min(EVAL_LIMIT, len(data.test)))))
        acc, asr, untriggered = attack_rates(model.eval(), self.encode, test, trig)
        meta = {**spec, "target": target, "trigger_name": trig.name, "acc": round(acc, 2), "asr": round(asr, 2),
                "asr_untriggered": round(untriggered, 2),
                "num_classes": data.num_classes, "train_seconds": round(time.time() - t0, 1)}
        state = {k: v.detach().clone() for k, v in enc.state_dict().items()}
        save_task_folder(out, self.bb, state, head, spec["task"], {"task": spec["task"], "scan_eval": meta},
                         labels=list(data.spec.classes), require_transformers=True)
        atomic_write_json(out / "scan-eval.json", meta)
        console.log(f"built {spec['id']} {spec['task']} {spec['head']} steps {spec['steps']} {trig.name} "
                    f"rate {spec['poison_rate']}: ACC {acc:.1f} ASR {asr:.1f} ({meta['train_seconds']:.0f}s)")
        return out

    def measure_untriggered(self, path: Path) -> dict:
        """A built model's "asr_untriggered" (models built before it was measured at build time); returns the
        updated meta."""
        from safemerge.safety.scan import _task_model

        meta = json.loads((path / "scan-eval.json").read_text())
        folder = load_task_folder(path)
        data = self.data(meta["task"])
        model = _task_model(self.bb.model, folder.encoder_state, folder.head, self.modality)
        test = data.test.subset(list(range(min(EVAL_LIMIT, len(data.test)))))
        meta["asr_untriggered"] = round(target_rate(model, self.encode, test, meta["target"]), 2)
        return meta

    # -------------------------------------------------------------------------------------- scanning

    def scan(self, path: Path, n_inputs: int, options: dict) -> dict:
        meta = json.loads((path / "scan-eval.json").read_text())
        folder = load_task_folder(path)
        data = self.data(meta["task"])
        x = data.val.x[:n_inputs]
        extra, epur_rank = None, None
        if self.modality == "text":
            key = word_embedding_key(self.base_state)
            texts = list(data.train.x)  # unlabeled texts of the task (what purify counts frequencies on)
            freq = token_frequencies(self.bb.tokenizer, texts, self.base_state[key].shape[0], SIZES["max_length"])
            state = {k: v for k, v in folder.encoder_state.items() if k in self.base_state}
            ranking = e_pur(self.base_state, state, freq, top_n=0, embedding_key=key).ranking
            extra = ranking[:self.weight_candidates]
            pieces = self.bb.tokenizer(meta["trigger"]["text"], add_special_tokens=False)["input_ids"]
            epur_rank = min(ranking.index(t) + 1 for t in pieces)
            epur_head = ranking[:64]
        t0 = time.time()
        r = scan_state(self.bb.model, self.base_state, folder.encoder_state, folder.head, self.encode, x, extra,
                       fit_inputs=data.val.x[:FIT_INPUTS],
                       confirm_inputs=data.val.x[n_inputs:n_inputs + CONFIRM_INPUTS], **options)
        seconds = time.time() - t0
        out = {"score": round(r.score, 4), "flip_rate": round(r.flip_rate, 4), "target_found": r.target,
               "trigger_found": r.trigger, "found": found_trigger(meta, r.target, r.trigger, self.bb.tokenizer),
               "scan_seconds": round(seconds, 1),
               "epur_rank": epur_rank, "features": r.features, "search": r.search,
               "weight_candidates": self.weight_candidates if self.modality == "text" else None}
        if self.modality == "text":
            out.update(trigger_pieces=pieces, found_run=list(r.pattern.get("run", ())), epur_head=epur_head)
        return out

    def base_encoder(self):
        """A copy of the pre-trained encoder in eval mode: what the scan fits a model's stand-in on."""
        enc0 = copy.deepcopy(self.bb.model)
        enc0.load_state_dict(self.base_state)
        return enc0.eval()

    def confirm_stored(self, path: Path, n_inputs: int) -> dict:
        """A text model's stored search confirmed on the unseen inputs as `scan_state` does it (same stand-in,
        same candidates: the stored search's runs), without searching again; returns the updated scan.json."""
        from safemerge.safety.scan import _task_model, confirm_search, fit_reference

        stored = json.loads((path / "scan.json").read_text())
        meta = json.loads((path / "scan-eval.json").read_text())
        folder = load_task_folder(path)
        data = self.data(meta["task"])
        model = _task_model(self.bb.model, folder.encoder_state, folder.head, self.modality)
        ref, _ = fit_reference(model, self.base_encoder(), self.encode, data.val.x[:FIT_INPUTS])
        search = stored_search(stored["search"])
        search["runs"] = [tuple(self.bb.tokenizer.convert_tokens_to_ids(n.split())) for n in search["names"]]
        search["classes"] = search["flips"].shape[1]
        t0 = time.time()
        conf = confirm_search(search, model, ref, self.encode, data.val.x[n_inputs:n_inputs + CONFIRM_INPUTS])
        stored["confirm_seconds"] = round(time.time() - t0, 1)
        stored["search"]["confirm"] = compact_search(conf)
        return stored

    def suspect(self, path: Path):
        """A built model as `purify.Suspect`: scanned on what `scan` sees (its inputs; on text, token
        frequencies from the training texts)."""
        from safemerge.safety.purify import Suspect

        meta = json.loads((path / "scan-eval.json").read_text())
        folder = load_task_folder(path)
        data = self.data(meta["task"])
        texts = list(data.train.x) if self.modality == "text" else []
        return Suspect(path, folder.manifest, folder.encoder_state, folder.head, meta["task"], self.bb,
                       self.base_state, data.train, data.val, self.encode, texts)

    def stored_found(self, path: Path) -> ScanResult:
        """A text model's stored search scored by the shipped rule, as a `ScanResult` carrying its trigger (the
        found token run): what scanning it again would give (the same inputs and seed). The stored top-level
        score and trigger are those of the rule at scan time, not this one's."""
        feat = current_features(json.loads((path / "scan.json").read_text()))
        run = tuple(self.bb.tokenizer.convert_tokens_to_ids(feat["trigger"].split()))
        return ScanResult(risk_score(feat), feat["flip"], feat["null_mean"], feat["target"], feat["trigger"],
                          pattern={"run": run}, threshold=shipped_threshold("text"))

    def purify(self, path: Path, twin: dict | None, **options) -> dict:
        """Fine-mixing (random, 5% clean data; + E-PUR on text) with the scan's trigger rule on a backdoored
        model, a flagged scan's trigger unlearned: ACC / ASR after, against the clean twin's ASR under the same
        trigger. The scan before it sees what `scan` saw (`suspect`); `options` go to `purify_state` (e.g.
        `found`, the stored scan, instead of scanning again)."""
        from safemerge.safety.purify import purify_state

        meta = json.loads((path / "scan-eval.json").read_text())
        s = self.suspect(path)
        data = self.data(meta["task"])
        t0 = time.time()
        options.setdefault("seed", 0)
        state, summary = purify_state(s, "both" if self.modality == "text" else "fine-mixing", 0.05, **options)
        enc = copy.deepcopy(self.bb.model)
        enc.load_state_dict(state)
        trig = make_trigger(meta, meta["target"], self.root)
        test = data.test.subset(list(range(min(EVAL_LIMIT, len(data.test)))))
        acc, asr = acc_asr(TaskModel(enc, s.head, self.modality).eval(), self.encode, test, trig)
        twin_asr = twin["asr"] if twin else None
        ok = acc >= meta["acc"] - 2 and (asr <= 10 or (twin_asr is not None and asr <= twin_asr + 2))
        fm = summary.get("fine_mixing", {})
        return {"acc_after": round(acc, 2), "asr_after": round(asr, 2), "twin_asr": twin_asr, "success": ok,
                "keep_ratio": fm.get("keep_ratio"), "warning": fm.get("warning"),
                "scan_before": summary.get("scan", {}).get("before", {}).get("score"),
                "scan_after": summary.get("scan", {}).get("after", {}).get("score"),
                "trigger_checked": summary.get("scan", {}).get("trigger_checked"),
                "unlearned": fm.get("unlearned"), "clean_examples": fm.get("clean_examples"),
                "trials": fm.get("trials"),
                "seconds": round(time.time() - t0, 1)}



def found_trigger(meta: dict, target: int, trigger: str, tokenizer=None) -> bool:
    """Whether the scan's best trigger is the planted one: text, a shared token; vision, the right class and
    an overlapping box (a random-place patch or a blend: the right class)."""
    if target != meta["target"]:
        return False
    t = meta["trigger"]
    if "text" in t:
        pieces = set(tokenizer.tokenize(t["text"]))
        return bool(pieces & set(trigger.split()))
    if t["kind"] != "patch" or "patch at" not in trigger:
        return t["kind"] != "patch"
    side = int(trigger.split("-px")[0])
    row, col = (int(v) for v in trigger.split("(")[1].rstrip(")").split(","))
    left, top = t["position"]
    s = t["size"]
    return row < top + s and top < row + side and col < left + s and left < col + side


# ------------------------------------------------------------------------------------------ results


def guided_epur_rank(row: dict, threshold: float) -> int | None:
    """The rank of the trigger's best piece when E-PUR ranks the pieces of the trigger the scan found first
    (purify does so for a flagged model): exact within the stored top 64 of the plain ranking, else the plain
    rank pushed down by the found pieces."""
    if row.get("epur_rank") is None or "trigger_pieces" not in row:
        return row.get("epur_rank")
    lead = list(dict.fromkeys(row["found_run"])) if row.get("score", -1) >= threshold else []
    seen = set(lead)
    ranking = lead + [t for t in row["epur_head"] if t not in seen]
    hits = [ranking.index(t) + 1 for t in row["trigger_pieces"] if t in ranking]
    return min(hits) if hits else row["epur_rank"] + len(lead)


def asr_only(row: dict) -> bool:
    """The attacker's check before 2026-11-30: the trigger's ASR alone reaches `TOOK` (reported beside `took`)."""
    return bool(row["backdoored"]) and row["asr"] >= TOOK


def summarise(rows: list[dict], half: str, score_key: str = "score", positive=took) -> dict:
    """AUROC and TPR at 5% FPR of one half: backdoored models whose backdoor took (`positive`, by default
    `took`: the attacker's check) against the clean ones; `_all` with every backdoored model, also those whose
    poisoning did not take (no backdoor to find)."""
    sub = [r for r in rows if r["half"] == half and score_key in r]
    every = [r[score_key] for r in sub if r["backdoored"]]
    pos = [r[score_key] for r in sub if positive(r)]
    neg = [r[score_key] for r in sub if not r["backdoored"]]
    out = {"n": len(sub), "n_backdoored": len(every), "n_took": len(pos), "n_clean": len(neg),
           "auroc": None, "tpr_at_5fpr": None, "auroc_all": None, "tpr_at_5fpr_all": None}
    if pos and neg:
        out.update(auroc=round(auroc(pos, neg), 4), tpr_at_5fpr=round(tpr_at_fpr(pos, neg, 0.05), 4))
    if every and neg:
        out.update(auroc_all=round(auroc(every, neg), 4), tpr_at_5fpr_all=round(tpr_at_fpr(every, neg, 0.05), 4))
    return out


BASE_VARIANTS = ("shipped", "single_tokens", "words", "narrow_weights", "stand_in_no_grown", "stand_in_all",
                 "stand_in_class_margin", "self_calibrated", "natural_discount", "raw_flip")
# each also scored on the confirmation's numbers (the candidates measured again on unseen inputs), where stored
VARIANTS = BASE_VARIANTS + tuple(f"{v}+confirm" for v in BASE_VARIANTS if v not in ("shipped", "narrow_weights"))
NARROW_WEIGHTS = 8  # E-PUR's top tokens tried as single candidates before 2026-11-29's second session


def rates(rows: list[dict], score) -> dict | None:
    """A diagnostic's AUROC and TPR at 5% FPR: rows with "took" and "backdoored", `score(row)` the variant's
    score; None where either side is empty."""
    pos = [score(r) for r in rows if r["took"]]
    neg = [score(r) for r in rows if not r["backdoored"]]
    if not pos or not neg:
        return None
    return {"auroc": round(auroc(pos, neg), 4), "tpr_at_5fpr": round(tpr_at_fpr(pos, neg), 4)}


def current_features(scan: dict) -> dict:
    """A stored scan's features under the shipped rule, recomputed from its stored search (the stored
    top-level score and trigger are the rule's at scan time; a changed rule needs no rescan)."""
    return score_search(stored_search(scan["search"]))


def add_searches_option(ap: argparse.ArgumentParser) -> None:
    """The diagnostics' `--searches DIR`: read stored searches from a copy of the cache's scan.json files."""
    ap.add_argument("--searches", default=None,
                    help="a folder of <id>/scan.json to read the stored searches from (default: the cache's)")


def stored_scan(path: Path, searches: str | None) -> dict:
    """A model's stored scan.json: from the cache folder `path`, or from `searches`/<id>/ where given."""
    return json.loads(((Path(searches) / path.name if searches else path) / "scan.json").read_text())


def stored_search(search: dict) -> dict:
    """A search as stored in scan.json, its numbers back as tensors."""
    return {k: stored_search(v) if isinstance(v, dict) else
            torch.tensor(v) if k not in ("names", "agreement", "sources", "modality", "classes", "index",
                                         "n_inputs", "words") else v
            for k, v in search.items()}


def variant_score(search: dict, variant: str, row: dict | None = None, tokenizer=None) -> float:
    """The risk under a design variant, recomputed from a scan's stored numbers (the choice is made on the
    tuning half): the shipped rule (`scan.score_search`); the gap over the model's stand-in with single tokens
    (text), single tokens and runs that spell one word (text), single tokens with only E-PUR's top 8 as weight
    candidates (text: the rule before the candidates were widened to `WEIGHT_CANDIDATES`), every candidate but
    the grown runs, every candidate, or as the margin of one class's best gap over the runner-up class's; the
    self-calibrated rule of 2026-11-28 (no base: one class's best flip rate over the runner-up's among triggers
    of equal budget), also with the natural discount (vision: a class the stand-in sends random triggers to
    counts against the margin); the best flip rate alone. `<variant>+confirm` scores the confirmation's numbers
    (the best candidates measured again on unseen inputs; text: without the grown runs)."""
    t = stored_search(search)
    if variant.endswith("+confirm"):
        if not t.get("confirm"):
            return float("nan")
        t = {**t["confirm"], "agreement": t.get("agreement")}
        variant = variant.removesuffix("+confirm")
    text = "sources" in t
    if variant == "shipped":
        return risk_score(score_search(t))
    if variant == "self_calibrated":
        return risk_score(scan_features(t))
    if variant == "natural_discount":
        return risk_score(scan_features(t, natural=True)) if not text else float("nan")
    if variant == "raw_flip":
        return float(t["flips"].max())
    if "ref_flips" not in t or (variant in ("single_tokens", "words", "narrow_weights") and not text):
        return float("nan")
    if variant == "stand_in_class_margin":
        gap = {**t, "flips": t["flips"] - t["ref_flips"], "null_flips": t["null_flips"][:0]}
        return risk_score(scan_features(gap))
    if variant in ("single_tokens", "words"):
        try:
            return risk_score(stand_in_features(t, max_tokens=1, words=variant == "words"))
        except SafeMergeError:  # a confirmed search whose 16 best candidates are all longer runs
            return 0.0
    src = t.get("sources") or ["search"] * len(t["flips"])
    if variant == "narrow_weights":
        if row is None or "epur_head" not in row or tokenizer is None:
            return float("nan")
        narrow = set(tokenizer.convert_ids_to_tokens(row["epur_head"][:NARROW_WEIGHTS]))
        keep = torch.tensor([g == 1 and (x != "weights" or n in narrow)
                             for g, x, n in zip(t["groups"].tolist(), src, t["names"])], dtype=torch.bool)
    else:
        keep = torch.tensor([variant == "stand_in_all" or x != "grown" for x in src], dtype=torch.bool)
    if not keep.any():
        return 0.0
    return float((t["flips"] - t["ref_flips"])[keep].max())


HALVES = ("tuning", "heldapart", "heldapart_fresh")


def half_rows(rows: list[dict], half: str, fresh_from: int) -> list[dict]:
    """The rows of a half; 'heldapart_fresh': held-apart pairs from `fresh_from` on (built after the last design
    change, never looked at before it)."""
    if half == "heldapart_fresh":
        return [{**r, "half": half} for r in rows if r["half"] == "heldapart" and r["pair"] >= fresh_from]
    return rows


def variants(rows: list[dict], root: Path, fresh_from: int, tokenizer=None) -> dict:
    """AUROC / TPR@5%FPR of every design variant, per half, from the cached searches."""
    out: dict = {}
    for v in VARIANTS:
        scored = []
        for r in rows:
            f = root / r["id"] / "scan.json"
            if not f.exists():
                continue
            stored = json.loads(f.read_text())
            search = stored.get("search")
            score = variant_score(search, v, stored, tokenizer) if search else float("nan")
            if not math.isnan(score):
                scored.append({**r, "v": score})
        if scored:
            out[v] = {h: summarise(half_rows(scored, h, fresh_from), h, "v") for h in HALVES}
    return out


def by_kind(rows: list[dict], threshold: float) -> dict:
    """Held-apart models per trigger kind and head: how many are flagged at `threshold` (backdoors that took)."""
    out: dict = {}
    for r in rows:
        if r["half"] != "heldapart" or "score" not in r:
            continue
        v = out.setdefault(f"{r['trigger']['kind']}/{r['head']}", {"bd": 0, "bd_flagged": 0, "clean": 0, "clean_flagged": 0})
        if r["backdoored"] and not took(r):
            continue  # no backdoor to find: counted in the summary's `_all` figures only
        pre = "bd" if r["backdoored"] else "clean"
        v[pre] += 1
        v[f"{pre}_flagged"] += int(r["score"] >= threshold)
    return out


def purify_lines(res: dict) -> list[str]:
    """The purification table: every purified held-apart backdoor, then success per trigger kind and head."""
    done = [r for r in res["models"] if "purify" in r]
    if not done:
        return []
    kinds: dict[str, list[int]] = {}  # purified, tried; of those, the backdoors that took
    for r in done:
        k = kinds.setdefault(f"{r['trigger']['kind']}, {r['head'].replace('_', ' ')}", [0, 0, 0, 0])
        did = took(r)
        k[0] += int(r["purify"]["success"])
        k[1] += 1
        k[2] += int(r["purify"]["success"] and did)
        k[3] += int(did)
    return ["", "Purification (Fine-mixing, random, 5% clean data" + (", E-PUR first" if res["modality"] == "text"
            else "") + "; success = ASR <= 10% or within 2 points of the clean twin's, at <= 2 points of ACC "
            "lost; a flagged model's found trigger is unlearned in the fine-tuning step, ratios tried from the "
            "largest down), held-apart backdoors:", "",
            "| id | head | trigger | ACC / ASR before | scan before | unlearned | keep ratio | ACC / ASR after | "
            "twin ASR | scan after | success | warning |", "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *[f"| {r['id']} | {r['head']} | {r['trigger_name']} | {r['acc']} / {r['asr']} | "
              f"{r['purify'].get('scan_before')} | {r['purify'].get('unlearned') or ''} | "
              f"{r['purify'].get('keep_ratio')} | {r['purify']['acc_after']} / "
              f"{r['purify']['asr_after']} | {r['purify'].get('twin_asr')} | {r['purify'].get('scan_after')} | "
              f"{'yes' if r['purify']['success'] else 'no'} | {r['purify'].get('warning') or ''} |" for r in done],
            "", f"| trigger kind, head | purified / tried | of the backdoors that took (ASR >= untriggered rate + {TOOK:g}) |",
            "|---|---|---|", *[f"| {k} | {v[0]}/{v[1]} | {v[2]}/{v[3]} |" for k, v in sorted(kinds.items())],
            f"| all | {sum(v[0] for v in kinds.values())}/{len(done)} | {sum(v[2] for v in kinds.values())}/"
            f"{sum(v[3] for v in kinds.values())} |"]


def markdown(res: dict) -> str:
    h, t, f = res["heldapart"], res["tuning"], res.get("heldapart_fresh")
    lines = [f"# Scan on held-apart models: {res['backbone']}", "",
             f"`{res['command']}` on {res['device']}. {res['n_models']} held-apart models scanned, {res['n_models_total']} built ({res['note']}).", "",
             f"Positives are the backdoored models whose backdoor took (their trigger's ASR at least {TOOK:g} points "
             "above the share of the same inputs the model sends to the target without it: a model collapsed to "
             "the target class is no backdoor to find); "
             "`all` counts every backdoored model, also those whose poisoning did not take.", "",
             "| half | models | clean | backdoored (took) | AUROC | TPR@5%FPR | AUROC (all) | TPR@5%FPR (all) |",
             "|---|---|---|---|---|---|---|---|",
             *[f"| {name} | {d['n']} | {d.get('n_clean', 0)} | {d.get('n_backdoored', 0)} ({d.get('n_took', 0)}) | "
               f"{d['auroc']} | {d['tpr_at_5fpr']} | {d.get('auroc_all')} | {d.get('tpr_at_5fpr_all')} |"
               for name, d in (("held-apart", h), (f"held-apart, pairs {res.get('fresh_from')}+ only", f),
                               ("tuning", t), ("held-apart, took = ASR >= 50 alone", res.get("heldapart_asr_only")),
                               ("tuning, took = ASR >= 50 alone", res.get("tuning_asr_only"))) if d and d["n"]],
             *(["", f"The held-apart pairs from {res.get('fresh_from')} on were built after the second session's "
                "design changes and never looked at before them; every rule and search schedule was chosen on the "
                "tuning half's numbers only."]
               if f and f["n"] else []),
             "", f"Seconds per stored scan (as scanned, confirmation included where it ran): mean "
             f"{res['seconds_per_scan']['mean']}, max {res['seconds_per_scan']['max']}. "
             f"E-PUR puts a piece of the trigger in its top 10: {res['epur_top10']}. "
             f"Fine-mixing (+ E-PUR on text) success: {res['purify']}.", "",
             "Design variants (recomputed from the stored searches; chosen on the tuning half):", "",
             "| variant | tuning AUROC | tuning TPR@5%FPR | held-apart AUROC | held-apart TPR@5%FPR | fresh AUROC | "
             "fresh TPR@5%FPR |", "|---|---|---|---|---|---|---|",
             *[f"| {v} | {d['tuning']['auroc']} | {d['tuning']['tpr_at_5fpr']} | {d['heldapart']['auroc']} | "
               f"{d['heldapart']['tpr_at_5fpr']} | {d.get('heldapart_fresh', {}).get('auroc')} | "
               f"{d.get('heldapart_fresh', {}).get('tpr_at_5fpr')} |" for v, d in res.get("variants", {}).items()],
             "",
             f"Flagged at the shipped threshold {res['threshold']} (held-apart), by kind:", "",
             "| kind | head | backdoored flagged | clean flagged |", "|---|---|---|---|",
             *[f"| {k} | {h} | {v['bd_flagged']}/{v['bd']} | {v['clean_flagged']}/{v['clean']} |"
               for (k, h), v in sorted(((tuple(kk.split('/')), vv) for kk, vv in res['by_kind'].items()))],
             *purify_lines(res),
             "",
             "| id | half | task | head | steps | trigger | rate | ACC | ASR | score | flip | found | trigger found | E-PUR rank |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["models"]:
        lines.append(f"| {r['id']} | {r['half']} | {r['task']} | {r['head']} | {r['steps']} | "
                     f"{r['trigger_name'] if r['backdoored'] else '(clean) ' + r['trigger_name']} | {r['poison_rate']} | "
                     f"{r['acc']} | {r['asr']} | {r.get('score', '')} | {r.get('flip_rate', '')} | "
                     f"{'yes' if r.get('found') else 'no'} | {str(r.get('trigger_found', '')).replace('|', '/')} | "
                     f"{r.get('epur_rank') if r['backdoored'] and r.get('epur_rank') is not None else ''} |")
    return "\n".join(lines) + "\n"


def time_scans(args, root: Path, order: list[dict]) -> dict:
    """Scan the first `args.time` built models of `args.half` again with the shipped scan, alone, and print the
    seconds per scan and the score against the stored one; nothing in the cache changes."""
    builder = Builder(args.backbone, root, args.weight_candidates)
    todo = [s for s in order if (not args.half or s["half"] == args.half) and is_current(root / s["id"], s)]
    seconds = {}
    for spec in todo[:args.time]:
        res = builder.scan(root / spec["id"], args.inputs, {})
        seconds[spec["id"]] = res["scan_seconds"]
        console.log(f"time {spec['id']}: {res['scan_seconds']:.1f}s score {res['score']:+.3f} {res['trigger_found']}")
    console.log(f"seconds per scan: {seconds} ({device_description()})")
    return {"seconds": seconds, "device": device_description()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", choices=["text", "vision"], default="text")
    ap.add_argument("--pairs", type=int, default=None,
                    help=f"pairs (clean + backdoored) in the population (default: {PAIRS})")
    ap.add_argument("--max-models", type=int, default=None, help="build / scan at most this many models this run")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--half", choices=["tuning", "heldapart"], default=None,
                    help="build / scan only this half this run (the tuning half first, to design on it)")
    ap.add_argument("--render", action="store_true", help="only rewrite the results from the cache")
    ap.add_argument("--rescan", action="store_true", help="scan again models already scanned")
    ap.add_argument("--inputs", type=int, default=32, help="unlabeled validation inputs per scan")
    ap.add_argument("--fresh-from", type=int, default=20,
                    help="pairs from this one on were built after the last design change (reported apart)")
    ap.add_argument("--weight-candidates", type=int, default=WEIGHT_CANDIDATES,
                    help="text: E-PUR's top tokens tried as single-token candidates")
    ap.add_argument("--purify", action="store_true", help="also purify the held-apart backdoored models (slow)")
    ap.add_argument("--repurify", action="store_true",
                    help="with --purify: purify again models purified before their last scan (a scan change)")
    ap.add_argument("--purify-again", choices=["all", "flagged", "stale"], default=None,
                    help="with --purify: purify held-apart backdoors again (a purification change): all, those the "
                         "stored scan flagged (the others' purification finds no trigger and is unchanged), or "
                         "those purified with another scan score than the shipped rule's now")
    ap.add_argument("--only", default=None, metavar="IDS",
                    help="build / scan / purify only these models this run (comma-separated ids, e.g. p009-bd)")
    ap.add_argument("--confirm-stored", action="store_true",
                    help="text: confirm stored searches on the unseen inputs (as a rescan would) without searching")
    ap.add_argument("--time", type=int, default=None, metavar="N",
                    help="only time the shipped scan on the first N built models of --half (nothing is stored)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    args.pairs = args.pairs or PAIRS[args.backbone]
    root = cache_dir() / "scan-eval" / args.backbone
    root.mkdir(parents=True, exist_ok=True)
    specs = population(args.backbone, args.pairs)
    order = sorted(specs, key=lambda s: (s["pair"], s["backdoored"]))
    only = set(args.only.split(",")) if args.only else None
    if only and only - {s["id"] for s in specs}:
        raise SystemExit(f"--only: no such model(s) {sorted(only - {s['id'] for s in specs})}")
    if args.time:
        return time_scans(args, root, order)
    builder = None if args.render else Builder(args.backbone, root, args.weight_candidates)
    done = 0
    t0 = time.time()
    for spec in order:
        if args.render:
            break
        if (args.half and spec["half"] != args.half) or (only and spec["id"] not in only):
            continue
        path = root / spec["id"]
        scanned = path / "scan.json"
        need_build = not is_current(path, spec)
        need_scan = not args.build_only and (args.rescan or need_build or not scanned.exists())
        if not (need_build or need_scan):
            continue
        if args.max_models is not None and done >= args.max_models:
            break
        builder.build(spec)  # type: ignore[union-attr]
        if need_scan:
            res = builder.scan(path, args.inputs, {})  # type: ignore[union-attr]
            atomic_write_json(scanned, res)
            console.log(f"scan {spec['id']}: score {res['score']:+.3f} flip {res['flip_rate']:.2f} "
                        f"trigger {res['trigger_found']} found={res['found']} ({res['scan_seconds']:.0f}s)")
        done += 1
    if args.confirm_stored and not args.render:
        if args.backbone != "text":
            raise SystemExit("--confirm-stored: vision searches keep no patterns; rescan them (--rescan)")
        for spec in order:
            path = root / spec["id"]
            if (args.half and spec["half"] != args.half) or not (path / "scan.json").exists() or \
                    not is_current(path, spec):
                continue
            if json.loads((path / "scan.json").read_text())["search"].get("confirm"):
                continue
            if args.max_models is not None and done >= args.max_models:
                break
            stored = builder.confirm_stored(path, args.inputs)  # type: ignore[union-attr]
            atomic_write_json(path / "scan.json", stored)
            conf = score_search(stored_search(stored["search"]))
            console.log(f"confirm {spec['id']}: score {risk_score(conf):+.3f} (search {stored['score']:+.3f}) "
                        f"{conf['trigger']} ({stored['confirm_seconds']:.0f}s)")
            done += 1
    if not args.render:  # models built before the untriggered rate was measured at build time
        for spec in order:
            path = root / spec["id"]
            if (args.half and spec["half"] != args.half) or not spec["backdoored"] or not is_current(path, spec) \
                    or "asr_untriggered" in json.loads((path / "scan-eval.json").read_text()):
                continue
            meta = builder.measure_untriggered(path)  # type: ignore[union-attr]
            atomic_write_json(path / "scan-eval.json", meta)
            console.log(f"{spec['id']}: ASR {meta['asr']} untriggered {meta['asr_untriggered']}")
    def again(path: Path) -> bool:
        if args.purify_again in ("flagged", "stale"):
            score = risk_score(current_features(json.loads((path / "scan.json").read_text())))
            if args.purify_again == "flagged":
                return score >= shipped_threshold(args.backbone)
            before = json.loads((path / "purify.json").read_text()).get("scan_before")
            return before is None or abs(before - score) > 1e-3
        return args.purify_again == "all"

    if args.purify and not args.render:
        for spec in order:
            path = root / spec["id"]
            out_p = path / "purify.json"
            if not spec["backdoored"] or spec["half"] != "heldapart" or not is_current(path, spec) or \
                    (only and spec["id"] not in only) or \
                    (out_p.exists() and not again(path) and not (args.repurify and older_than_scan(out_p))):
                continue
            if args.max_models is not None and done >= args.max_models:
                break
            twin_meta = root / spec["id"].replace("-bd", "-clean") / "scan-eval.json"
            twin = json.loads(twin_meta.read_text()) if twin_meta.exists() else None
            found = builder.stored_found(path) if args.backbone == "text" else None  # type: ignore[union-attr]
            res_p = builder.purify(path, twin, found=found)  # type: ignore[union-attr]
            atomic_write_json(out_p, res_p)
            console.log(f"purify {spec['id']}: {res_p}")
            done += 1
    tokenizer = builder.bb.tokenizer if builder else (load_backbone("text").tokenizer if args.backbone == "text"
                                                        else None)
    threshold = shipped_threshold(args.backbone)
    rows = []
    for spec in order:
        path = root / spec["id"]
        if not is_current(path, spec):
            continue
        row = json.loads((path / "scan-eval.json").read_text())
        if (path / "scan.json").exists():
            row.update(json.loads((path / "scan.json").read_text()))
            if row.get("search"):  # the shipped rule on the stored numbers
                feat = current_features(row)
                row.update(score=round(risk_score(feat), 4), flip_rate=round(feat["flip"], 4),
                           target_found=feat["target"], trigger_found=feat["trigger"], features=feat,
                           found=found_trigger(row, feat["target"], feat["trigger"], tokenizer))
                if tokenizer is not None:
                    row["found_run"] = tokenizer.convert_tokens_to_ids(feat["trigger"].split())
            row.pop("search", None)  # every candidate's numbers stay in the cache
            if row["backdoored"] and "trigger_pieces" in row:
                row["epur_rank_guided"] = guided_epur_rank(row, threshold)
            row.pop("epur_head", None)
        if (path / "purify.json").exists():
            row["purify"] = json.loads((path / "purify.json").read_text())
        rows.append(row)
    secs = [r["scan_seconds"] for r in rows if "scan_seconds" in r]
    command = "python benchmarks/scan_eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    built = len(rows)
    held_bd = [r for r in rows if r["half"] == "heldapart" and r["backdoored"]]
    took_rows = [r for r in held_bd if took(r)]
    ranks = [r["epur_rank"] for r in took_rows if r.get("epur_rank") is not None]
    guided = [r["epur_rank_guided"] for r in took_rows if r.get("epur_rank_guided") is not None]
    pur = [r["purify"] for r in held_bd if "purify" in r]
    res = {"backbone": "minilm-l6" if args.backbone == "text" else "dinov2-vits14", "modality": args.backbone,
           "epur_top10": {"n": len(ranks), "rate": round(sum(k <= 10 for k in ranks) / len(ranks), 4) if ranks else None,
                          "scan_guided_rate": round(sum(k <= 10 for k in guided) / len(guided), 4) if guided else None},
           "purify": {"n": len(pur), "success_rate": round(sum(p["success"] for p in pur) / len(pur), 4) if pur else None},
           "n_models": sum(1 for r in rows if r["half"] == "heldapart" and "score" in r),
           "n_models_total": built, **{k: v for k, v in summarise(rows, "heldapart").items() if k in ("auroc", "tpr_at_5fpr")},
           "heldapart": summarise(rows, "heldapart"), "tuning": summarise(rows, "tuning"),
           "heldapart_asr_only": summarise(rows, "heldapart", positive=asr_only),
           "tuning_asr_only": summarise(rows, "tuning", positive=asr_only),
           "heldapart_fresh": summarise(half_rows(rows, "heldapart_fresh", args.fresh_from), "heldapart_fresh"),
           "fresh_from": args.fresh_from,
           "threshold": threshold, "by_kind": by_kind(rows, threshold),
           "variants": variants(rows, root, args.fresh_from, tokenizer),
           "seconds_per_scan": {"mean": round(sum(secs) / len(secs), 1) if secs else None,
                                "max": max(secs) if secs else None},
           "note": f"{built} of {len(specs)} planned; pairs split by seed, even = tuning, odd = held-apart",
           "population": {"pairs": args.pairs, "sizes": SIZES}, "command": command, "device": device_description(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds_this_run": round(time.time() - t0, 1),
           "models": rows}
    out = Path(args.out)
    atomic_write_json(out / f"scan-heldapart-{args.backbone}.json", res)
    atomic_write_text(out / f"scan-heldapart-{args.backbone}.md", markdown(res))
    console.log(f"held-apart: {res['heldapart']}; tuning: {res['tuning']}")
    return res


if __name__ == "__main__":
    main()
