"""A design tried for the text scan on the tuning half (issue 17) and not shipped: a vocabulary sweep.

Every vocabulary token alone between [CLS] and [SEP] goes through the model (one batched pass over the
vocabulary); per class, the tokens of highest log-probability of that class become extra
candidates (single tokens, the top 8; runs that spell one word from its top 16; ordered pairs of its top 3),
measured as the scan measures every candidate (flip rate on the model minus on its stand-in, same 32 inputs,
same insertion places). A model's score under a variant is the shipped score or the best new gap, whichever is
larger. Results per model are cached under `$SAFEMERGE_CACHE/scan-eval/text-sweep/`.

    python benchmarks/scan_text_sweep.py --half tuning
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from scan_eval import FIT_INPUTS, Builder, took, variant_score  # noqa: E402

from safemerge.folders import load_task_folder  # noqa: E402
from safemerge.io import atomic_write_json  # noqa: E402
from safemerge.paths import cache_dir  # noqa: E402
from safemerge.safety.scan import _task_model, _TextProbe, auroc, fit_reference, tpr_at_fpr  # noqa: E402

VARIANTS = {  # which swept candidates a variant adds: (kind, rank within its class) -> kept
    "shipped": lambda kind, rank: False,
    "top2_tokens": lambda kind, rank: kind == "single" and rank < 2,
    "top4_tokens": lambda kind, rank: kind == "single" and rank < 4,
    "top8_tokens": lambda kind, rank: kind == "single",
    "top8_tokens+spelled": lambda kind, rank: kind in ("single", "spelled"),
    "all": lambda kind, rank: True,
}


def sweep(model, tokenizer, vocab: int, chunk: int = 2048) -> torch.Tensor:
    """[vocab, classes]: log-probabilities of every token alone between [CLS] and [SEP]."""
    out = []
    with torch.inference_mode():
        for i in range(0, vocab, chunk):
            ids = torch.arange(i, min(vocab, i + chunk))
            seq = torch.stack([torch.full_like(ids, tokenizer.cls_token_id), ids,
                               torch.full_like(ids, tokenizer.sep_token_id)], 1)
            out.append(F.log_softmax(model({"input_ids": seq, "attention_mask": torch.ones_like(seq)}), -1))
    return torch.cat(out)


def swept_candidates(b: Builder, path: Path, meta: dict, enc0) -> dict:
    folder = load_task_folder(path)
    data = b.data(meta["task"])
    model = _task_model(b.bb.model, folder.encoder_state, folder.head, "text")
    ref, _ = fit_reference(model, enc0, b.encode, data.val.x[:FIT_INPUTS])
    x = list(data.val.x[:32])
    probe, rprobe = _TextProbe(model, b.encode, x, 8, 0), _TextProbe(ref, b.encode, x, 8, 0)
    tok = b.bb.tokenizer
    names = tok.convert_ids_to_tokens(list(range(tok.vocab_size)))
    lp = sweep(model, tok, tok.vocab_size).masked_fill(~probe.allowed[:tok.vocab_size, None], float("-inf"))
    tagged = []  # (run, class, kind, rank)
    for t in range(lp.shape[1]):
        top = lp[:, t].topk(16).indices.tolist()
        tagged += [((k,), t, "single", i) for i, k in enumerate(top[:8])]
        starts = [k for k in top if not names[k].startswith("##")]
        conts = [k for k in top if names[k].startswith("##")]
        tagged += [((a, c), t, "spelled", 0) for a, c in [(a, c) for a in starts for c in conts][:8]]
        tagged += [((a, c), t, "pair", 0) for a in top[:3] for c in top[:3] if a != c]
    runs = list(dict.fromkeys(r for r, *_ in tagged))
    gap = probe.evaluate(runs)[0] - rprobe.evaluate(runs)[0]
    at = {r: i for i, r in enumerate(runs)}
    return {"tagged": [(list(r), t, kind, rank, float(gap[at[r], t])) for r, t, kind, rank in tagged]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--half", choices=["tuning", "heldapart"], default="tuning")
    args = ap.parse_args()
    root = cache_dir() / "scan-eval" / "text"
    store = cache_dir() / "scan-eval" / "text-sweep"
    store.mkdir(parents=True, exist_ok=True)
    b = Builder("text", root)
    enc0 = b.base_encoder()
    rows = []
    for path in sorted(root.glob("p*")):
        meta = json.loads((path / "scan-eval.json").read_text())
        if meta["half"] != args.half or not (path / "scan.json").exists():
            continue
        cached = store / f"{meta['id']}.json"
        if not cached.exists():
            atomic_write_json(cached, swept_candidates(b, path, meta, enc0))
        tagged = json.loads(cached.read_text())["tagged"]
        shipped = variant_score(json.loads((path / "scan.json").read_text())["search"], "shipped")
        scores = {v: max([shipped] + [g for _, _, kind, rank, g in tagged if keep(kind, rank)])
                  for v, keep in VARIANTS.items()}
        rows.append((meta, scores))
        print(meta["id"], {v: round(s, 2) for v, s in scores.items()}, flush=True)
    for v in VARIANTS:
        pos = [s[v] for m, s in rows if took(m)]
        neg = [s[v] for m, s in rows if not m["backdoored"]]
        print(f"{args.half} {v}: AUROC {auroc(pos, neg):.4f} TPR@5%FPR {tpr_at_fpr(pos, neg):.4f} "
              f"({len(pos)} backdoors that took, {len(neg)} clean)")


if __name__ == "__main__":
    main()
