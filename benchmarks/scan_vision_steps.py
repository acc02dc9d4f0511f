"""Diagnostic for the vision scan (issue 17): can the patch optimisation find a planted trigger when it is told
where the trigger is? For each given model of the held-apart population (`scan_eval.py`'s cache), a pattern is
optimised towards the trigger's target class in a mask at the trigger's own place (and in a box 4 px larger around
it), from 4 random starts, for a given number of steps, exactly as the scan's search does per candidate; prints
the flip rates it reaches. Clean twins show what the same budget does without a backdoor.

    python benchmarks/scan_vision_steps.py p024-bd,p042-bd,p048-bd,p024-clean,p042-clean --steps 10 40
    python benchmarks/scan_vision_steps.py p024-bd,p024-clean --steps 5 10 --sign 2 --offsets 0 2 4

`--sign` takes signed-gradient steps of that size instead of Adam; `--offsets` also optimises in boxes of the
trigger's side shifted by that many pixels down and right (what a position grid that misses the place gives).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from scan_eval import Builder  # noqa: E402

from safemerge.folders import load_task_folder  # noqa: E402
from safemerge.model import predict  # noqa: E402
from safemerge.paths import cache_dir  # noqa: E402
from safemerge.safety.scan import _optimise_patterns, _task_model, _vision_stats  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", help="comma-separated model ids of the vision population, e.g. p024-bd,p024-clean")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 40])
    ap.add_argument("--starts", type=int, default=4)
    ap.add_argument("--sign", type=float, default=0.0, help="signed-gradient step size (0: Adam, as the scan)")
    ap.add_argument("--offsets", type=int, nargs="+", default=None,
                    help="shifts of a box of the trigger's side instead of the exact and 4-px larger boxes")
    args = ap.parse_args()
    root = cache_dir() / "scan-eval" / "vision"
    b = Builder("vision", root)
    for mid in args.models.split(","):
        meta = json.loads((root / mid / "scan-eval.json").read_text())
        if meta["trigger"]["kind"] != "patch":
            raise SystemExit(f"{mid}: only fixed-place patch triggers have a place to optimise at")
        folder = load_task_folder(root / mid)
        x = b.data(meta["task"]).val.x[:32]
        model = _task_model(b.bb.model, folder.encoder_state, folder.head, "vision")
        clean = predict(model, b.encode, x)
        t, (left, top), side, res = meta["target"], meta["trigger"]["position"], meta["trigger"]["size"], x.shape[-1]
        pools = [(clean != k).nonzero().flatten() for k in range(folder.head.num_labels)]
        pools = [p if len(p) else torch.arange(len(x)) for p in pools]
        for steps in args.steps:
            shifts = [(0, o) for o in args.offsets] if args.offsets else [(0, 0), (4, 0)]
            for grow, off in shifts:
                s = side + grow
                r0 = max(0, min(res - s, top - grow // 2 + off))
                c0 = max(0, min(res - s, left - grow // 2 + off))
                mask = torch.zeros(args.starts, 1, res, res)
                mask[:, :, r0:r0 + s, c0:c0 + s] = 1
                g = torch.Generator().manual_seed(0)
                start = 0.5 * torch.randn(args.starts, 3, res, res, generator=g)
                target = torch.full((args.starts,), t)
                logit, _ = _optimise_patterns(model, b.encode, x, pools, mask, start, target, steps, 0.3, g,
                                              sign=args.sign)
                flips = _vision_stats(model, b.encode, x, clean, mask, torch.sigmoid(logit))[0][:, t]
                how = f"signed steps of {args.sign:g}" if args.sign > 0 else "Adam"
                print(f"{mid} ASR {meta['asr']:.0f}% {s}-px box at ({r0}, {c0}), {steps} steps ({how}): flip rates "
                      f"{[round(float(v), 2) for v in flips]}", flush=True)


if __name__ == "__main__":
    main()
