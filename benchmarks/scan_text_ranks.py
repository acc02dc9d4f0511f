"""Diagnostic for the text scan (issue 17): where do a planted trigger's pieces rank under each source of the
search's candidates, and how much of the backdoor does each piece (or part of the run) carry? For each given
model of the population (`scan_eval.py`'s cache; default: the tuning half's backdoors that took and that the
shipped scan's stored search did not find), prints the flip rates towards the target of the whole trigger, of
each piece and of each part of it, on the model and on its stand-in (`fit_reference`), as the scan measures
them; and the rank (among the 30,522 tokens) of each piece under E-PUR's drift ranking (what the search takes its
`WEIGHT_CANDIDATES` from), under the one-step HotFlip score at the placeholder (own and differential, what the
search takes its per-class candidates from), the same with the other pieces in place, and the HotFlip score
averaged over first-order expansions at 8 real tokens instead of the placeholder, and under the vocabulary
sweep (every token alone between [CLS] and [SEP], `scan_text_sweep.py`): the model's log-probability of the
target, and that minus the stand-in's.

    python benchmarks/scan_text_ranks.py                      # the tuning half's misses
    python benchmarks/scan_text_ranks.py p026-bd,p010-bd
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from scan_eval import FIT_INPUTS, Builder, found_trigger, stored_search, took  # noqa: E402
from scan_text_sweep import sweep  # noqa: E402

from safemerge.folders import load_task_folder  # noqa: E402
from safemerge.paths import cache_dir  # noqa: E402
from safemerge.safety.purify import e_pur, token_frequencies, word_embedding_key  # noqa: E402
from safemerge.safety.scan import (_null_tokens, _task_model, _TextProbe, fit_reference,  # noqa: E402
                                   score_search)

N_INPUTS = 32  # the scan's own inputs (scan_eval's --inputs default)


def default_models(root: Path, tokenizer) -> list[str]:
    """Tuning-half backdoors that took and whose stored search (shipped rule) did not find the trigger."""
    out = []
    for path in sorted(root.glob("p*-bd")):
        meta_p, scan_p = path / "scan-eval.json", path / "scan.json"
        if not (meta_p.exists() and scan_p.exists()):
            continue
        meta = json.loads(meta_p.read_text())
        if meta["half"] != "tuning" or not took(meta):
            continue
        feat = score_search(stored_search(json.loads(scan_p.read_text())["search"]))
        if not found_trigger(meta, feat["target"], feat["trigger"], tokenizer):
            out.append(path.name)
    return out


def rank_of(scores: torch.Tensor, allowed: torch.Tensor, tokens: tuple[int, ...]) -> list[int]:
    order = scores.masked_fill(~allowed, float("-inf")).argsort(descending=True)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(1, len(order) + 1)
    return [int(pos[t]) for t in tokens]


def expanded_scores(probe: _TextProbe, target: int, fills: list[int]) -> torch.Tensor:
    """HotFlip scores of every token taken at real tokens in the slot (standardised, summed over `fills`)."""
    s = probe.slots(1)
    others = probe.clean_pred[s.kept] != target
    total = torch.zeros(probe.emb.shape[0])
    for f in fills:
        v = probe.emb[f].clone().requires_grad_(True)
        with torch.enable_grad():
            x = s.embeds_with(probe.emb, v.unsqueeze(0))
            obj = F.log_softmax(probe.model.head(probe.model.encoder(**x), x), -1)[others, target].mean()
            (g,) = torch.autograd.grad(obj, v)
        sc = probe.emb @ g
        total += (sc - sc.mean()) / sc.std()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="?", default=None, help="comma-separated ids, e.g. p026-bd,p010-bd")
    args = ap.parse_args()
    root = cache_dir() / "scan-eval" / "text"
    b = Builder("text", root)
    tok = b.bb.tokenizer
    ids = args.models.split(",") if args.models else default_models(root, tok)
    key = word_embedding_key(b.base_state)
    enc0 = b.base_encoder()
    for pid in ids:
        path = root / pid
        meta = json.loads((path / "scan-eval.json").read_text())
        if not meta.get("trigger"):
            print(f"{pid}: a clean model (no trigger to rank)")
            continue
        folder = load_task_folder(path)
        data = b.data(meta["task"])
        model = _task_model(b.bb.model, folder.encoder_state, folder.head, "text")
        ref, _ = fit_reference(model, enc0, b.encode, data.val.x[:FIT_INPUTS])
        texts = list(data.val.x[:N_INPUTS])
        probe, rprobe = _TextProbe(model, b.encode, texts, 8, 0), _TextProbe(ref, b.encode, texts, 8, 0)
        pieces = tuple(tok(meta["trigger"]["text"], add_special_tokens=False)["input_ids"])
        t = meta["target"]
        parts = [pieces[i:i + n] for n in range(len(pieces), 0, -1) for i in range(len(pieces) - n + 1)]
        flips, rflips = probe.evaluate(parts)[0][:, t], rprobe.evaluate(parts)[0][:, t]
        print(f"{pid} {meta['task']} head {meta['head']} trigger {meta['trigger']['text']!r} at "
              f"{meta['trigger']['position']} -> class {t}: ACC {meta['acc']} ASR {meta['asr']}")
        for p, f, r in zip(parts, flips.tolist(), rflips.tolist()):
            print(f"    {' '.join(tok.convert_ids_to_tokens(list(p))):28} flip {f:.2f}  stand-in {r:.2f}")
        freq = token_frequencies(tok, list(data.train.x), b.base_state[key].shape[0], 32)
        state = {k: v for k, v in folder.encoder_state.items() if k in b.base_state}
        ranking = torch.tensor(e_pur(b.base_state, state, freq, top_n=0, embedding_key=key).ranking)
        epur = torch.empty_like(ranking)
        epur[ranking] = torch.arange(1, len(ranking) + 1)
        own = probe.token_scores([t], (None,))[t]
        diff = own + rprobe.token_scores([t], (None,), avoid=True)[t]
        ctx = []
        for j in range(len(pieces)):
            shape = tuple(None if i == j else p for i, p in enumerate(pieces))
            sc = probe.token_scores([t], shape)[t] + rprobe.token_scores([t], shape, avoid=True)[t]
            ctx.append(rank_of(sc, probe.allowed, (pieces[j],))[0])
        expd = expanded_scores(probe, t, _null_tokens(probe, 8, 1))
        lp, rlp = sweep(model, tok, len(ranking))[:, t], sweep(ref, tok, len(ranking))[:, t]
        names = tok.convert_ids_to_tokens(list(pieces))
        print(f"    ranks of {names}: E-PUR {[int(epur[p]) for p in pieces]}; HotFlip own "
              f"{rank_of(own, probe.allowed, pieces)}, differential {rank_of(diff, probe.allowed, pieces)}, "
              f"others in place {ctx}, expanded at 8 real tokens {rank_of(expd, probe.allowed, pieces)}; sweep "
              f"{rank_of(lp, probe.allowed, pieces)}, sweep minus stand-in {rank_of(lp - rlp, probe.allowed, pieces)}",
              flush=True)


if __name__ == "__main__":
    main()
