"""Estimate for the text scan (issue 17): how would the scores of one half move if the differential HotFlip step
(towards class t on the model, away from t on its stand-in) gave more tokens per class than the search's 2? For
every model of the half (`scan_eval.py`'s cache), the stand-in is fitted as the scan fits it, the step's top k
tokens per class are measured against it on the scan's 32 inputs, and the model's score becomes the larger of
its stored score and the best new token's gap (model flip rate minus stand-in flip rate). An estimate made
from the stored searches: the runs the search grows from its best candidates and its phrase completion are not
redone with the new tokens; a rescan (`scan_eval.py --rescan`) measures the change itself.

    python benchmarks/scan_text_differential.py --half tuning          # k = 3, 4, 6, 8
    python benchmarks/scan_text_differential.py --half tuning --searches DIR   # stored searches copied to DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from scan_eval import FIT_INPUTS, Builder, add_searches_option, rates, stored_scan, stored_search, took  # noqa: E402

from safemerge.folders import load_task_folder  # noqa: E402
from safemerge.io import atomic_write_json  # noqa: E402
from safemerge.paths import cache_dir  # noqa: E402
from safemerge.safety.scan import (STAND_IN_SKIP, _plus, _task_model, _TextProbe, fit_reference,  # noqa: E402
                                   stand_in_features)

N_INPUTS = 32  # the scan's own inputs (scan_eval's --inputs default)
STORED_PER_CLASS = 2  # what the stored searches took from the differential step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--half", default="tuning", choices=["tuning", "heldapart"])
    ap.add_argument("--k", type=int, nargs="+", default=[3, 4, 6, 8], help="tokens per class to estimate")
    add_searches_option(ap)
    ap.add_argument("--out", default=None, help="default benchmarks/results/scan-text-differential-<half>.json")
    args = ap.parse_args()
    root = cache_dir() / "scan-eval" / "text"
    b = Builder("text", root)
    tok = b.bb.tokenizer
    enc0 = b.base_encoder()
    half = "tuning" if args.half == "tuning" else "held-apart"
    rows = []
    for path in sorted(root.glob("p*")):
        meta = json.loads((path / "scan-eval.json").read_text())
        if meta["half"] != half:
            continue
        t0 = time.time()
        folder = load_task_folder(path)
        data = b.data(meta["task"])
        model = _task_model(b.bb.model, folder.encoder_state, folder.head, "text")
        search = stored_search(stored_scan(path, args.searches)["search"])
        feat = stand_in_features(search, skip=STAND_IN_SKIP)
        stored = feat["flip"] - feat["other"]
        ref, _ = fit_reference(model, enc0, b.encode, list(data.val.x[:FIT_INPUTS]))
        texts = list(data.val.x[:N_INPUTS])
        probe, rprobe = _TextProbe(model, b.encode, texts, 8, 0), _TextProbe(ref, b.encode, texts, 8, 0)
        classes = list(range(probe.n_cls))
        scores = _plus(probe.token_scores(classes, (None,)), rprobe.token_scores(classes, (None,), avoid=True))
        top = probe.top_tokens(scores, max(args.k))
        have = set(search["names"])
        new = sorted({t for ts in top.values() for t in ts[STORED_PER_CLASS:]
                      if tok.convert_ids_to_tokens([t])[0] not in have})
        gap = (probe.evaluate([(t,) for t in new])[0] - rprobe.evaluate([(t,) for t in new])[0]).max(1).values \
            if new else None
        row = {"id": path.name, "task": meta["task"], "head": meta["head"], "backdoored": meta["backdoored"],
               "took": bool(meta["backdoored"] and took(meta)), "trigger": meta.get("trigger_name"),
               "stored": round(stored, 4), "stored_trigger": feat["trigger"]}
        for k in args.k:
            allowed = {t for ts in top.values() for t in ts[:k]}
            sel = [i for i, t in enumerate(new) if t in allowed]
            best = max(sel, key=lambda i: float(gap[i])) if sel else None  # type: ignore[index]
            if best is not None and float(gap[best]) > stored:  # type: ignore[index]
                row[f"k{k}"] = {"score": round(float(gap[best]), 4),  # type: ignore[index]
                                "trigger": tok.convert_ids_to_tokens([new[best]])[0]}
            else:
                row[f"k{k}"] = {"score": round(stored, 4), "trigger": feat["trigger"]}
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(row["id"], row["stored"], {k: v for k, v in row.items() if k.startswith("k")}, flush=True)
    summary = {name: rates(rows, lambda r: r[name] if name == "stored" else r[name]["score"])
               for name in ["stored"] + [f"k{k}" for k in args.k]}
    print(json.dumps(summary, indent=1))
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"scan-text-differential-{args.half}.json"
    atomic_write_json(out, {"command": "python benchmarks/scan_text_differential.py " + " ".join(sys.argv[1:]),
                            "half": half, "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
