"""Merge protection benchmark (issue 5): protect one zoo model, merge it with 1 to 5 free-riders, and measure
what each party keeps; then the adaptive attacker (weight matching + scale recovery), with and without
dropout pruning.

    python benchmarks/protect.py --backbone vision     # -> benchmarks/results/protect-vision.{json,md}
    python benchmarks/protect.py --backbone text

Uses the clean models of the quick suite's zoo (built on first use, cached)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from safemerge.merging.adamerging import adamerging
from safemerge.bench.suites import TEXT_TASKS, VISION_TASKS, PoolEvaluator, device_description
from safemerge.io import atomic_write_json, atomic_write_text
from safemerge.merging.methods import merge
from safemerge.model import TaskModel, logits
from safemerge.safety.protect import dropout_prune, protect_state, undo_protection
from safemerge.bench.zoo import Zoo

console = Console(stderr=True)
METHODS = [("task_arithmetic", {"scaling": 0.3}), ("task_arithmetic", {"scaling": 0.5}),
           ("task_arithmetic", {"scaling": 0.8}), ("ties", {"density": 0.2, "scaling": 1.0}),
           ("dare_ties", {"density": 0.5, "scaling": 1.0})]
ATTACKER_METHODS = [METHODS[0], METHODS[2], METHODS[3]]


def label(name: str, params: dict) -> str:
    return f"{name}@{params['scaling']}" if name == "task_arithmetic" else name


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", choices=["vision", "text"], default="vision")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--riders", default="1,3,5", help="numbers of free-rider models to merge with")
    ap.add_argument("--dropout", type=float, default=0.9, help="dropout pruning rate for the robust variant")
    ap.add_argument("--ada-steps", type=int, default=50, help="AdaMerging layer-wise steps (0 = skip it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    t0 = time.time()
    tasks = VISION_TASKS if args.backbone == "vision" else TEXT_TASKS
    zoo = Zoo(args.backbone, args.profile, seed=args.seed)
    for t in tasks:
        zoo.build(t, None)
    models = {t: zoo.load(t, None) for t in tasks}
    base = zoo.base_state()
    ev = PoolEvaluator(zoo)
    owner, riders = tasks[0], tasks[1:]
    own = models[owner].encoder_state
    variants = {"original": own, "protected": protect_state(own, base, seed=args.seed),
                "protected_dropout": protect_state(own, base, dropout=args.dropout, seed=args.seed)}
    variants["attacker_on_protected"] = undo_protection(variants["protected"], base)
    variants["attacker_on_protected_dropout"] = undo_protection(variants["protected_dropout"], base)

    def acc(state: dict, task: str) -> float:
        return round(ev.accuracy(state, models[task].heads[task], task), 2)

    # 1. exactness: the protected model's own logits on every task's test inputs
    console.log("exactness")
    enc_a, enc_b = zoo.fresh_model(owner).encoder, zoo.fresh_model(owner).encoder
    enc_a.load_state_dict(own)
    enc_b.load_state_dict(variants["protected"])
    head = models[owner].heads[owner]
    exact = {}
    for t in tasks:
        x = zoo.data(t).test.x
        la = logits(TaskModel(enc_a, head, zoo.backbone.modality), ev.encode, x)
        lb = logits(TaskModel(enc_b, head, zoo.backbone.modality), ev.encode, x)
        exact[t] = float((la - lb).abs().max())
    alone = {v: acc(s, owner) for v, s in variants.items()}
    alone["dropout_pruned_unprotected"] = acc(dropout_prune(own, base, args.dropout, args.seed), owner)

    # 2. merges with free-riders, with and without protection; 3. the attacker (largest pool only)
    rows = []
    rider_counts = [int(n) for n in args.riders.split(",")]
    plan = [(v, n, m) for n in rider_counts for v in ("original", "protected") for m in METHODS]
    plan += [(v, max(rider_counts), m) for v in ("protected_dropout", "attacker_on_protected",
                                                    "attacker_on_protected_dropout") for m in ATTACKER_METHODS]
    if args.ada_steps:  # test-time AdaMerging layer-wise: the smallest and largest pools
        ada = ("adamerging_layer", {"steps": args.ada_steps})
        plan += [(v, n, ada) for n in sorted({min(rider_counts), max(rider_counts)})
                 for v in ("original", "protected", "attacker_on_protected_dropout")]
    rider_acc_alone = {t: acc(models[t].encoder_state, t) for t in riders}
    for i, (variant, n, (name, params)) in enumerate(plan):
        console.log(f"[{i + 1}/{len(plan)}] {variant}, {n} free-rider(s), {label(name, params)}")
        pool = riders[:n]
        states = [variants[variant]] + [models[t].encoder_state for t in pool]
        if name == "adamerging_layer":
            pool_tasks = [owner] + pool
            merged, _ = adamerging(zoo.backbone.model, base, states, [models[t].heads[t] for t in pool_tasks],
                                   [zoo.data(t).test.x for t in pool_tasks], ev.encode, "layer",
                                   steps=params["steps"], seed=args.seed)
        else:
            merged = merge(name, base, states, **params)
        rider = [acc(merged, t) for t in pool]
        rows.append({"variant": variant, "free_riders": n, "method": label(name, params),
                     "protected_task_acc": acc(merged, owner),
                     "free_rider_acc": round(sum(rider) / len(rider), 2),
                     "free_rider_acc_alone": round(sum(rider_acc_alone[t] for t in pool) / len(pool), 2)})
    n_cls = len(zoo.data(owner).spec.classes)
    result = {
        "backbone": zoo.backbone.name, "profile": args.profile, "protected_task": owner, "free_rider_tasks": riders,
        "chance": round(100 / n_cls, 2), "dropout": args.dropout, "seed": args.seed,
        "command": "python benchmarks/protect.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_description(),
        "max_abs_logit_diff": exact, "acc_alone": alone, "rows": rows, "seconds": round(time.time() - t0, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"protect-{args.backbone}.json", result)
    atomic_write_text(out / f"protect-{args.backbone}.md", markdown(result))
    console.print(markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [f"# Merge protection: {r['backbone']} ({r['profile']} profile), protected task `{r['protected_task']}`",
             "", f"Command: `{r['command']}`  ", f"Device: {r['device']}; {r['seconds']:.0f} s.", "",
             "Max abs logit difference, protected vs original model, on each task's test inputs: "
             + ", ".join(f"{t} {d:.1e}" for t, d in r["max_abs_logit_diff"].items()) + ".", "",
             "ACC of the protected task's model alone: "
             + ", ".join(f"{v} {a:.2f}" for v, a in r["acc_alone"].items()) + f" (chance {r['chance']:.1f}).", "",
             "| model | free-riders | method | protected task ACC | free-rider ACC (merged) | free-rider ACC (alone) |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['variant']} | {row['free_riders']} | {row['method']} | {row['protected_task_acc']:.2f} | "
                     f"{row['free_rider_acc']:.2f} | {row['free_rider_acc_alone']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
