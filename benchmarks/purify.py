"""Purification and scanning benchmark (issue 4): Fine-mixing (random and Sel), E-PUR, their ablations and
baselines on every backdoored model of the quick zoo, and the pre-merge backdoor scan on every clean and
backdoored model (AUROC).

    python benchmarks/purify.py --backbone text      # -> benchmarks/results/purify-text.{json,md}
    python benchmarks/purify.py --backbone vision

Rows per backdoored model: ACC / ASR (percent, test split) before; after Fine-mixing random and Sel with each
clean fraction; plain fine-tuning on the same clean data; mixing without the fine-tuning step; E-PUR alone and
Fine-mixing + E-PUR (text). Builds missing zoo models (cached)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from safemerge.bench.suites import PoolEvaluator, device_description
from safemerge.io import atomic_write_json, atomic_write_text
from safemerge.api import load_suspect, scan_models
from safemerge.safety.purify import (KEEP_RATIOS, FineTuneConfig, clean_subset, e_pur, fine_mixing, finetune_state,
                                     token_frequencies, word_embedding_key)
from safemerge.safety.scan import auroc
from safemerge.bench.zoo import Zoo, attack_of

console = Console(stderr=True)
BACKDOORED = {
    "vision": [("fashion_mnist", "badnets"), ("animal_mnist", "badnets"), ("mnist", "badnets"), ("letters", "badnets"),
               ("mnist", "trojvit"), ("digits", "trojvit")],
    "text": [("tweet_sentiment", "rare_word"), ("noun_supersense", "rare_word"), ("quote_topic", "embedding_poison"),
             ("gloss_pos", "embedding_poison")],
}
CLEAN = {"vision": ["fashion_mnist", "mnist", "digits", "animal_mnist", "letters", "textile"],
         "text": ["tweet_sentiment", "quote_topic", "noun_supersense", "verb_supersense", "gloss_pos", "quote_theme"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", choices=["vision", "text"], default="text")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--fractions", default="0.01,0.05", help="clean fractions of the training split")
    ap.add_argument("--epochs", type=float, default=3.0, help="fine-tuning epochs over the clean data")
    ap.add_argument("--lr", type=float, default=1e-5, help="fine-tuning learning rate")
    ap.add_argument("--max-acc-drop", type=float, default=2.0)
    ap.add_argument("--top-n", type=int, default=100, help="E-PUR: embeddings reset")
    ap.add_argument("--scan-inputs", type=int, default=48)
    ap.add_argument("--no-scan", action="store_true")
    ap.add_argument("--no-purify", action="store_true")
    ap.add_argument("--models", default="", help="only these task/attack pairs (comma separated), for a quick look")
    ap.add_argument("--eval-limit", type=int, default=500, help="test examples per evaluation")
    ap.add_argument("--val-limit", type=int, default=300, help="validation examples that judge a keep ratio")
    ap.add_argument("--grid", default=",".join(f"{r:g}" for r in KEEP_RATIOS), help="keep ratios to search")
    ap.add_argument("--epur-fractions", default="0.05", help="clean fractions for Fine-mixing + E-PUR (text)")
    ap.add_argument("--resume", action="store_true", help="keep the models (and scan) an earlier partial run wrote")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown table from the JSON results")
    args = ap.parse_args(argv)
    if args.render:
        path = Path(args.out) / f"purify-{args.backbone}.json"
        result = json.loads(path.read_text())
        atomic_write_text(path.with_suffix(".md"), markdown(result))
        return result
    t0, c0 = time.time(), time.process_time()
    zoo = Zoo(args.backbone, args.profile, seed=args.seed)
    todo = BACKDOORED[args.backbone]
    if args.models:
        keep = set(args.models.split(","))
        todo = [m for m in todo if f"{m[0]}/{m[1]}" in keep]
    for t in CLEAN[args.backbone]:
        zoo.build(t, None)
    for t, a in todo:
        zoo.build(t, a)
    t_zoo = time.time() - t0
    fractions = [float(f) for f in args.fractions.split(",")]
    epur_fractions = [float(f) for f in args.epur_fractions.split(",") if f]
    grid = [float(r) for r in args.grid.split(",")]
    text = args.backbone == "text"
    ev = PoolEvaluator(zoo, limit=args.eval_limit)
    backbones: dict = {}
    out = Path(args.out)
    name = f"purify-{args.backbone}" + ("-partial" if args.models or args.no_scan or args.no_purify else "")
    previous = json.loads((out / f"{name}.json").read_text()) if args.resume and (out / f"{name}.json").exists() else {}
    models_out = list(previous.get("models", []))
    scan = previous.get("scan")
    command = "python benchmarks/purify.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def write(final: bool) -> dict:
        result = {
            "backbone": zoo.backbone.name, "profile": args.profile, "fractions": fractions, "epochs": args.epochs, "lr": args.lr,
            "max_acc_drop": args.max_acc_drop, "e_pur_top_n": args.top_n if text else None, "grid": grid,
            "eval_limit": args.eval_limit, "val_limit": args.val_limit, "seed": args.seed, "command": command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_description(),
            "models": models_out, "scan": scan,
            "seconds": {"zoo": round(t_zoo, 1), "this_run": round(time.time() - t0, 1),
                        "cpu_this_process": round(time.process_time() - c0, 1),
                        "total": round(sum(m["seconds"] for m in models_out) + (scan or {}).get("seconds", 0), 1)},
        }
        if previous:
            result["resumed"] = True
        if not final:
            result["incomplete"] = f"{len(models_out)} of {len(todo)} models" + ("" if scan else ", no scan yet")
        atomic_write_json(out / f"{name}.json", result)
        atomic_write_text(out / f"{name}.md", markdown(result))
        return result

    def clean_twin(task: str, atk) -> dict:
        """The clean model of the same task under the same trigger: the ASR floor a purification can reach."""
        c = load_suspect(str(zoo.path(task, None)), cache=backbones)
        acc, asr = ev.evaluate(c.state, c.head, task, atk)
        return {"method": "clean_twin", "acc": round(acc, 2), "asr": round(asr, 2)}

    for m in models_out:  # rows of an earlier run that predate the clean-twin row
        if not any(r["method"] == "clean_twin" for r in m["rows"]):
            atk = attack_of(load_suspect(str(zoo.path(m["task"], m["attack"])), cache=backbones).manifest,
                            zoo.path(m["task"], m["attack"]))
            m["rows"].insert(1, clean_twin(m["task"], atk))
    done = {(m["task"], m["attack"]) for m in models_out}
    for i, (task, attack) in enumerate([] if args.no_purify else todo):
        if (task, attack) in done:
            continue
        tm = time.time()
        s = load_suspect(str(zoo.path(task, attack)), cache=backbones)
        atk = attack_of(s.manifest, s.path)
        clean_val = s.val.subset(list(range(min(args.val_limit, len(s.val)))))
        rows: list[dict] = []

        def record(label: str, state: dict, **extra) -> None:
            acc, asr = ev.evaluate(state, s.head, task, atk)
            rows.append({"method": label, "acc": round(acc, 2), "asr": round(asr, 2), **extra})
            console.log(f"[{i + 1}/{len(todo)}] {task}/{attack} {label}: ACC {acc:.2f} ASR {asr:.2f} {extra or ''}")

        def fm(label: str, suspect_state: dict, clean, mode: str, **extra) -> None:
            r = fine_mixing(s.backbone.model, s.head, s.base, suspect_state, s.encode, clean, clean_val, mode=mode,
                            keep_ratios=grid, max_acc_drop=args.max_acc_drop, finetune_cfg=cfg, seed=args.seed)
            record(label, r.state, keep_ratio=r.keep_ratio, val_acc=round(r.val_acc, 2),
                   suspect_val_acc=round(r.reference_acc, 2), trials=r.trials,
                   **({"finetuned": r.finetuned} if clean is not None else {}), **extra)

        cfg = FineTuneConfig(epochs=args.epochs, lr=args.lr, seed=args.seed)
        record("before", s.state)
        rows.append(clean_twin(task, atk))
        epur_state, trigger_rank = None, None
        if text:
            key = word_embedding_key(s.base)
            tok = s.backbone.tokenizer
            freq = token_frequencies(tok, s.train.x, s.base[key].shape[0], s.encode.max_length)
            res = e_pur(s.base, s.state, freq, top_n=args.top_n, embedding_key=key)
            trig_ids = tok(atk.trigger_word, add_special_tokens=False)["input_ids"]
            trigger_rank = min(res.rank_of(t) for t in trig_ids)
            epur_state = res.state
            record("e_pur", epur_state, trigger_rank=trigger_rank, flagged_top5=tok.convert_ids_to_tokens(res.flagged[:5]))
        for mode in ("random", "sel"):
            fm(f"mix_only_{mode}", s.state, None, mode)
        for frac in fractions:
            clean = clean_subset(s.train, frac, args.seed)
            pct = f"{100 * frac:g}%"
            record(f"finetune_{pct}", finetune_state(s.backbone.model, s.head, s.state, s.encode, clean, cfg),
                   clean_examples=len(clean))
            for mode in ("random", "sel"):
                fm(f"fine_mixing_{mode}_{pct}", s.state, clean, mode, clean_examples=len(clean))
                if text and frac in epur_fractions:
                    fm(f"fine_mixing_{mode}+e_pur_{pct}", epur_state, clean, mode, clean_examples=len(clean))
        models_out.append({"task": task, "attack": attack, "trigger": getattr(atk, "trigger_word", attack),
                           "e_pur_trigger_rank": trigger_rank, "rows": rows, "seconds": round(time.time() - tm, 1)})
        write(final=False)
    if not args.no_scan and not (scan and scan.get("auroc") is not None):
        ts = time.time()
        refs = [(t, None) for t in CLEAN[args.backbone]] + todo
        scan = scan or {"rows": [], "auroc": None, "n_inputs": args.scan_inputs, "seconds": 0.0}
        for t, a in refs:
            if any(r["task"] == t and r["attack"] == (a or "clean") for r in scan["rows"]):
                continue
            (r,) = scan_models([str(zoo.path(t, a))], n_inputs=args.scan_inputs, seed=args.seed, cache=backbones)
            scan["rows"].append({"task": t, "attack": a or "clean", "backdoored": a is not None,
                                 **{k: v for k, v in r.row().items() if k not in ("model", "task")}})
            scan["seconds"] = round(scan["seconds"] + r.seconds, 1)
            console.log(f"scan {t}/{a or 'clean'}: score {r.score:+.3f} (flip {r.flip_rate:.3f}, reference "
                        f"{r.reference_flip_rate:.3f}, class {r.target}, {r.trigger}) {r.seconds:.0f}s")
            write(final=False)
        pos = [r["score"] for r in scan["rows"] if r["backdoored"]]
        neg = [r["score"] for r in scan["rows"] if not r["backdoored"]]
        scan["auroc"] = round(auroc(pos, neg), 4) if pos and neg else None
        console.log(f"scan AUROC {scan['auroc']} ({time.time() - ts:.0f}s)")
    result = write(final=True)
    console.log(f"wrote {out}/{name}.json and .md in {time.time() - t0:.0f}s")
    return result


def summary(r: dict) -> list[str]:
    """One line per backdoored model: ACC / ASR of the main rows, and which Fine-mixing rows meet the issue's
    target (ASR <= 10 at <= `max_acc_drop` points of ACC lost against the suspect, <= 5% clean data)."""
    cols = ["before", "clean_twin", "e_pur", "finetune_1%", "finetune_5%", "fine_mixing_random_1%",
            "fine_mixing_random_5%", "fine_mixing_sel_5%", "fine_mixing_random+e_pur_5%", "fine_mixing_sel+e_pur_5%"]
    cols = [c for c in cols if any(row["method"] == c for m in r["models"] for row in m["rows"])]
    out = ["## Summary (ACC / ASR)", "", "| model | " + " | ".join(cols) + " | target met by |",
           "|---|" + "---|" * (len(cols) + 1)]
    for m in r["models"]:
        rows = {row["method"]: row for row in m["rows"]}
        before = rows["before"]["acc"]
        cells = [f"{rows[c]['acc']:.1f} / {rows[c]['asr']:.1f}" if c in rows else "" for c in cols]
        met = [k for k, row in rows.items() if k.startswith("fine_mixing") and row["asr"] <= 10
               and row["acc"] >= before - r["max_acc_drop"]]
        out.append(f"| {m['task']} / {m['attack']} | " + " | ".join(cells) + f" | {', '.join(met) or 'none'} |")
    return out + [""]


def markdown(r: dict) -> str:
    lines = [f"# Purification and pre-merge scan: {r['backbone']} ({r['profile']} zoo)", "",
             f"`{r['command']}` on {r['device']}; {r['seconds']['total']:.0f} s of purification and scan "
             f"(the last invocation, zoo loading included: {r['seconds']['this_run']:.0f} s wall, "
             f"{r['seconds']['cpu_this_process']:.0f} s CPU), "
             f"ACC/ASR on the first {r['eval_limit']} test examples." + (" INCOMPLETE: " + r["incomplete"]
                                                                          if r.get("incomplete") else ""), "",
             "ACC / ASR in percent on the test split. Fine-mixing keeps the smallest share of the fine-tuned update "
             f"(grid {', '.join(f'{g:g}' for g in r['grid'])}) whose validation ACC (first {r['val_limit']} "
             f"validation examples) after the fine-tuning step (or before it, if better) is within {r['max_acc_drop']:g} "
             f"points of the suspect's; {r['epochs']:g} epochs over the clean data at lr {r['lr']:g}, head frozen. "
             "`mix_only` = the same mix without the fine-tuning step (ratio judged on the mix); `finetune` = plain "
             "fine-tuning of the suspect on the same clean data; \"(mix kept)\": the fine-tuning step lowered validation ACC, so the "
             "mix alone is returned; `clean_twin` = the clean model of the same task under "
             "the same trigger (not a defense: the ASR a perfect purification would leave).", ""]
    lines += summary(r)
    for m in r["models"]:
        head = f"## {m['task']} / {m['attack']}"
        if m.get("e_pur_trigger_rank"):
            head += f" (trigger '{m['trigger']}': E-PUR rank {m['e_pur_trigger_rank']})"
        lines += [head, "", "| method | ACC | ASR | keep ratio | val ACC (suspect) |", "|---|---|---|---|---|"]
        for row in m["rows"]:
            kr = f"{row['keep_ratio']:g}" if "keep_ratio" in row else ""
            kr += " (mix kept)" if row.get("finetuned") is False else ""
            va = f"{row['val_acc']:.2f} ({row['suspect_val_acc']:.2f})" if "val_acc" in row else ""
            lines.append(f"| {row['method']} | {row['acc']:.2f} | {row['asr']:.2f} | {kr} | {va} |")
        lines.append("")
    if r.get("scan"):
        sc = r["scan"]
        lines += [f"## Pre-merge scan (no labels, trigger unknown): AUROC {sc['auroc']}", "",
                  f"{sc['n_inputs']} unlabeled validation inputs per model; score = best flip rate found on the model "
                  "minus the same search on the pre-trained encoder under the same head.", "",
                  "| task | model | score | flip rate | reference | target | trigger found |", "|---|---|---|---|---|---|---|"]
        for row in sorted(sc["rows"], key=lambda x: -x["score"]):
            lines.append(f"| {row['task']} | {row['attack']} | {row['score']:+.3f} | {row['flip_rate']:.3f} | "
                         f"{row['reference_flip_rate']:.3f} | {row['target']} | {row['trigger']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
