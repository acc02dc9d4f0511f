"""DAM's cost per step against AdaMerging layer-wise (issue 3's budget: <= 1.5x), on the quick zoo's
2bd+4clean pool (6 real task models), same batches, same machine, back to back:

    python benchmarks/dam_cost.py --backbone vision --steps 30   # -> benchmarks/results/dam-cost-vision.{json,md}

Rows: AdaMerging layer-wise; Concrete AM (mask loop); DAM as shipped (amortized inner step, perturbed copies of
a quarter of each batch); DAM as the reference loop runs it (a separate inner pass, the whole batch perturbed);
each with `low_memory=True` (the methods' default) and `False` (`--memory`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from safemerge.merging.adamerging import BatchSampler, MergedEncoder, adamerging_lambdas, frozen_heads
from safemerge.bench.suites import _pool_for, device_description, get_suite
from safemerge.io import atomic_write_json, atomic_write_text
from safemerge.merging.concrete import concrete_merge
from safemerge.bench.zoo import Zoo


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vision", choices=["vision", "text"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--memory", default="both", choices=["both", "low", "fast"],
                    help="low_memory=True (the default of the methods), False, or both, one after the other")
    args = ap.parse_args(argv)
    suite = get_suite(f"{args.backbone}-quick")
    zoo = Zoo(suite.backbone, suite.profile)
    setting = suite.settings[0]
    needed = [(t, None) for t in suite.tasks] + list(setting.backdoored.items())
    models = {k: zoo.load(*k) for k in needed}
    pool, _ = _pool_for(suite, setting, zoo, models, progress=False)
    args_tt = (pool.encoder, pool.base, pool.models, pool.heads, pool.test_inputs, pool.encode)
    rows = []

    def timed(label: str, fn) -> None:
        fn(args.warmup)
        t0 = time.perf_counter()
        fn(args.steps)
        sec = (time.perf_counter() - t0) / args.steps
        rows.append({"method": label, "seconds_per_step": round(sec, 4)})
        print(f"{label:40s} {sec:.3f} s/step", flush=True)

    modes = {"both": (True, False), "low": (True,), "fast": (False,)}[args.memory]
    for low in modes:
        tag, first = (" [low_memory]" if low else " [fast]"), len(rows)
        merged = MergedEncoder(pool.encoder, pool.base, pool.models, pool.encode.modality, low_memory=low)
        heads = frozen_heads(pool.heads)
        timed("adamerging_layer" + tag, lambda n: adamerging_lambdas(
            merged, heads, BatchSampler(pool.test_inputs, pool.encode, 16, 0), "layer", n, progress=False))
        del merged
        timed("concrete_am_layer (mask loop)" + tag, lambda n: concrete_merge(
            *args_tt, mask_steps=n, adamerging_steps=0, progress=False, low_memory=low))
        timed("dam (mask loop, as shipped)" + tag, lambda n: concrete_merge(
            *args_tt, adversarial=True, mask_steps=n, adamerging_steps=0, progress=False, low_memory=low))
        timed("dam (mask loop, reference: exact inner, whole batch perturbed)" + tag, lambda n: concrete_merge(
            *args_tt, adversarial=True, inner="exact", adv_batch_size=16, perturb_every=1, mask_steps=n,
            adamerging_steps=0, progress=False, low_memory=low))
        for r in rows[first:]:  # against AdaMerging layer-wise (the mode's first row) in the same memory mode
            r["ratio_to_adamerging_layer"] = round(r["seconds_per_step"] / rows[first]["seconds_per_step"], 2)
    result = {"command": "python benchmarks/dam_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_description(),
              "torch_threads": torch.get_num_threads(), "backbone": zoo.backbone.name, "pool": setting.name,
              "batch_size": 16, "steps_timed": args.steps, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"dam-cost-{args.backbone}.json", result)
    md = [f"# DAM cost per step ({zoo.backbone.name}, 6 tasks, batch 16 per task)", "",
          f"`{result['command']}` on {result['device']}, {result['created']}.", "",
          "| loop [memory mode] | s / step | x AdaMerging layer-wise (same mode) |", "|---|---|---|"]
    md += [f"| {r['method']} | {r['seconds_per_step']:.3f} | {r['ratio_to_adamerging_layer']:.2f} |" for r in rows]
    atomic_write_text(out / f"dam-cost-{args.backbone}.md", "\n".join(md) + "\n")
    return result


if __name__ == "__main__":
    main()
