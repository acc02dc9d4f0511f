"""safemerge against mergekit, method by method, on small random Llama-shaped checkpoints (issue 16).

For every merge method both tools have (linear, task_arithmetic, ties, dare_ties, dare_linear, slerp,
breadcrumbs, breadcrumbs_ties, della, model_stock) both merge the same mergekit YAML (per-model weights and
densities where the method has them); deterministic methods are compared entry by entry (max abs difference,
entries more than one bf16 rounding step apart), random ones (DARE, DELLA: masks from different generators)
by statistics of the merged update.

    python benchmarks/mergekit_parity.py      # -> benchmarks/results/mergekit-parity.{json,md}, about a minute

The mergekit venv is the one of benchmarks/streaming.py (--mergekit-venv).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_ckpt import METHODS, RANDOM, compare, make_checkpoints, mergekit_config, n_params, random_stats  # noqa: E402

from safemerge.bench.suites import device_description  # noqa: E402
from safemerge.io import atomic_write_json, atomic_write_text  # noqa: E402
from safemerge.merging.mergekit import load_mergekit_config  # noqa: E402
from safemerge.merging.streaming import streaming_merge  # noqa: E402

DIMS = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
NOTES = {
    "ties": "exact top-k per tensor; entries tied at the threshold magnitude are kept in position order "
            "(mergekit keeps those its unstable argsort puts first)",
    "breadcrumbs": "exact ranks per tensor; ties at the two cut-offs kept in position order (as for ties)",
    "breadcrumbs_ties": "as breadcrumbs",
    "dare_ties": "random: masks from another generator; kept entries rescaled by 1/density (mergekit: to the "
                 "tensor's L1 norm)",
    "dare_linear": "random: as dare_ties",
    "della": "random: masks from another generator; kept entries rescaled by 1/p (mergekit: L1 norm)",
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/mergekit-parity")
    ap.add_argument("--mergekit-venv", default="/tmp/mkvenv")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    root = Path(args.workdir)
    mk_bin = Path(args.mergekit_venv) / "bin" / "mergekit-yaml"
    mk_version = subprocess.run([str(Path(args.mergekit_venv) / "bin" / "python"), "-c",
                                 "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip()
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        work = root / str(dtype).split(".")[-1]
        make_checkpoints(work, DIMS, dtype=dtype)
        for method in args.methods:
            if dtype == torch.float32 and method in RANDOM:
                continue  # compared by statistics once is enough
            cfg = mergekit_config(method, work)
            path = work / f"{method}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            sm, mk = work / f"sm-{method}", work / f"mk-{method}"
            for d in (sm, mk):
                shutil.rmtree(d, ignore_errors=True)
            plan = load_mergekit_config(path)
            streaming_merge(plan.method, plan.base, plan.models, sm, plan.params, out_dtype=plan.out_dtype,
                            progress=False)
            p = subprocess.run([str(mk_bin), str(path), str(mk), "--no-copy-tokenizer", "--no-write-model-card",
                                "--random-seed", "0", "--quiet"], capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"mergekit failed on {method}: {p.stderr[-2000:]}")
            row = {"method": method, "inputs": str(dtype).split(".")[-1], "safemerge_method": plan.method,
                   "params": plan.params, "random": method in RANDOM,
                   **(random_stats(sm, mk, work / "base") if method in RANDOM else compare(sm, mk))}
            row["note"] = NOTES.get(method, "") if dtype == torch.bfloat16 else ""
            rows.append(row)
            print(method, row["inputs"], {k: v for k, v in row.items() if k not in ("params", "note")}, flush=True)
    result = {"command": "python benchmarks/mergekit_parity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_description(),
              "mergekit_version": mk_version, "checkpoints": {**DIMS, "parameters": n_params(DIMS), "models": 3,
                                                              "dtype": "bfloat16 and float32", "compute": "float32",
                                                              "output": "bfloat16"},
              "rows": rows}
    out = Path(args.out)
    atomic_write_json(out / "mergekit-parity.json", result)
    atomic_write_text(out / "mergekit-parity.md", markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    c = r["checkpoints"]
    lines = ["# safemerge vs mergekit, method by method", "", f"Command: `{r['command']}`  ",
             f"Created: {r['created']}; mergekit {r['mergekit_version']}.  ",
             f"Inputs: random Llama-shaped checkpoints, a base and {c['models']} fine-tunes (base + N(0, 0.002^2)), "
             f"{c['parameters']} parameters each, stored in bf16 (as hub checkpoints) and again in float32; both tools "
             "compute in float32 and write bf16, from the same mergekit YAML (per-model weights and densities as in "
             "benchmarks/llama_ckpt.py).", "",
             "Deterministic methods: entries more than one bf16 rounding step apart (of the larger value; 1e-6 "
             "absolute where a result cancels to near zero), and the largest difference. Random methods: share of "
             "entries the merge changed, and the merged updates' L2 ratio, mean-|update| ratio and cosine "
             "(independent masks of the same density give ratios near 1 and a cosine well below 1).", "",
             "Why bf16 inputs differ for the magnitude methods: task vectors of bf16 checkpoints take few distinct "
             "values, so many entries tie at a tensor's threshold magnitude; both tools keep exactly k, but "
             "mergekit keeps the tied entries its unstable argsort happens to put first, safemerge the first in "
             "position order (reproducible, streamable). A tie flipped at one entry can flip the sign election "
             "there. With float32 inputs (no ties) the same methods agree within bf16 rounding.", "",
             "| method | inputs | safemerge | result | note |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        if row["random"]:
            res = (f"changed {row['share_changed_safemerge']:.4f} vs {row['share_changed_mergekit']:.4f}; "
                   f"update L2 ratio {row['l2_update_ratio']}, mean abs ratio {row['mean_abs_update_ratio']}, "
                   f"cosine {row['update_cosine']}")
        else:
            res = ("**within bf16 rounding**" if row["within_bf16_rounding"] else
                   f"{row['entries_beyond_bf16_rounding']} of {row['entries']} entries beyond bf16 rounding") + \
                  f"; max abs diff {row['max_abs_diff']:.3g}"
        lines.append(f"| {row['method']} | {row['inputs']} | {row['safemerge_method']} | {res} | {row['note']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
