"""Tune what the DAM paper leaves open (perturbation bound, lambda_adv, how the mask is frozen) on the
VALIDATION split of one quick-suite setting, then run the chosen configuration once on test:

    python benchmarks/dam_tune.py --backbone text      # -> benchmarks/results/dam-tune-text.{json,md}
    python benchmarks/dam_tune.py --backbone vision --grid adv_lr   # -> dam-tune-vision-adv_lr.{json,md}
    python benchmarks/dam_tune.py --backbone vision --grid budget   # AdaMerging layer-wise at 5x the steps
    python benchmarks/dam_tune.py --backbone vision --grid perturbation --seed 1   # shipped vs reference perturbation
    python benchmarks/dam_tune.py --suite vision-core --grid adamerging   # AdaMerging's budget vs RegMean, zoo v2
    python benchmarks/dam_tune.py --suite text-core --grid concrete   # Concrete AM / DAM's mask on zoo v2
    python benchmarks/dam_tune.py --suite vision-core --grid mask_lr --seed 1   # the mask step alone, seed 1

Every test-time method here adapts on the unlabeled validation inputs and is scored on the labeled validation
split (ACC, and ASR under each task's trigger); test inputs are touched once, by the chosen configuration.
Selection rule: the lowest validation ASR(b) among DAM configurations whose validation ACC(all) is within
`--max-acc-drop` points of the untuned DAM's; ties broken by ACC(all)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

from safemerge.bench.suites import (BUDGET, PoolEvaluator, _pool_for, all_methods, device_description, get_suite,
                                   setting_models, suite_profile)
from safemerge.errors import SafeMergeError
from safemerge.io import atomic_write_json, atomic_write_text
from safemerge.merging.pool import run_pool_method
from safemerge.bench.report import summarize
from safemerge.bench.zoo import DEFAULT_ATTACK

# (row label, method, overrides of the quick suite's parameters for that method)
Grid = list[tuple[str, str, dict]]
BASELINES: Grid = [("regmean", "regmean", {}), ("adamerging_layer", "adamerging_layer", {}),
                   ("concrete_am_layer", "concrete_am_layer", {})]
GRIDS: dict[str, Grid] = {
    # one factor at a time around the quick suite's DAM (perturb_bound 0.05, lambda_adv 0.1, relaxed final mask)
    "default": BASELINES + [
        ("dam", "dam", {}),
        ("final_threshold", "dam", {"final_mask": "threshold"}),
        ("final_hard", "dam", {"final_mask": "hard"}),
        ("bound_0p5", "dam", {"perturb_bound": 0.5}),
        ("lambda_adv_1", "dam", {"lambda_adv": 1.0}),
        ("bound_0p5_lambda_adv_1", "dam", {"perturb_bound": 0.5, "lambda_adv": 1.0})],
    # the perturbation's step size: with the quick budget's 8 perturbation updates, adv_lr x 8 bounds its motion
    "adv_lr": [("dam", "dam", {}), ("adv_lr_0p04", "dam", {"adv_lr": 0.04}), ("adv_lr_0p4", "dam", {"adv_lr": 0.4})],
    # does AdaMerging layer-wise (the family DAM belongs to) gain accuracy with 5x the quick steps? (nothing to choose)
    # the shipped (amortized) perturbation against the reference loop's (every step, own batch, its clamp)
    "perturbation": BASELINES + [
        ("dam", "dam", {}),
        ("dam_reference", "dam", {"perturbation": "reference", "inner": "exact", "adv_lr": 3e-3,
                                  "perturb_bound": None}),
        ("dam_reference_lambda_adv_1", "dam", {"perturbation": "reference", "inner": "exact", "adv_lr": 3e-3,
                                               "perturb_bound": None, "lambda_adv": 1.0})],
    "budget": [("adamerging_layer", "adamerging_layer", {}),
               ("adamerging_layer_150_steps", "adamerging_layer", {"steps": 150}),
               ("adamerging_layer_150_steps_lr_3e-3", "adamerging_layer", {"steps": 150, "lr": 3e-3})],
    # Concrete AM / DAM on zoo v2 lose 10-20 points of ACC(all) to AdaMerging layer-wise under the quick budget:
    # how the mask is frozen, its step size, and the AdaMerging stage's room (its lambdas start at 0.3 on
    # task vectors the mask has thinned)
    "concrete": [("regmean", "regmean", {}), ("adamerging_layer", "adamerging_layer", {}),
                 ("concrete_am_layer", "concrete_am_layer", {}),
                 ("concrete_am_layer_threshold", "concrete_am_layer", {"final_mask": "threshold"}),
                 ("concrete_am_layer_mask_lr_0p02", "concrete_am_layer", {"lr": 0.02}),
                 ("concrete_am_layer_init_0p6", "concrete_am_layer", {"init": 0.6}),
                 ("dam", "dam", {}),
                 ("dam_threshold", "dam", {"final_mask": "threshold"}),
                 ("dam_mask_lr_0p02", "dam", {"lr": 0.02}),
                 ("dam_init_0p6", "dam", {"init": 0.6})],
    # the mask step size alone, smaller still
    "mask_lr": [("adamerging_layer", "adamerging_layer", {}),
                ("concrete_am_layer", "concrete_am_layer", {}),
                ("concrete_am_layer_mask_lr_0p02", "concrete_am_layer", {"lr": 0.02}),
                ("concrete_am_layer_mask_lr_0p005", "concrete_am_layer", {"lr": 0.005}),
                ("dam", "dam", {}),
                ("dam_mask_lr_0p02", "dam", {"lr": 0.02}),
                ("dam_mask_lr_0p005", "dam", {"lr": 0.005})],
    # why AdaMerging layer-wise trails RegMean: its step budget and step size, with the data-free and closed-form
    # references (nothing to choose: validation only)
    "adamerging": [("task_arithmetic", "task_arithmetic", {}), ("regmean", "regmean", {}),
                   ("adamerging_task", "adamerging_task", {}),
                   ("adamerging_layer", "adamerging_layer", {}),
                   ("adamerging_layer_lr_3e-3", "adamerging_layer", {"lr": 3e-3}),
                   ("adamerging_layer_120_steps_lr_3e-3", "adamerging_layer", {"steps": 120, "lr": 3e-3}),
                   ("adamerging_layer_120_steps_lr_1e-3", "adamerging_layer", {"steps": 120, "lr": 1e-3})],
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="text", choices=["vision", "text"])
    ap.add_argument("--suite", default=None, help="the suite whose zoo, setting and budget are used "
                    "(default: <backbone>-quick; e.g. vision-core for zoo v2's prototype heads)")
    ap.add_argument("--setting", default="2bd+4clean")
    ap.add_argument("--limit", type=int, default=250, help="evaluate on the first N examples of each split")
    ap.add_argument("--max-acc-drop", type=float, default=1.0)
    ap.add_argument("--grid", default="default", choices=list(GRIDS),
                    help="default: bound, lambda_adv, final mask (+ baselines); adv_lr: the perturbation step size; "
                    "budget: AdaMerging layer-wise at 5x the steps; perturbation: shipped vs reference DAM; concrete and "
                    "mask_lr: Concrete AM / DAM's mask step, final mask and lambda init; adamerging: AdaMerging's "
                    "steps and step size beside TA and RegMean")
    ap.add_argument("--seed", type=int, default=0, help="zoo seed (its own data split, heads and models)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    t_start = time.time()
    suite = get_suite(args.suite or f"{args.backbone}-quick")
    args.backbone = suite.backbone
    try:
        sm = setting_models(suite, args.setting, args.seed)
    except SafeMergeError as e:
        sys.exit(f"error: {e}")
    zoo, setting, models, trig, heads = sm.zoo, sm.setting, sm.models, sm.triggers, sm.heads
    bd = list(setting.backdoored)
    params = {label: p for label, _, p in all_methods(BUDGET[suite_profile(suite).name])}

    @functools.cache
    def problem(split: str) -> tuple:
        """The setting's pool adapting on `split`'s unlabeled inputs, and an evaluator scoring on `split`."""
        return _pool_for(suite, setting, zoo, models, progress=False, split=split)[0], PoolEvaluator(zoo, args.limit, split)

    def run(split: str, label: str, method: str, kw: dict, changed: dict) -> dict:
        pool, ev = problem(split)
        t0 = time.time()
        state, _ = run_pool_method(method, pool, **kw)
        sec = time.time() - t0
        rows = []
        for t in suite.tasks:
            acc, asr = ev.evaluate(state, heads[t], t, trig.get(t))
            rows.append({"method": label, "task": t, "acc": round(acc, 2), "asr": round(asr, 2)})
        out = {"method": label, "base_method": method, "changed": changed, "params": kw, **summarize(rows, bd)[label],
               "seconds": round(sec, 1), "rows": rows}
        print(f"{split:4s} {label:28s} ACC(all) {out['acc_all']:6.2f}  ASR(b) {out['asr_b']:6.2f}  {sec:6.1f} s",
              flush=True)
        return out

    grid = GRIDS[args.grid]
    val = [run("val", label, method, {**params[method], **extra}, extra) for label, method, extra in grid]
    dams = [r for r, (_, method, _) in zip(val, grid) if method == "dam"]
    if not dams:  # a question about a baseline: validation only
        return _save(args, argv, zoo, suite, setting, bd, t_start, val, None, None)
    floor = dams[0]["acc_all"] - args.max_acc_drop
    chosen = min((r for r in dams if r["acc_all"] >= floor), key=lambda r: (r["asr_b"], -r["acc_all"]))
    test = run("test", f"dam_tuned ({chosen['method']})", "dam", chosen["params"], chosen["changed"])
    return _save(args, argv, zoo, suite, setting, bd, t_start, val, chosen["method"], test)


def _save(args, argv, zoo, suite, setting, bd, t_start, val, chosen, test) -> dict:
    prof = suite_profile(suite).name
    result = {"backbone": zoo.backbone.name, "profile": prof, "suite": suite.name, "seed": zoo.seed,
              "setting": setting.name, "backdoored_tasks": bd, "budget": dataclasses.asdict(BUDGET[prof]),
              "eval_limit": args.limit,
              "selection": f"lowest validation ASR(b) with validation ACC(all) >= untuned DAM's - {args.max_acc_drop:g}",
              "chosen": chosen, "validation": val, "test": test,
              "command": "python benchmarks/dam_tune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_description(),
              "seconds": round(time.time() - t_start, 1), "note": "ASR on clean tasks uses the "
              + DEFAULT_ATTACK[zoo.backbone.modality] + " trigger; ASR(b) averages the backdoored tasks."}
    out = Path(args.out)
    suite_part = "" if suite.name == f"{args.backbone}-quick" else "-" + suite.name.split("-", 1)[1]
    grid_part = "" if args.grid == "default" else f"-{args.grid}"
    name = f"dam-tune-{args.backbone}{suite_part}{grid_part}" + (f"-s{args.seed}" if args.seed else "")
    atomic_write_json(out / f"{name}.json", result)
    atomic_write_text(out / f"{name}.md", markdown(result))
    return result


def markdown(r: dict) -> str:
    title = "DAM tuned on validation" if r["test"] else "AdaMerging layer-wise over its step budget (validation)"
    selection = f"Selection: {r['selection']}. " if r["test"] else ""
    lines = [f"# {title}: {r['backbone']} ({r['profile']} budget), setting {r['setting']}", "",
             f"`{r['command']}` on {r['device']}; {r['seconds']:.0f} s. Backdoored: {', '.join(r['backdoored_tasks'])}. "
             f"First {r['eval_limit']} examples per split; test-time methods adapt on the split they are scored on. "
             f"{selection}{r['note']}", "",
             "| split | method | params | ACC(b) | ACC(all) | ASR(b) | ASR(all) | seconds |", "|---|---|---|---|---|---|---|---|"]
    for split, rows in (("val", r["validation"]), ("test", [r["test"]] if r["test"] else [])):
        for x in rows:
            p = x.get("changed") or {"as in the suite": ""}  # what the row changes from its method's suite parameters
            shown = ", ".join(f"{k} {v}".strip() for k, v in p.items())
            lines.append(f"| {split} | {x['method']} | {shown} "
                         f"| {x['acc_b']:.1f} | {x['acc_all']:.1f} | {x['asr_b']:.1f} | {x['asr_all']:.1f} | {x['seconds']:.0f} |")
    lines += ["", f"Chosen on validation: **{r['chosen']}**." if r["chosen"] else "Validation only (no choice)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
