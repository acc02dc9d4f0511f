"""Streaming merges against mergekit, in the same run (issue 6).

Generates a Llama-shaped base and 3 fine-tunes in bf16, sharded like a hub checkpoint (TinyLlama-1.1B
shapes by default: about 2.2 GB each), then merges them with safemerge (`safemerge merge --mergekit`) and
with mergekit (`mergekit-yaml`, from PyPI in its own venv) on the same TA, TIES and DARE-TIES configs.
Reports wall time, peak RSS (/usr/bin/time -v) and the max abs difference of the output tensors.

    python benchmarks/streaming.py --workdir /tmp/streaming-bench   # -> benchmarks/results/streaming-vs-mergekit.{json,md}

The mergekit venv: python3 -m venv V && V/bin/pip install torch==2.13.0 mergekit==0.1.5 (pass --mergekit-venv V).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from safemerge.bench.suites import device_description
from safemerge.io import atomic_write_json, atomic_write_text
from safemerge.merging.streaming import LazyCheckpoint

LLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4)


def llama_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (c["vocab_size"], h)})
    return shapes


def write_checkpoint(folder: Path, cfg_dims: dict, seed: int, base: Path | None, shard_bytes: int = 1 << 30) -> None:
    """A bf16 sharded HF folder; a fine-tune = base + small noise (read back shard by shard, low memory)."""
    shapes = llama_shapes(cfg_dims)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    base_ck = LazyCheckpoint(base) if base else None
    shards, cur, size = [], {}, 0
    for name, shape in shapes.items():
        if base_ck is None:
            t = (torch.randn(shape, generator=g) * 0.02 if len(shape) == 2 else torch.ones(shape)).to(torch.bfloat16)
        else:
            b = base_ck.read(name).float()
            t = (b + 0.002 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        cur[name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
    if cur:
        shards.append(cur)
    wm = {}
    for i, sd in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sd, folder / fname, metadata={"format": "pt"})
        wm.update({k: fname for k in sd})
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": wm}))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
           "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": False, **cfg_dims}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))



def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run under /usr/bin/time -v: wall seconds and peak RSS (MB)."""
    t = time.time()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.time() - t
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(rss)}


def max_abs_diff(a: Path, b: Path) -> dict:
    ca, cb = LazyCheckpoint(a), LazyCheckpoint(b)
    worst, worst_name, n_diff = 0.0, None, 0
    for name in ca.names():
        d = float((ca.read(name).float() - cb.read(name).float()).abs().max())
        n_diff += d > 0
        if d > worst:
            worst, worst_name = d, name
    return {"max_abs_diff": worst, "worst_tensor": worst_name, "tensors_differing": n_diff, "tensors": len(ca.names())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/streaming-bench")
    ap.add_argument("--mergekit-venv", default="/tmp/mkvenv")
    ap.add_argument("--layers", type=int, default=LLAMA["num_hidden_layers"])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args(argv)
    dims = {**LLAMA, "num_hidden_layers": args.layers}
    work = Path(args.workdir)
    shapes = llama_shapes(dims)
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    t0 = time.time()
    if not (work / "ft3" / "config.json").exists():
        shutil.rmtree(work, ignore_errors=True)
        write_checkpoint(work / "base", dims, 0, None)
        for i in (1, 2, 3):
            write_checkpoint(work / f"ft{i}", dims, i, work / "base")
    gen_s = time.time() - t0
    ckpt_gb = sum(f.stat().st_size for f in (work / "ft1").glob("*.safetensors")) / 1e9
    configs = {
        "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.3}},
        "ties": {"merge_method": "ties", "parameters": {"normalize": True, "lambda": 1.0, "density": 0.2}},
        "dare_ties": {"merge_method": "dare_ties", "parameters": {"normalize": True, "lambda": 1.0, "density": 0.5}},
    }
    mk_bin = Path(args.mergekit_venv) / "bin" / "mergekit-yaml"
    sm_bin = Path(sys.executable).parent / "safemerge"
    mk_version = subprocess.run([str(Path(args.mergekit_venv) / "bin" / "python"), "-c",
                                 "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip()
    rows = []
    for name, c in configs.items():
        cfg = {**c, "base_model": str(work / "base"), "dtype": "float32", "out_dtype": "bfloat16",
               "models": [{"model": str(work / f"ft{i}"), "parameters": {"weight": 1.0}} for i in (1, 2, 3)]}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        for tool in ("safemerge", "mergekit"):
            out = work / f"out-{tool}-{name}"
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"])
            cmd = ([str(sm_bin), "merge", "--mergekit", str(path), "--out", str(out)] if tool == "safemerge" else
                   [str(mk_bin), str(path), str(out), "--lazy-unpickle", "--out-shard-size", "1B", "--no-copy-tokenizer",
                    "--no-write-model-card", "--random-seed", "0", "--quiet"])
            env = {**os.environ, "TQDM_DISABLE": "1"}
            r = timed(cmd, env)
            print(f"{name:16s} {tool:10s} {r['wall_s']:7.1f} s  peak RSS {r['peak_rss_mb']} MB", flush=True)
            rows.append({"config": name, "tool": tool, **r})
        diff = max_abs_diff(work / f"out-safemerge-{name}", work / f"out-mergekit-{name}")
        rows[-1]["vs_safemerge"] = diff
        sm, mk = rows[-2], rows[-1]
        sm["speedup_vs_mergekit"] = round(mk["wall_s"] / sm["wall_s"], 2)
        sm["rss_ratio_vs_mergekit"] = round(sm["peak_rss_mb"] / mk["peak_rss_mb"], 2)
        for tool in ("safemerge", "mergekit"):
            shutil.rmtree(work / f"out-{tool}-{name}", ignore_errors=True)
    result = {"command": "python benchmarks/streaming.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_description(),
              "checkpoints": {"shape": "Llama (TinyLlama-1.1B dims)", **dims, "parameters": n_params,
                              "dtype": "bfloat16", "gb_each": round(ckpt_gb, 2), "models": 3, "generate_s": round(gen_s, 1)},
              "mergekit_version": mk_version, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "streaming-vs-mergekit.json", result)
    atomic_write_text(out / "streaming-vs-mergekit.md", markdown(result))
    print(markdown(result))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def markdown(r: dict) -> str:
    c = r["checkpoints"]
    lines = ["# Streaming merge: safemerge vs mergekit", "", f"Command: `{r['command']}`  ",
             f"Device: {r['device']}; mergekit {r['mergekit_version']}.  ",
             f"Inputs: a base and {c['models']} fine-tunes, {c['parameters'] / 1e9:.2f} B parameters each, "
             f"{c['dtype']}, {c['gb_each']} GB each, sharded.", "",
             "| config | tool | wall (s) | peak RSS (MB) | speed-up vs mergekit | RSS ratio | max abs diff of outputs |",
             "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        diff = row.get("vs_safemerge")
        lines.append(f"| {row['config']} | {row['tool']} | {row['wall_s']:.1f} | {row['peak_rss_mb']} | "
                     f"{row.get('speedup_vs_mergekit', '')} | {row.get('rss_ratio_vs_mergekit', '')} | "
                     + (f"{diff['max_abs_diff']:.3g} ({diff['tensors_differing']}/{diff['tensors']} tensors differ)"
                        if diff else "") + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
