"""Choose how purification unlearns the trigger a scan found (issue 17), on the tuning half only.

For every backdoored model of the scan population's tuning half that took and whose stored scan flagged it,
purify it (E-PUR on text, then Fine-mixing, random, 5% clean data) with the scan's trigger, once per variant:
without unlearning (the former purification) and with it at each learning rate / epochs / highest rate of the
found trigger left. Text uses the stored scan's trigger; vision scans the model again (its stored search keeps no
patterns). Success as in `scan_eval.py --purify`: ASR on the true trigger <= 10% or within 2 points of the clean
twin's, at <= 2 points of ACC lost. Nothing in the cache changes; the rows go to
`benchmarks/results/purify-unlearn-<backbone>-<half>[-<tag>].{json,md}`.

    python benchmarks/purify_unlearn.py --lrs 1e-5 3e-5 1e-4 --limit 10
    python benchmarks/purify_unlearn.py --no-baseline --lrs --variants 1e-4:3:0.1 1e-4:6:0.1 3e-5:6:0.1 --limit 10 --tag round2
    python benchmarks/purify_unlearn.py --no-baseline --lrs 1e-4 --variants 1e-4:3:0.2:suspect --limit 10 --tag targets
    python benchmarks/purify_unlearn.py --lrs 1e-4 --limit 10 --seed 1 --tag seed1
    python benchmarks/purify_unlearn.py --pool purify-unlearn-text-tuning-seed0 purify-unlearn-text-tuning-seed1 \
        purify-unlearn-text-tuning-seed2
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from scan_eval import Builder, current_features, took  # noqa: E402

from safemerge.bench.suites import device_description  # noqa: E402
from safemerge.io import atomic_write_json, atomic_write_text  # noqa: E402
from safemerge.paths import cache_dir  # noqa: E402
from safemerge.safety.scan import risk_score, scan_suspect, shipped_threshold  # noqa: E402


def pool_seeds(stems: list[str]) -> str:
    """Markdown: per variant present in every file, the successes per seed and, over seeds, the mean +- sd of
    the successes, of the mean ASR after and of the mean ACC change (the files: one run per seed, same models)."""
    import statistics as st

    runs = [json.loads(Path(f"benchmarks/results/{stem}.json").read_text()) for stem in stems]
    names = [n for n in runs[0]["summary"] if all(n in r["summary"] for r in runs)]

    def ms(v: list[float]) -> str:
        return f"{st.mean(v):.1f} +- {st.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"

    lines = [f"Pooled over seeds {[r.get('seed', 0) for r in runs]} ({', '.join(stems)}; "
             f"{runs[0]['summary'][names[0]]['n']} models each)", "",
             "| variant | purified per seed | purified | ASR after (mean over models) | ACC change (mean over models) |",
             "|---|---|---|---|---|"]
    for n in names:
        succ = [r["summary"][n]["success"] for r in runs]
        asr = [st.mean(m["variants"][n]["asr_after"] for m in r["models"]) for r in runs]
        dacc = [st.mean(m["variants"][n]["acc_after"] - m["acc"] for m in r["models"]) for r in runs]
        lines.append(f"| {n} | {succ} | {ms(succ)} | {ms(asr)} | {ms(dacc)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lrs", type=float, nargs="*", default=[1e-5, 3e-5],
                    help="unlearning variants: one per fine-tuning learning rate")
    ap.add_argument("--variants", nargs="*", default=[], metavar="LR:EPOCHS:MAX_RATE[:TARGETS]",
                    help="more unlearning variants: learning rate, epochs, the found trigger's highest rate left, "
                         "and what the step teaches (labels or suspect: its own predictions)")
    ap.add_argument("--no-baseline", action="store_true", help="skip purifying without unlearning")
    ap.add_argument("--backbone", default="text", choices=["text", "vision"])
    ap.add_argument("--half", default="tuning", choices=["tuning", "heldapart"])
    ap.add_argument("--limit", type=int, default=None, help="at most this many models")
    ap.add_argument("--tag", default="", help="suffix of the results' file names")
    ap.add_argument("--seed", type=int, default=0, help="the purification's seed (clean subset, mixing mask)")
    ap.add_argument("--pool", nargs="+", default=None, metavar="STEM",
                    help="only pool result files of several seeds (e.g. purify-unlearn-text-tuning-seed0 ...) "
                         "into mean +- sd and print it")
    args = ap.parse_args(argv)
    if args.pool:
        text = pool_seeds(args.pool)
        cmd = "python benchmarks/purify_unlearn.py " + " ".join(sys.argv[1:] if argv is None else argv)
        stem = re.sub(r"-seed\d+$", "", args.pool[0]) + "-pooled"
        atomic_write_text(Path(f"benchmarks/results/{stem}.md"),
                          f"# Unlearning variants pooled over seeds\n\n`{cmd}`\n\n{text}")
        print(text)
        return {"pooled": text}
    root = cache_dir() / "scan-eval" / args.backbone
    threshold = shipped_threshold(args.backbone)
    builder = Builder(args.backbone, root)
    variants = ([] if args.no_baseline else [("fine_mixing", {"unlearn": False})]) + \
        [(f"unlearn_lr{lr:g}", {"unlearn": True, "unlearn_lr": lr}) for lr in args.lrs]
    for v in args.variants:
        lr, epochs, rate, *targets = v.split(":")
        opts = {"unlearn": True, "unlearn_lr": float(lr), "epochs": float(epochs), "max_trigger_rate": float(rate)}
        name = f"unlearn_lr{float(lr):g}_ep{float(epochs):g}_max{float(rate):g}"
        if targets:
            opts["unlearn_targets"] = targets[0]
            name += f"_{targets[0]}"
        variants.append((name, opts))
    rows = []
    paths = sorted(p for p in root.glob("p*-bd") if (p / "scan.json").exists())
    for path in paths:
        meta = json.loads((path / "scan-eval.json").read_text())
        scan = json.loads((path / "scan.json").read_text())
        feat = current_features(scan)
        if meta["half"] != args.half or not took(meta) or risk_score(feat) < threshold:
            continue
        if args.limit is not None and len(rows) >= args.limit:
            break
        twin_p = root / path.name.replace("-bd", "-clean") / "scan-eval.json"
        twin = json.loads(twin_p.read_text()) if twin_p.exists() else None
        row = {"id": path.name, "task": meta["task"], "head": meta["head"], "trigger": meta["trigger_name"],
               "acc": meta["acc"], "asr": meta["asr"], "found": feat["trigger"], "variants": {}}
        # text: the stored scan's trigger; vision keeps no patterns: scanned again (the same scan)
        found = builder.stored_found(path) if args.backbone == "text" else \
            scan_suspect(builder.suspect(path), seed=0)
        for name, opts in variants:
            res = builder.purify(path, twin, found=found, scan=False, seed=args.seed, **opts)
            row["variants"][name] = {k: res[k] for k in ("acc_after", "asr_after", "success", "keep_ratio",
                                                          "warning", "seconds")}
            print(f"{path.name} {name}: ACC {meta['acc']} -> {res['acc_after']} ASR {meta['asr']} -> "
                  f"{res['asr_after']} ratio {res['keep_ratio']} ok={res['success']} ({res['seconds']:.0f}s)",
                  flush=True)
        rows.append(row)
    names = [n for n, _ in variants]
    summary = {n: {"success": sum(r["variants"][n]["success"] for r in rows), "n": len(rows)} for n in names}
    res = {"backbone": {"text": "minilm-l6", "vision": "dinov2-vits14"}[args.backbone], "half": args.half, "threshold": threshold,
           "seed": args.seed,
           "command": "python benchmarks/purify_unlearn.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "device": device_description(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "summary": summary, "models": rows}
    stem = f"benchmarks/results/purify-unlearn-{args.backbone}-{args.half}" + (f"-{args.tag}" if args.tag else "")
    atomic_write_json(Path(stem + ".json"), res)
    lines = [f"# Purification with and without unlearning the found trigger: {args.backbone}, {args.half} half", "",
             f"`{res['command']}` on {res['device']}. Backdoored models that took and that the stored scan flagged "
             f"(score >= {threshold}); the scan's trigger is the one unlearned (text: the stored search under the shipped "
             "rule; vision: scanned again).", "",
             "| variant | purified |", "|---|---|",
             *[f"| {n} | {s['success']}/{s['n']} |" for n, s in summary.items()], "",
             "| id | head | trigger | found | ACC / ASR | " + " | ".join(names) + " |",
             "|---|---|---|---|---|" + "---|" * len(names),
             *[f"| {r['id']} | {r['head']} | {r['trigger']} | {r['found']} | {r['acc']} / {r['asr']} | " + " | ".join(
                 f"{v['acc_after']} / {v['asr_after']} @{v['keep_ratio']} {'ok' if v['success'] else ''}"
                 for v in (r["variants"][n] for n in names)) + " |" for r in rows]]
    atomic_write_text(Path(stem + ".md"), "\n".join(lines) + "\n")
    return res


if __name__ == "__main__":
    main()
