"""Design check for the text scan (issue 17): phrases of common words completed around E-PUR's top words.

E-PUR ranks the rarer words of a phrase trigger first ("were" of "as it were", "way" of "by the way") but its
function words low, since they are frequent, and the search joins only E-PUR's top words. `scan._completed_runs`
puts the inputs' most frequent words before, between and after E-PUR's first plain words. The completed runs
are measured on a model's stored search exactly as `search_text` would add them (after the null, so nothing
else of the search changes), for several numbers of frequent words, and every model is rescored with the
shipped rule. The augmented searches are kept under `$SAFEMERGE_CACHE/scan-eval/text-variants/completed-<n>/`.

    python benchmarks/scan_text_complete.py --half tuning            # the design choice is made on this half
    python benchmarks/scan_text_complete.py --half heldapart --words 16
    python benchmarks/scan_text_complete.py --half tuning --store    # once shipped: complete the stored scans
    python benchmarks/scan_text_complete.py --half tuning --words 16 --order gap   # seeds by measured gap

With `--store` (one number of words: `scan.COMPLETE_WORDS`), each model's stored scan.json gets the completed
search, as a rescan with the shipped scan would store it (its seconds added to the scan's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from scan_eval import FIT_INPUTS, PAIRS, Builder, is_current, population, stored_search, summarise  # noqa: E402

from safemerge.folders import load_task_folder  # noqa: E402
from safemerge.io import atomic_write_json  # noqa: E402
from safemerge.paths import cache_dir  # noqa: E402
from safemerge.safety.scan import (COMPLETE_WORDS, WEIGHT_CANDIDATES, _completed_runs, _task_model,  # noqa: E402
                                   _TextProbe, compact_search, fit_reference, risk_score, score_search)

N_INPUTS = 32  # the scan's own inputs (scan_eval's --inputs default)


def completion_order(runs: list[tuple[int, ...]], flips: torch.Tensor, rflips: torch.Tensor,
                     weights: list[int]) -> list[int]:
    """The weight candidates ordered by how much more they flip the model than its stand-in alone (their
    largest gap over the classes, as measured among `runs`; E-PUR's order breaks ties): the tenth session's
    try, completing phrases around the words that already move the model, whatever their drift rank (not
    shipped: the search completes around E-PUR's first plain words)."""
    gap = (torch.as_tensor(flips) - torch.as_tensor(rflips)).max(1).values
    alone = {r[0]: float(gap[i]) for i, r in enumerate(runs) if len(r) == 1}
    return sorted(weights, key=lambda t: -alone.get(t, float("-inf")))


def without_completed(search: dict) -> dict:
    """A stored search without its completed runs (a rescan's search before the completion step)."""
    keep = [i for i, s in enumerate(search["sources"]) if s != "completed"]
    out = dict(search)
    for key in ("flips", "prob", "changed", "ref_flips", "groups"):
        out[key] = search[key][keep]
    for key in ("names", "sources", "words"):
        if key in search:
            out[key] = [search[key][i] for i in keep]
    return out


def augment(builder: Builder, path: Path, words: list[int], order: str = "epur") -> dict[int, tuple[dict, float]]:
    """The model's stored search with the completed runs of each number of frequent words added; seconds each.
    With `order` "gap", the stored completed runs are dropped and the completion starts from the weight
    candidates in `completion_order` (by their measured gap); "epur": from E-PUR's order, as the search
    does."""
    stored = json.loads((path / "scan.json").read_text())
    meta = json.loads((path / "scan-eval.json").read_text())
    folder = load_task_folder(path)
    data = builder.data(meta["task"])
    model = _task_model(builder.bb.model, folder.encoder_state, folder.head, "text")
    ref, _ = fit_reference(model, builder.base_encoder(), builder.encode, data.val.x[:FIT_INPUTS])
    texts = list(data.val.x[:N_INPUTS])
    probe, rprobe = _TextProbe(model, builder.encode, texts, 8, 0), _TextProbe(ref, builder.encode, texts, 8, 0)
    extra = list(dict.fromkeys(stored["epur_head"][:WEIGHT_CANDIDATES]))
    tok = builder.bb.tokenizer
    out = {}
    for n in words:
        t0 = time.time()
        search = stored_search(stored["search"])
        if order == "gap":
            search = without_completed(search)
            runs = [tuple(tok.convert_tokens_to_ids(x.split())) for x in search["names"]]
            extra = completion_order(runs, search["flips"], search["ref_flips"], extra)
        names = set(search["names"])
        runs = [r for r in _completed_runs(probe, rprobe, extra, n)
                if " ".join(tok.convert_ids_to_tokens(list(r))) not in names]
        if runs:
            f, p, c = probe.evaluate(runs)
            rf = rprobe.evaluate(runs)[0]
            search["flips"] = torch.cat([search["flips"], f])
            search["prob"] = torch.cat([search["prob"], p])
            search["changed"] = torch.cat([search["changed"], c])
            search["ref_flips"] = torch.cat([search["ref_flips"], rf])
            search["groups"] = torch.cat([search["groups"], torch.tensor([len(r) for r in runs])])
            search["names"] = list(search["names"]) + [" ".join(tok.convert_ids_to_tokens(list(r))) for r in runs]
            search["sources"] = list(search["sources"]) + ["completed"] * len(runs)
            search["words"] = list(search.get("words") or [False] * (len(search["names"]) - len(runs))) + \
                [False] * len(runs)
        out[n] = (search, time.time() - t0)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--half", choices=["tuning", "heldapart"], default="tuning")
    ap.add_argument("--words", default="8,16,32", help="numbers of frequent words to try (comma-separated)")
    ap.add_argument("--store", action="store_true", help="write the shipped completion into the stored scans")
    ap.add_argument("--order", choices=["epur", "gap"], default="epur",
                    help="complete around E-PUR's first plain words (epur, as the search does) or those of largest "
                         "measured gap (gap: the stored completed runs replaced)")
    args = ap.parse_args(argv)
    words = [COMPLETE_WORDS] if args.store else [int(w) for w in args.words.split(",")]
    if args.store and COMPLETE_WORDS <= 0:
        raise SystemExit("--store: the shipped scan completes no phrases (scan.COMPLETE_WORDS is 0)")
    root = cache_dir() / "scan-eval" / "text"
    builder = Builder("text", root)
    rows: dict[int, list[dict]] = {n: [] for n in words}
    shipped = []
    for spec in population("text", PAIRS["text"]):
        path = root / spec["id"]
        if spec["half"] != args.half or not is_current(path, spec) or not (path / "scan.json").exists():
            continue
        meta = json.loads((path / "scan-eval.json").read_text())
        stored = json.loads((path / "scan.json").read_text())
        if args.store and args.order == "epur" and "completed" in stored["search"]["sources"]:
            continue  # completed already
        base = risk_score(score_search(stored_search(stored["search"])))
        shipped.append({**meta, "score": base})
        for n, (search, secs) in augment(builder, path, words, args.order).items():
            if args.store:
                stored.update(search=compact_search(search), completion_seconds=round(secs, 1),
                              scan_seconds=round(stored["scan_seconds"] + secs, 1))
                atomic_write_json(path / "scan.json", stored)
            feat = score_search(search)
            score = risk_score(feat)
            rows[n].append({**meta, "score": score, "seconds": secs})
            tag = f"completed-{n}" + ("-gap" if args.order == "gap" else "")
            variant = cache_dir() / "scan-eval" / "text-variants" / tag / spec["id"]
            variant.mkdir(parents=True, exist_ok=True)
            atomic_write_json(variant / "features.json", {"score": score, "features": feat, "seconds": secs,
                                                          "shipped_score": base})
            print(f"{spec['id']:12s} words {n:2d}: {base:+.3f} -> {score:+.3f} {feat['trigger']!r} "
                  f"({feat['source']}, {secs:.1f}s)", flush=True)
    res = {"half": args.half, "shipped": summarise(shipped, args.half)}
    for n in words:
        res[f"completed-{n}" + ("-gap" if args.order == "gap" else "")] = {**summarise(rows[n], args.half),
                                 "seconds_max": round(max(r["seconds"] for r in rows[n]), 1) if rows[n] else None}
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
