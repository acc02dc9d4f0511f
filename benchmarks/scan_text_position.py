"""Diagnostic for the text scan (issue 17): does where a candidate is put in the inputs decide whether a trigger
planted at the start of the text fires? The scan puts a candidate at a random word position among the first 8;
most held-apart misses are phrases planted at the start. Here each model's true trigger (as tokens) is measured
on the model and on its stand-in (`scan.fit_reference`) at the scan's random early position, at the start only,
and at positions 1-8 only; the gap is the shipped rule's quantity (model minus stand-in, at the target).

    python benchmarks/scan_text_position.py --models p034-bd,p022-bd,p010-bd
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from scan_eval import FIT_INPUTS, Builder, took  # noqa: E402

from safemerge.folders import load_task_folder  # noqa: E402
from safemerge.io import atomic_write_json  # noqa: E402
from safemerge.paths import cache_dir  # noqa: E402
from safemerge.safety.scan import _task_model, _TextProbe, fit_reference  # noqa: E402

N_INPUTS = 64
# name: (max_position, seed): the scan's placement, the start only, and the placement seeded anew
PLACEMENTS = {"random0-8": (8, 0), "start": (0, 0), "random0-8_seed1": (8, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", required=True, help="comma-separated ids of built text models")
    ap.add_argument("--out", default=None, help="results JSON (default: print only)")
    args = ap.parse_args()
    root = cache_dir() / "scan-eval" / "text"
    b = Builder("text", root)
    tok = b.bb.tokenizer
    enc0 = b.base_encoder()
    rows = []
    for pid in args.models.split(","):
        path = root / pid
        meta = json.loads((path / "scan-eval.json").read_text())
        t0 = time.time()
        folder = load_task_folder(path)
        data = b.data(meta["task"])
        model = _task_model(b.bb.model, folder.encoder_state, folder.head, "text")
        ref, _ = fit_reference(model, enc0, b.encode, data.val.x[:FIT_INPUTS])
        run = tuple(tok(meta["trigger"]["text"], add_special_tokens=False)["input_ids"])
        texts = list(data.val.x[:N_INPUTS])
        t = meta["target"]
        row = {"id": pid, "head": meta["head"], "trigger": meta["trigger_name"], "backdoored": meta["backdoored"],
               "took": bool(meta["backdoored"] and took(meta)), "asr": meta["asr"]}
        for name, (maxpos, seed) in PLACEMENTS.items():
            f = _TextProbe(model, b.encode, texts, maxpos, seed).evaluate([run])[0][0]
            rf = _TextProbe(ref, b.encode, texts, maxpos, seed).evaluate([run])[0][0]
            row[name] = {"model": round(float(f[t]), 3), "stand_in": round(float(rf[t]), 3),
                         "gap": round(float(f[t] - rf[t]), 3)}
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(pid, row["trigger"], {k: row[k] for k in PLACEMENTS}, flush=True)
    if args.out:
        atomic_write_json(Path(args.out), {"command": "python benchmarks/scan_text_position.py " +
                                           " ".join(sys.argv[1:]), "rows": rows})


if __name__ == "__main__":
    main()
