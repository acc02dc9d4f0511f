"""Another vision search schedule tried on a half of the scan's population (issue 17), without touching the
shipped scans: every model of the half (`scan_eval.py`'s cache) is scanned again with `scan_state` under the
given `vision_search` options, each result stored under `$SAFEMERGE_CACHE/scan-eval/vision-schedules/<tag>/`
(resumable), and AUROC / TPR at 5% FPR of the scoring variants are printed ("shipped": the rule
`scan.score_search` ships now; "self_calibrated": the class margin without the natural discount).

    python benchmarks/scan_vision_schedule.py sign2-grid8-all --sign 2 --screen 0 --per-class 3 --stride 8
    python benchmarks/scan_vision_schedule.py adam-grid8 --sign 0 --screen 2 --keep 3 --per-class 1 --stride 8
    python benchmarks/scan_vision_schedule.py sign2-grid8-all --summary     # only the table, from the cache

The shipped schedule (`scan.VISION_SEARCH`, a grid at half the side) is what `scan_eval.py` itself scans with.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import scan_eval as se  # noqa: E402

from safemerge.io import atomic_write_json  # noqa: E402
from safemerge.paths import cache_dir  # noqa: E402
from safemerge.safety.scan import VISION_SEARCH  # noqa: E402

SCORED = ("shipped", "natural_discount", "self_calibrated", "stand_in_class_margin", "raw_flip")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tag", help="a name for this schedule's results")
    ap.add_argument("--half", choices=["tuning", "heldapart"], default="tuning")
    ap.add_argument("--sign", type=float, default=VISION_SEARCH["sign"], help="signed-step size (0: Adam)")
    ap.add_argument("--screen", type=int, default=VISION_SEARCH["screen"], help="screening steps (0: none)")
    ap.add_argument("--keep", type=int, default=VISION_SEARCH["keep"], help="positions per class kept after it")
    ap.add_argument("--per-class", type=int, default=VISION_SEARCH["per_class"],
                    help="positions per class and side whose flip rates are measured")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--stride", type=int, default=None, help="position grid stride in pixels (default: half the side)")
    ap.add_argument("--summary", action="store_true", help="only print the table from the stored results")
    args = ap.parse_args()
    root = cache_dir() / "scan-eval" / "vision"
    out = cache_dir() / "scan-eval" / "vision-schedules" / args.tag
    out.mkdir(parents=True, exist_ok=True)
    schedule = {"sign": args.sign, "screen": args.screen, "keep": args.keep, "per_class": args.per_class}
    specs = sorted(se.population("vision", se.PAIRS["vision"]), key=lambda s: (s["pair"], s["backdoored"]))
    specs = [s for s in specs if s["half"] == args.half and (root / s["id"] / "scan.json").exists()]
    if not args.summary:
        atomic_write_json(out / "schedule.json", {**schedule, "steps": args.steps, "stride": args.stride})
        b = se.Builder("vision", root)
        for spec in specs:
            f = out / f"{spec['id']}.json"
            if f.exists():
                continue
            opts = {"steps": args.steps, "vision_search": schedule}
            if args.stride:
                opts["strides"] = (args.stride,)
            res = b.scan(root / spec["id"], 32, opts)
            atomic_write_json(f, res)
            se.console.log(f"{spec['id']}: score {res['score']:.3f} flip {res['flip_rate']:.2f} "
                           f"{res['trigger_found']} found={res['found']} ({res['scan_seconds']:.0f}s)")
    rows = []
    for spec in specs:
        f = out / f"{spec['id']}.json"
        if not f.exists():
            continue
        meta = json.loads((root / spec["id"] / "scan-eval.json").read_text())
        new = json.loads(f.read_text())
        row = {**meta, "half": args.half, "scan_seconds": new["scan_seconds"]}
        row.update({v: se.variant_score(new["search"], v) for v in SCORED})
        rows.append(row)
        print(f"{spec['id']:12s} ASR {meta['asr']:5.1f}  shipped rule {row['shipped']:.3f}  margin "
              f"{row['self_calibrated']:.3f}  natural {row['natural_discount']:.3f}  {new['trigger_found']} "
              f"found={new['found']}  {new['scan_seconds']:.0f}s")
    if not rows:
        raise SystemExit(f"no results under {out}")
    secs = sorted(r["scan_seconds"] for r in rows)
    print(f"{len(rows)} models, scan seconds as recorded when scanned: median {secs[len(secs) // 2]:.0f}, schedule "
          f"{json.loads((out / 'schedule.json').read_text())}")
    for v in SCORED:
        s = se.summarise(rows, args.half, v)
        print(f"  {v:22s} AUROC {s['auroc']}  TPR@5%FPR {s['tpr_at_5fpr']}  ({s['n_took']} took, {s['n_clean']} clean)")


if __name__ == "__main__":
    main()
