"""A design tried for the text scan on the tuning half (issue 17) and not shipped: soft trigger inversion.

The scan proposes token runs by one-step HotFlip, E-PUR's drift ranking and phrase completion; on the tuning
half's misses it never proposes the trigger. Two checks on those models, told the true target class (an oracle
the scan does not have, so an upper bound for the search):

1. position: the true trigger's flip rate when inserted at the start of the text (position 0) and at the
   scan's random places among the first 2 or 8 words, to see whether triggers planted at a fixed place are
   missed because the scan inserts elsewhere;
2. soft inversion (DBS-like, Shen et al. 2022): a distribution over the vocabulary per slot of a run of `--slots`
   tokens, optimised with Adam on the temperature-annealed softmax's expected embedding, towards the class on
   the model and (with `--differential` > 0) away from it on the model's stand-in; the argmax run is then
   measured like every scan candidate (flip rate on the model and on the stand-in, the scan's 32 inputs).

Rows go to `benchmarks/results/scan-text-soft.json`.

    python benchmarks/scan_text_soft.py p010-bd p034-bd p002-bd p026-bd p014-bd p014-clean p026-clean
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from scan_eval import FIT_INPUTS, Builder  # noqa: E402

from safemerge.bench.suites import device_description  # noqa: E402
from safemerge.folders import load_task_folder  # noqa: E402
from safemerge.io import atomic_write_json  # noqa: E402
from safemerge.paths import cache_dir  # noqa: E402
from safemerge.safety.scan import _task_model, _TextProbe, fit_reference  # noqa: E402


def invert(probe: _TextProbe, ref, target: int, slots: int, steps: int, batch: int, differential: float,
           seed: int = 0) -> tuple[int, ...]:
    """The argmax run of a soft inversion towards `target` (see the module docstring)."""
    s = probe.slots(slots)
    clean = probe.clean_pred[s.kept]
    emb = probe.emb
    theta = torch.zeros(slots, emb.shape[0]).masked_fill(~probe.allowed.view(1, -1), -1e4).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.5)
    pool = (clean != target).nonzero().flatten()
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        tau = 0.05 ** (step / max(1, steps - 1))  # 1 -> 0.05
        idx = pool[torch.randint(len(pool), (batch,), generator=g)]
        vec = F.softmax(theta / tau, -1) @ emb  # [slots, hidden]
        e = F.embedding(s.ids[idx], emb)
        x = {"inputs_embeds": torch.where(s.at[idx].unsqueeze(-1), vec[s.slot[idx]], e), "attention_mask": s.mask[idx]}
        y = torch.full((batch,), target)
        with torch.enable_grad():
            loss = F.cross_entropy(probe.model.head(probe.model.encoder(**x), x), y)
            if differential > 0:
                rl = ref.head(ref.encoder(**x), x)
                rest = torch.logsumexp(rl.scatter(1, y.view(-1, 1), float("-inf")), -1)
                loss = loss - differential * (rest - torch.logsumexp(rl, -1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return tuple(theta.detach().argmax(-1).tolist())


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="ids of cached text models (scan-eval/text)")
    ap.add_argument("--slots", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8, help="inputs per step")
    ap.add_argument("--differential", type=float, default=1.0, help="weight of keeping the stand-in away (0: off)")
    args = ap.parse_args(argv)
    root = cache_dir() / "scan-eval" / "text"
    b = Builder("text", root)
    tok = b.bb.tokenizer
    enc0 = b.base_encoder()
    rows = []
    for mid in args.models:
        path = root / mid
        meta = json.loads((path / "scan-eval.json").read_text())
        folder = load_task_folder(path)
        data = b.data(meta["task"])
        model = _task_model(b.bb.model, folder.encoder_state, folder.head, "text")
        ref, _ = fit_reference(model, enc0, b.encode, data.val.x[:FIT_INPUTS])
        x, t = list(data.val.x[:32]), meta["target"]
        true_run = tuple(tok(meta["trigger"]["text"], add_special_tokens=False)["input_ids"])
        at = {mp: round(float(_TextProbe(model, b.encode, x, mp, 0).evaluate([true_run])[0][0, t]), 2)
              for mp in (0, 2, 8)}
        probe, rprobe = _TextProbe(model, b.encode, x, 8, 0), _TextProbe(ref, b.encode, x, 8, 0)
        t0 = time.time()
        run = invert(probe, ref, t, args.slots, args.steps, args.batch, args.differential)
        secs = time.time() - t0
        flip, rflip = float(probe.evaluate([run])[0][0, t]), float(rprobe.evaluate([run])[0][0, t])
        stored = json.loads((path / "scan.json").read_text())["score"] if (path / "scan.json").exists() else None
        row = {"id": mid, "trigger": meta["trigger"], "target": t, "stored_score": stored,
               "true_trigger_flip_at": {"start": at[0], "first_2_words": at[2], "first_8_words": at[8]},
               "inverted": " ".join(tok.convert_ids_to_tokens(list(run))), "flip": round(flip, 2),
               "stand_in": round(rflip, 2), "gap": round(flip - rflip, 2), "seconds": round(secs, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    cmd = "python benchmarks/scan_text_soft.py " + " ".join(sys.argv[1:] if argv is None else argv)
    atomic_write_json(Path("benchmarks/results/scan-text-soft.json"),
                      {"command": cmd, "device": device_description(), "slots": args.slots, "steps": args.steps,
                       "batch": args.batch, "differential": args.differential, "models": rows})
    return rows


if __name__ == "__main__":
    main()
