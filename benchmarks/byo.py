"""Your own checkpoints, end to end, against the zoo path.

The quick zoo's 2bd+4clean pool is exported as plain Hugging Face classification folders with its data in
user formats (`safemerge export`: JSONL for text; an image folder + an ordered JSONL of its paths for
vision), merged through the YAML path (`safemerge merge CONFIG`) by TA, TIES, RegMean, AdaMerging layer-wise
and DAM, and every task is evaluated with `safemerge eval --data ... --trigger ...`. The same merges run
through the zoo path (the bench's pool and evaluator). Same examples and seeds: the numbers should agree.

    python benchmarks/byo.py --backbone vision     # writes benchmarks/results/byo-vision.{json,md}
    python benchmarks/byo.py --backbone text
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from safemerge.bench.suites import PoolEvaluator, _pool_for, device_description, get_suite
from safemerge.bench.zoo import DEFAULT_ATTACK, Zoo, attack_of
from safemerge.io import atomic_write_json, atomic_write_text
from safemerge.merging.pool import run_pool_method
from safemerge.paths import cache_dir

METHODS = ["task_arithmetic", "ties", "regmean", "adamerging_layer", "dam"]
TRAIN_DATA = {"regmean", "fisher"}  # as in the zoo path: these read training inputs, test-time methods test inputs


def trigger_spec(attack) -> str:
    """The zoo attack's trigger in the CLI's `--trigger` form (identical pixels / insertion positions)."""
    if attack.name in ("badnets",):
        return f"patch:checkerboard,size={attack.patch_frac},pos=bottom-right"
    if attack.name in ("rare_word", "embedding_poison", "badmerging_text"):
        return f"word:{attack.trigger_word}"
    raise SystemExit(f"no CLI trigger for attack {attack.name}")


def sh(*args: str) -> str:
    res = subprocess.run(["safemerge", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"safemerge {' '.join(args)} failed:\n{res.stderr[-2000:]}")
    return res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=["vision", "text"], required=True)
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--results-dir", default="benchmarks/results")
    ap.add_argument("--work", default=None, help="where exported folders, merges and finished rows go (default: "
                    "the cache); a stopped run resumes from the finished methods")
    args = ap.parse_args()
    t_start = time.time()
    suite = get_suite(f"{args.backbone}-quick")
    setting = suite.settings[0]
    params = {label: (name, p) for label, name, p in suite.methods}
    zoo = Zoo(suite.backbone, suite.profile)
    needed = [(t, None) for t in suite.tasks] + list(setting.backdoored.items())
    for t, a in needed:
        if a is not None:
            zoo.build(t, None)
        zoo.build(t, a)
    t_zoo = time.time() - t_start
    models = {k: zoo.load(*k) for k in needed}
    work = Path(args.work or cache_dir() / f"byo-{args.backbone}")
    work.mkdir(parents=True, exist_ok=True)

    # ---- the zoo path
    t0 = time.time()
    pool, tasks = _pool_for(suite, setting, zoo, models, progress=False)
    ev = PoolEvaluator(zoo, suite.eval_examples)
    attacks = {t: attack_of(models[(t, setting.backdoored[t])].manifest, models[(t, setting.backdoored[t])].path)
               if t in setting.backdoored else None for t in suite.tasks}
    head_of = {t: models[(t, None)].heads[t] for t in suite.tasks}
    zoo_rows = []
    for label in args.methods:
        cached = work / "rows" / f"zoo-{label}.json"  # each finished method is kept: a stopped run resumes
        if cached.exists():
            zoo_rows += json.loads(cached.read_text())
            continue
        name, p = params[label]
        state, _ = run_pool_method(name, pool, **p)
        rows = []
        for t in suite.tasks:
            acc, asr = ev.evaluate(state, head_of[t], t, attacks[t])
            rows.append({"method": label, "task": t, "acc": round(acc, 2), "asr": round(asr, 2)})
        atomic_write_json(cached, rows)
        zoo_rows += rows
        print(f"zoo path {label}: done", file=sys.stderr)
    t_zoo_path = time.time() - t0

    # ---- your own checkpoints: export, merge through YAML, evaluate with the CLI
    t0 = time.time()
    ext = "" if args.backbone == "vision" else ".jsonl"
    data = {}
    for t in suite.tasks:
        src = zoo.path(t, setting.backdoored.get(t))
        hf, test, train = work / "models" / t, work / "data" / f"{t}-test{ext}", work / "data" / f"{t}-train{ext}"
        if not (hf / "config.json").exists():
            for p in (test, train, test.with_suffix(".jsonl"), train.with_suffix(".jsonl")):
                if p.is_dir():
                    import shutil

                    shutil.rmtree(p)
            sh("export", str(src), "--out", str(hf), "--data-out", str(test), "--split", "test")
            sh("export", str(src), "--out", str(work / "scratch" / t), "--data-out", str(train), "--split", "train")
        # vision: the JSONL beside the image folder keeps the split's order (an image folder is read by class)
        data[t] = (test.with_suffix(".jsonl"), train.with_suffix(".jsonl"))
    byo_rows = []
    merge_seconds = {}
    for label in args.methods:
        cached = work / "rows" / f"byo-{label}.json"
        if cached.exists():
            got = json.loads(cached.read_text())
            byo_rows += got["rows"]
            merge_seconds[label] = got["merge_seconds"]
            continue
        name, p = params[label]
        cfg = {"base_model": suite.backbone, "method": name, "parameters": p, "seed": zoo.seed,
               "output": str(work / "out" / label),
               "models": [{"path": str(work / "models" / t), "task": t,
                           "data": str(data[t][1] if name in TRAIN_DATA else data[t][0])} for t in suite.tasks]}
        path = work / f"merge-{label}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        t1 = time.time()
        sh("merge", str(path))
        merge_seconds[label] = round(time.time() - t1, 1)
        rows = []
        for t in suite.tasks:
            atk = attacks[t] or zoo_attack(zoo)
            row = json.loads(sh("eval", str(work / "out" / label / t), "--data", str(data[t][0]), "--limit",
                                str(suite.eval_examples), "--trigger", trigger_spec(atk), "--target", str(atk.target),
                                "--json"))[0]
            rows.append({"method": label, "task": t, "acc": row["acc"], "asr": row["asr"]})
        atomic_write_json(cached, {"rows": rows, "merge_seconds": merge_seconds[label]})
        byo_rows += rows
        print(f"byo path {label}: done", file=sys.stderr)
    t_byo = time.time() - t0

    diffs = {}
    zi = {(r["method"], r["task"]): r for r in zoo_rows}
    for r in byo_rows:
        z = zi[(r["method"], r["task"])]
        d = diffs.setdefault(r["method"], {"acc": 0.0, "asr": 0.0})
        d["acc"], d["asr"] = max(d["acc"], abs(r["acc"] - z["acc"])), max(d["asr"], abs(r["asr"] - z["asr"]))
    results = {
        "suite": f"byo-{args.backbone}", "backbone": zoo.backbone.name, "profile": suite.profile,
        "command": f"python benchmarks/byo.py --backbone {args.backbone}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_description(),
        "models": [{"task": t, "attack": a, "acc": m.manifest["acc"], "asr": m.manifest["asr"]} for (t, a), m in
                   models.items()],
        "eval_examples_per_task": suite.eval_examples,
        "settings": [{"name": setting.name, "backdoored_tasks": list(setting.backdoored), "attacks": setting.backdoored,
                      "rows": byo_rows, "zoo_path_rows": zoo_rows, "max_abs_diff_vs_zoo_path": diffs,
                      "note": "rows: exported HF folders merged by `safemerge merge CONFIG.yaml` and evaluated by "
                              "`safemerge eval --data --trigger`; zoo_path_rows: the same merges through the bench's "
                              "pool and evaluator. ASR on clean tasks uses the "
                              + DEFAULT_ATTACK[zoo.backbone.modality] + " trigger, target 0."}],
        "methods": {label: {"method": params[label][0], **params[label][1]} for label in args.methods},
        "seconds": {"zoo": round(t_zoo, 1), "zoo_path": round(t_zoo_path, 1), "byo_path": round(t_byo, 1),
                    "byo_merge": merge_seconds, "total": round(time.time() - t_start, 1)},
    }
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"byo-{args.backbone}.json", results)
    atomic_write_text(out / f"byo-{args.backbone}.md", report(results))
    print(report(results))


def zoo_attack(zoo: Zoo):
    return zoo.default_attack(knobs=False)


def report(results: dict) -> str:
    from safemerge.bench.report import summarize

    s = results["settings"][0]
    bd = s["backdoored_tasks"]
    byo, zp = summarize(s["rows"], bd), summarize(s["zoo_path_rows"], bd)
    lines = [f"# {results['suite']}", "", f"Backbone `{results['backbone']}`, setting `{s['name']}` (backdoored: "
             f"{', '.join(bd)}); regenerate with `{results['command']}`; created {results['created']} on "
             f"{results['device']}.", "",
             "Exported HF folders merged through `safemerge merge CONFIG.yaml` and evaluated with `safemerge eval` "
             "(byo) vs the same merges through the zoo path. ACC/ASR in %, first "
             f"{results['eval_examples_per_task']} test examples per task.", "",
             "| method | byo ACC(all) | zoo ACC(all) | byo ASR(b) | zoo ASR(b) | max abs diff ACC / ASR (any task) | merge s |",
             "|---|---|---|---|---|---|---|"]
    for m, d in s["max_abs_diff_vs_zoo_path"].items():
        lines.append(f"| {m} | {byo[m]['acc_all']:.2f} | {zp[m]['acc_all']:.2f} | {byo[m]['asr_b']:.2f} | "
                     f"{zp[m]['asr_b']:.2f} | {d['acc']:.2f} / {d['asr']:.2f} | {results['seconds']['byo_merge'][m]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
