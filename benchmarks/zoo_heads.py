"""How much of each task the frozen heads leave to the task vectors: the PRE-TRAINED encoder's test ACC under
each kind of zoo head (the papers' zero-shot row) beside the fine-tuned clean model's, per task:

    python benchmarks/zoo_heads.py --backbone vision   # -> benchmarks/results/zoo-heads-vision.{json,md}
    python benchmarks/zoo_heads.py --backbone text

'probe' is the zoo v1 head (a linear probe on standardised features), 'prototype' zoo v2's (CLIP-like class
prototypes, fixed logit scale). A fine-tuned ACC appears where that zoo's clean model is built (e.g. by
`safemerge bench --suite vision-core`); nothing is fine-tuned here."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from safemerge.bench.suites import TEXT_TASKS, VISION_TASKS, device_description
from safemerge.bench.zoo import Zoo, get_profile, override_profile
from safemerge.io import atomic_write_json, atomic_write_text

HEADS = ("probe", "prototype")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vision", choices=["vision", "text"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    t0 = time.time()
    tasks = VISION_TASKS if args.backbone == "vision" else TEXT_TASKS
    rows = []
    for head in HEADS:
        zoo = Zoo(args.backbone, override_profile(get_profile("quick"), [f"head={head}"]), seed=args.seed)
        for t in tasks:
            built = zoo.path(t, None) / "safemerge.json"
            finetuned = json.loads(built.read_text())["acc"] if built.exists() else None
            rows.append({"head": head, "task": t, "pretrained_acc": zoo.head_info(t)["pretrained_acc"],
                         "finetuned_acc": finetuned})
            print(f"{head:9s} {t:16s} pre-trained {rows[-1]['pretrained_acc']:6.2f}  fine-tuned "
                  f"{'-' if finetuned is None else f'{finetuned:6.2f}'}", flush=True)
    result = {"backbone": zoo.backbone.name, "profile": "quick", "seed": args.seed, "rows": rows,
              "command": "python benchmarks/zoo_heads.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_description(),
              "seconds": round(time.time() - t0, 1)}
    out = Path(args.out)
    atomic_write_json(out / f"zoo-heads-{args.backbone}.json", result)
    atomic_write_text(out / f"zoo-heads-{args.backbone}.md", markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [f"# Zoo heads: {r['backbone']} (quick profile, seed {r['seed']})", "",
             f"`{r['command']}` on {r['device']}. Test ACC in %: the pre-trained encoder under each head, and the "
             "fine-tuned clean model of that zoo (- where not built).", "",
             "| task | " + " | ".join(f"{h}: pre-trained | {h}: fine-tuned" for h in HEADS) + " |",
             "|---|" + "---|---|" * len(HEADS)]
    by = {(x["head"], x["task"]): x for x in r["rows"]}
    tasks = list(dict.fromkeys(x["task"] for x in r["rows"]))
    for t in [*tasks, "mean"]:
        cells = []
        for h in HEADS:
            xs = [by[(h, u)] for u in tasks] if t == "mean" else [by[(h, t)]]
            for key in ("pretrained_acc", "finetuned_acc"):
                vals = [x[key] for x in xs]
                cells.append("-" if any(v is None for v in vals) else f"{sum(vals) / len(vals):.1f}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
