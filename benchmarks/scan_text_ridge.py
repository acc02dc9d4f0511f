"""Diagnostic for the text scan (issue 17): a stand-in with a stronger ridge penalty. The stand-in's linear probe
(`scan.fit_reference`) has 768 features and is fitted to 256 inputs; at the shipped ridge (1e-2) it agrees with
the model on 97-100% of them, and where it is that free it also answers inserted words the way the model does
(a planted phrase through a frozen head, "red kite" on p034-bd: 85% on the stand-in, 13% on the head alone) or
not (a clean model's task words). Each model of a half is scanned again with the whole scan (the stand-in also
steers the search) at another `--ridge`, the scans stored apart (`--store`), and the shipped rule's score is
compared with the shipped scan's on the same models (the `--baseline` results file's rows: the population is
deterministic, so the cache rebuilt holds the same models).

    python benchmarks/scan_text_ridge.py --half tuning --ridge 1.0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from scan_eval import PAIRS, Builder, current_features, is_current, population, rates, took  # noqa: E402

from safemerge.io import atomic_write_json  # noqa: E402
from safemerge.paths import cache_dir  # noqa: E402
from safemerge.safety.scan import risk_score  # noqa: E402


def counted(rows: list[dict], key: str) -> dict:
    """`rates` of one score column, with how many positives and negatives it rests on."""
    n = {"n_pos": sum(r["took"] for r in rows), "n_neg": sum(not r["backdoored"] for r in rows)}
    return {**(rates(rows, lambda r: r[key]) or {"auroc": None, "tpr_at_5fpr": None}), **n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--half", default="tuning", choices=["tuning", "heldapart"])
    ap.add_argument("--ridge", type=float, required=True)
    ap.add_argument("--store", default=None, help="folder of <id>/scan.json (default: the cache's "
                                                  "scan-eval/text-variants/ridge-<R>/)")
    ap.add_argument("--max-models", type=int, default=None, help="scan at most this many models this run")
    ap.add_argument("--baseline", default="benchmarks/results/scan-heldapart-text.json")
    ap.add_argument("--out", default=None, help="default benchmarks/results/scan-text-ridge-<R>-<half>.json")
    args = ap.parse_args()
    root = cache_dir() / "scan-eval" / "text"
    store = Path(args.store) if args.store else cache_dir() / "scan-eval" / "text-variants" / f"ridge-{args.ridge:g}"
    baseline = {r["id"]: r for r in json.loads(Path(args.baseline).read_text())["models"]}
    b = Builder("text", root)
    rows, done = [], 0
    for spec in sorted(population("text", PAIRS["text"]), key=lambda s: (s["pair"], s["backdoored"])):
        path = root / spec["id"]
        if spec["half"] != args.half or not is_current(path, spec) or spec["id"] not in baseline:
            continue
        out = store / spec["id"] / "scan.json"
        if not out.exists():
            if args.max_models is not None and done >= args.max_models:
                continue
            t0 = time.time()
            atomic_write_json(out, b.scan(path, 32, {"stand_in_ridge": args.ridge}))
            done += 1
            print(f"{spec['id']} scanned in {time.time() - t0:.0f}s", flush=True)
        scan = json.loads(out.read_text())
        meta = json.loads((path / "scan-eval.json").read_text())
        feat = current_features(scan)
        base = baseline[spec["id"]]
        rows.append({"id": spec["id"], "head": spec["head"], "trigger": meta["trigger_name"],
                     "backdoored": meta["backdoored"], "took": took(meta), "asr": meta["asr"],
                     "shipped": base["score"], "shipped_trigger": base["features"]["trigger"],
                     "variant": round(risk_score(feat), 4), "variant_trigger": feat["trigger"],
                     "agreement": scan["search"].get("agreement"), "scan_seconds": scan["scan_seconds"]})
        r = rows[-1]
        print(f"{r['id']:<11} took={r['took']!s:<5} shipped {r['shipped']:+.3f} {r['shipped_trigger']!r:<24} "
              f"ridge {args.ridge:g} {r['variant']:+.3f} {r['variant_trigger']!r}", flush=True)
    summary = {"shipped": counted(rows, "shipped"), f"ridge_{args.ridge:g}": counted(rows, "variant")}
    print(json.dumps(summary))
    dest = Path(args.out or f"benchmarks/results/scan-text-ridge-{args.ridge:g}-{args.half}.json")
    atomic_write_json(dest, {"command": "python benchmarks/scan_text_ridge.py " + " ".join(sys.argv[1:]),
                             "half": args.half, "ridge": args.ridge, "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
