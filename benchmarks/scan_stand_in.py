"""Diagnostic for the text scan (issue 17): does a stand-in fitted also on inputs with natural words inserted
score clean models lower? The shipped stand-in (`scan.fit_reference`) is fitted to the model's predictions on
clean inputs only; a clean model's best candidates are task words ("writing poets") whose insertion the model
answers and the stand-in, never shown an insertion, does not. Here the stand-in is refitted on the clean inputs
plus copies with words of the inputs themselves inserted where the scan inserts its candidates, every stored
candidate of the model's search (`scan_eval.py`'s cache) is measured again on it, and the search is rescored by
the shipped rule. The candidates stay those the shipped search found (the search is steered by the shipped
stand-in), so this estimates the effect of the refit, it does not rescan. Also a weaker ridge penalty (a probe
that may follow the model more closely).

    python benchmarks/scan_stand_in.py --half tuning
    python benchmarks/scan_stand_in.py --models p020-clean,p004-clean,p052-clean,p010-bd --searches DIR
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from scan_eval import FIT_INPUTS, Builder, add_searches_option, rates, stored_scan, stored_search, took  # noqa: E402

from safemerge.folders import load_task_folder  # noqa: E402
from safemerge.io import atomic_write_json  # noqa: E402
from safemerge.paths import cache_dir  # noqa: E402
from safemerge.safety.scan import (STAND_IN_SKIP, _task_model, _TextProbe, fit_reference,  # noqa: E402
                                   stand_in_features)

N_INPUTS = 32


def with_words(texts: list[str], pool: list[str], n_words: int, seed: int, max_position: int = 8) -> list[str]:
    """Each text with a run of `n_words` words drawn from `pool` inserted at a random early word position."""
    out = []
    for i, text in enumerate(texts):
        rng = random.Random(seed * 100_003 + i)
        words = text.split()
        run = " ".join(rng.choice(pool) for _ in range(n_words))
        words.insert(rng.randint(0, min(len(words), max_position)), run)
        out.append(" ".join(words))
    return out


def word_pool(texts: list[str]) -> list[str]:
    """The distinct alphabetic words of the texts (lower-cased, two letters or more)."""
    words = {w.strip(".,;:!?\"'()[]").lower() for t in texts for w in t.split()}
    return sorted(w for w in words if w.isalpha() and len(w) >= 2)


# name: (lengths of the word runs inserted into copies of the fit inputs, ridge penalty, Adam steps)
VARIANTS = {"shipped": ((), 1e-2, 300), "words1": ((1,), 1e-2, 300), "words1+2": ((1, 2), 1e-2, 300),
            "ridge1e-3": ((), 1e-3, 600), "ridge1e-4": ((), 1e-4, 600), "ridge1e-4+words1+2": ((1, 2), 1e-4, 600)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--half", default="tuning", choices=["tuning", "heldapart"])
    ap.add_argument("--models", default=None, help="comma-separated ids (default: every model of the half)")
    add_searches_option(ap)
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/scan-stand-in-<half>.json)")
    args = ap.parse_args()
    root = cache_dir() / "scan-eval" / "text"
    b = Builder("text", root)
    tok = b.bb.tokenizer
    enc0 = b.base_encoder()
    half = "tuning" if args.half == "tuning" else "held-apart"
    ids = args.models.split(",") if args.models else sorted(p.name for p in root.glob("p*"))
    rows = []
    for pid in ids:
        path = root / pid
        meta = json.loads((path / "scan-eval.json").read_text())
        if meta["half"] != half and not args.models:
            continue
        t0 = time.time()
        folder = load_task_folder(path)
        data = b.data(meta["task"])
        model = _task_model(b.bb.model, folder.encoder_state, folder.head, "text")
        search = stored_search(stored_scan(path, args.searches)["search"])
        runs = [tuple(tok.convert_tokens_to_ids(n.split())) for n in search["names"]]
        fit = list(data.val.x[:FIT_INPUTS])
        pool = word_pool(fit)
        texts = list(data.val.x[:N_INPUTS])
        row = {"id": pid, "half": meta["half"], "task": meta["task"], "head": meta["head"],
               "backdoored": meta["backdoored"], "took": bool(meta["backdoored"] and took(meta)),
               "trigger": meta.get("trigger_name")}
        for name, (lengths, ridge, steps) in VARIANTS.items():
            inputs = fit + [x for n in lengths for x in with_words(fit, pool, n, seed=n)]
            ref, agree = fit_reference(model, enc0, b.encode, inputs, ridge=ridge, steps=steps)
            rf = _TextProbe(ref, b.encode, texts, 8, 0).evaluate(runs)[0]
            feat = stand_in_features({**search, "ref_flips": rf}, skip=STAND_IN_SKIP)
            row[name] = {"score": round(feat["flip"] - feat["other"], 4), "trigger": feat["trigger"],
                         "flip": round(feat["flip"], 4), "stand_in": round(feat["other"], 4),
                         "agreement": round(agree, 4)}
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(pid, row["took"], {k: (row[k]["score"], row[k]["trigger"]) for k in VARIANTS}, row["seconds"],
              flush=True)
    summary = {name: r for name in VARIANTS if (r := rates(rows, lambda row: row[name]["score"])) is not None}
    print(json.dumps(summary, indent=1))
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"scan-stand-in-{args.half}.json"
    atomic_write_json(out, {"command": "python benchmarks/scan_stand_in.py " + " ".join(sys.argv[1:]),
                            "half": half, "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
