"""Streaming merges against the I/O floor and against mergekit, every figure from one run (issue 16).

Generates a Llama-shaped base and 3 fine-tunes in bf16, sharded like a hub checkpoint (TinyLlama-1.1B shapes by
default: about 2.2 GB each; kept in --workdir between runs), then, in this order:

1. warms the page cache (reads every input once, untimed) before every timed run, so every figure reads from the
   same cache (this machine reclaims cold page-cache pages in the background, and mergekit runs take 4-5 GB:
   with one warm-up at the start only, TIES took 10.0 s in one run and 12.9 s in the next, same code);
2. measures the I/O floor: the time to read every input file once (sequential 16 MB reads) and write an output
   of the merged size once (`io_floor_s`);
3. per method, merges with safemerge (`safemerge merge --mergekit CONFIG`, its own process) and with mergekit
   (`mergekit-yaml`, from a venv) on the same config: wall time and peak RSS (/usr/bin/time -v), and the
   outputs compared (max abs difference and bf16 rounding for deterministic methods; statistics of the merged
   update for the random ones, whose masks come from different generators).

Before each method's timed runs, safemerge merges small checkpoints of the same dtype and count with it, untimed, so
that the fused loops' one-time compile (numba, cached on disk; see kernel_compile.py) is not in the figures.
Every safemerge merge runs `--repeats` times (default 3) and reports the median, with every run's time in
`runs_s`; mergekit runs `--mergekit-repeats` times (default 1: its runs take 15-330 s, and its speed-up ratios
are far from the target). The floor is measured once before each method's runs, prepared as they are (the last
output removed, `sync`, the page cache warmed), and `io_floor_s` is the median of those measurements. Single
runs of the same command on this machine vary by 10-40%, the floor by up to 4x (1.6-6.0 s in one run: writes
into the page cache are fast when a deleted output has just freed memory, slow when pages must be reclaimed).

    python benchmarks/streaming.py                     # full size: run it ALONE on the machine (about an hour
                                                       # with every method; --methods to choose)
    python benchmarks/streaming.py --small --workdir /tmp/sb-small --out /tmp/sb-out   # smoke test, ~1 min

-> benchmarks/results/streaming-vs-mergekit.{json,md} (the .md is generated, with the issue's checks).
The mergekit venv: python3 -m venv --system-site-packages V && V/bin/pip install --no-deps mergekit==0.1.5 &&
V/bin/pip install torch==2.13.0 accelerate immutables peft sentencepiece   (pass --mergekit-venv V).
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

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_ckpt import (METHODS, RANDOM, SMALL, TINYLLAMA, compare, make_checkpoints, mergekit_config,  # noqa: E402
                        n_params, random_stats)

from safemerge.bench.suites import device_description  # noqa: E402
from safemerge.io import atomic_write_json, atomic_write_text  # noqa: E402

SAFEMERGE = [sys.executable, "-c", "from safemerge.cli import main; main()"]
TARGETS = {"ta_vs_floor": 1.3, "ties_vs_ta": 1.5, "speedup": 2.0, "rss_ratio": 0.25}


def inputs_of(work: Path) -> list[Path]:
    return sorted(p for d in ("base", "ft1", "ft2", "ft3") for p in (work / d).glob("*.safetensors"))


def read_all(files: list[Path], buf: bytearray) -> int:
    n = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while True:
                got = fh.readinto(buf)
                if not got:
                    break
                n += got
    return n


def prepare(work: Path, out: Path | None = None) -> None:
    """The state every timed run starts from: the last output removed, dirty pages written, the inputs cached."""
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"])
    read_all(inputs_of(work), bytearray(16 << 20))  # the cache again: a run may have evicted some


def io_floor(work: Path, out_bytes: int) -> dict:
    """Read every input file once and write `out_bytes` once (16 MB at a time), as a merge must (one run)."""
    buf = bytearray(16 << 20)
    files = inputs_of(work)
    prepare(work)
    t = time.perf_counter()
    read = read_all(files, buf)
    t_read = time.perf_counter() - t
    target = work / "io-floor.bin"
    view = memoryview(buf)
    with open(target, "wb", buffering=0) as fh:
        left = out_bytes
        while left:
            left -= fh.write(view[: min(left, len(buf))])
    total = time.perf_counter() - t
    target.unlink()
    subprocess.run(["sync"])
    return {"io_floor_s": round(total, 3), "read_s": round(t_read, 3), "write_s": round(total - t_read, 3),
            "bytes_read": read, "bytes_written": out_bytes}


def median_run(runs: list[dict], key: str) -> dict:
    """The run with the median `key` (the lower middle of an even count), with every run's `key` as `runs_s`."""
    ordered = sorted(runs, key=lambda r: r[key])
    return {**ordered[(len(ordered) - 1) // 2], "runs_s": [r[key] for r in runs]}


def timed(cmd: list[str]) -> dict:
    """Run under /usr/bin/time -v: wall seconds, peak RSS (MB), and the machine's load average around it."""
    load = os.getloadavg()[0]
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                       env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    out = {"wall_s": round(wall, 2), "peak_rss_mb": round(rss), "load_before": round(load, 2)}
    m = re.search(r"\((\d+\.\d)s\)\s*$", p.stdout.strip())
    if m:  # safemerge prints the merge's own time (after interpreter start and imports)
        out["merge_s"] = float(m.group(1))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/streaming-bench")
    ap.add_argument("--mergekit-venv", default="/tmp/mkvenv")
    ap.add_argument("--no-mergekit", action="store_true", help="safemerge and the I/O floor only")
    ap.add_argument("--small", action="store_true", help="tiny dimensions (a smoke test of the script)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--shard-size", default="2GB", help="output shards (mergekit gets the same in parameters)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the floor and of each safemerge merge (median)")
    ap.add_argument("--mergekit-repeats", type=int, default=1, help="runs of each mergekit merge (median)")
    args = ap.parse_args(argv)
    dims = dict(SMALL if args.small else TINYLLAMA)
    if args.layers is not None:
        dims["num_hidden_layers"] = args.layers
    work = Path(args.workdir)
    t0 = time.time()
    make_checkpoints(work, dims)
    gen_s = time.time() - t0
    ckpt_bytes = sum(f.stat().st_size for f in (work / "ft1").glob("*.safetensors"))
    warm = work / "warmup"  # small checkpoints of the same dtype and count: each method's loops compile on them
    make_checkpoints(warm, SMALL)
    floors = []
    mk_bin = Path(args.mergekit_venv) / "bin" / "mergekit-yaml"
    use_mk = not args.no_mergekit and mk_bin.exists()
    mk_version = subprocess.run([str(Path(args.mergekit_venv) / "bin" / "python"), "-c",
                                 "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip() if use_mk else None
    shard_bytes = int(float(args.shard_size.upper().removesuffix("GB")) * 1e9) if args.shard_size.upper().endswith(
        "GB") else int(args.shard_size)
    rows = []
    for method in args.methods:
        cfg = mergekit_config(method, work)
        path = work / f"{method}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        row: dict = {"method": method, "random": method in RANDOM}
        for tool in ("safemerge", "mergekit") if use_mk else ("safemerge",):
            out = work / f"out-{tool}-{method}"
            cmd = ([*SAFEMERGE, "merge", "--mergekit", str(path), "--out", str(out), "--shard-size", args.shard_size]
                   if tool == "safemerge" else
                   [str(mk_bin), str(path), str(out), "--out-shard-size", str(shard_bytes // 2),
                    "--no-copy-tokenizer", "--no-write-model-card", "--random-seed", "0", "--quiet"])
            if tool == "safemerge":
                warm_cfg = warm / f"{method}.yaml"
                warm_cfg.write_text(yaml.safe_dump(mergekit_config(method, warm), sort_keys=False))
                subprocess.run([*SAFEMERGE, "merge", "--mergekit", str(warm_cfg), "--out", str(warm / "out")],
                               check=True, capture_output=True)  # untimed: numba's first-use compile
                shutil.rmtree(warm / "out", ignore_errors=True)
                floors.append(io_floor(work, ckpt_bytes))
                print(f"I/O floor        {floors[-1]['io_floor_s']:8.2f} s  (read {floors[-1]['read_s']} s, write "
                      f"{floors[-1]['write_s']} s)", flush=True)
            runs = []
            for _ in range(args.repeats if tool == "safemerge" else args.mergekit_repeats):
                prepare(work, out)
                runs.append(timed(cmd))
                r = runs[-1]
                print(f"{method:16s} {tool:10s} {r['wall_s']:8.2f} s  peak RSS {r['peak_rss_mb']:6d} MB  "
                      f"(load {r['load_before']})", flush=True)
            row[tool] = median_run(runs, "wall_s")
        if use_mk:
            sm, mk = work / f"out-safemerge-{method}", work / f"out-mergekit-{method}"
            row["outputs"] = random_stats(sm, mk, work / "base") if method in RANDOM else compare(sm, mk)
            row["speedup_vs_mergekit"] = round(row["mergekit"]["wall_s"] / row["safemerge"]["wall_s"], 2)
            row["rss_ratio_vs_mergekit"] = round(row["safemerge"]["peak_rss_mb"] / row["mergekit"]["peak_rss_mb"], 3)
        for tool in ("safemerge", "mergekit"):
            shutil.rmtree(work / f"out-{tool}-{method}", ignore_errors=True)
        rows.append(row)
    floor = median_run(floors, "io_floor_s")
    for row in rows:
        row["vs_io_floor"] = round(row["safemerge"]["wall_s"] / max(floor["io_floor_s"], 1e-3), 2)
        if "merge_s" in row["safemerge"]:
            row["merge_vs_io_floor"] = round(row["safemerge"]["merge_s"] / max(floor["io_floor_s"], 1e-3), 2)
    ta = next((r for r in rows if r["method"] == "task_arithmetic"), None)
    for r in rows:
        if ta is not None:
            r["vs_task_arithmetic"] = round(r["safemerge"]["wall_s"] / ta["safemerge"]["wall_s"], 2)
    result = {"command": "python benchmarks/streaming.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_description(),
              **floor,
              "checkpoints": {"shape": "Llama (TinyLlama-1.1B dims)" if not args.small else "Llama (small dims)",
                              **dims, "parameters": n_params(dims), "dtype": "bfloat16",
                              "gb_each": round(ckpt_bytes / 1e9, 3), "models": 3, "generate_s": round(gen_s, 1)},
              "mergekit_version": mk_version, "shard_size": args.shard_size, "targets": TARGETS,
              "repeats": {"safemerge": args.repeats, "mergekit": args.mergekit_repeats if use_mk else 0},
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "streaming-vs-mergekit.json", result)
    atomic_write_text(out / "streaming-vs-mergekit.md", markdown(result))
    print(markdown(result))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _check(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def _repeats_line(r: dict) -> str:
    rep = r.get("repeats")
    if not rep:
        return "One run each."
    runs = f"each safemerge merge ran {rep['safemerge']} times, the I/O floor once before each method"
    if rep["mergekit"]:
        runs += f", each mergekit merge {rep['mergekit']} time" + ("s" if rep["mergekit"] > 1 else "")
    spread = ", ".join(f"{row['method']} {min(row['safemerge']['runs_s'])}-{max(row['safemerge']['runs_s'])}"
                       for row in r["rows"] if "runs_s" in row["safemerge"])
    return (f"Medians: {runs}; the I/O floor's runs {r.get('runs_s')} s; safemerge's runs (s): {spread}.")


def markdown(r: dict) -> str:
    c = r["checkpoints"]
    rows = r["rows"]
    mk = r["mergekit_version"]
    lines = ["# Streaming merge: safemerge vs the I/O floor and mergekit", "",
             f"Command: `{r['command']}`  ", f"Created: {r['created']}  ",
             f"Device: {r['device']}" + (f"; mergekit {mk}" if mk else "; mergekit not run") + ".  ",
             f"Inputs: a base and {c['models']} fine-tunes, {c['parameters'] / 1e9:.3f} B parameters each, "
             f"{c['dtype']}, {c['gb_each']} GB each, sharded; output shards {r['shard_size']}.  ",
             f"**I/O floor: {r['io_floor_s']} s** (read every input once: {r['read_s']} s; write the output once: "
             f"{r['write_s']} s; page cache warmed first, and again before every run below).", "",
             "wall = the whole command (interpreter start, imports, checks, merge, write); merge = safemerge's own "
             "timer, after start-up. Load = the machine's 1-minute load average before the run (a clean run has "
             "it near 0). " + _repeats_line(r), "",
             "| method | safemerge wall (s) | merge (s) | wall x I/O floor | merge x I/O floor | x task arithmetic | "
             "peak RSS (MB) | mergekit wall (s) | mergekit RSS (MB) | speed-up | RSS ratio | outputs | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        sm, m = row["safemerge"], row.get("mergekit", {})
        o = row.get("outputs")
        if o is None:
            outputs = ""
        elif row["random"]:
            outputs = (f"random masks: changed {o['share_changed_safemerge']:.3f} vs {o['share_changed_mergekit']:.3f}"
                       f", update L2 ratio {o['l2_update_ratio']}, cosine {o['update_cosine']}")
        else:
            outputs = (f"max abs diff {o['max_abs_diff']:.3g}; " +
                       ("within bf16 rounding" if o["within_bf16_rounding"] else
                        f"{o['entries_beyond_bf16_rounding']} of {o['entries']} entries beyond bf16 rounding"))
        lines.append(f"| {row['method']} | {sm['wall_s']:.2f} | {sm.get('merge_s', '')} | {row['vs_io_floor']} | "
                     f"{row.get('merge_vs_io_floor', '')} | "
                     f"{row.get('vs_task_arithmetic', '')} | {sm['peak_rss_mb']} | {m.get('wall_s', '')} | "
                     f"{m.get('peak_rss_mb', '')} | {row.get('speedup_vs_mergekit', '')} | "
                     f"{row.get('rss_ratio_vs_mergekit', '')} | {outputs} | {sm['load_before']} |")
    by = {row["method"]: row for row in rows}
    t = r["targets"]
    checks = []
    if "task_arithmetic" in by:
        v = by["task_arithmetic"]["vs_io_floor"]
        checks.append(f"| task arithmetic <= {t['ta_vs_floor']} x I/O floor | {v} | {_check(v <= t['ta_vs_floor'])} |")
        for name in ("ties", "dare_ties"):
            if name in by:
                v = by[name]["vs_task_arithmetic"]
                checks.append(f"| {name} <= {t['ties_vs_ta']} x task arithmetic | {v} | {_check(v <= t['ties_vs_ta'])} |")
    if mk:
        slow = [row["method"] for row in rows if row["speedup_vs_mergekit"] < t["speedup"]]
        fat = [row["method"] for row in rows if row["rss_ratio_vs_mergekit"] > t["rss_ratio"]]
        off = [row["method"] for row in rows if not row["random"] and not row["outputs"]["within_bf16_rounding"]]
        checks.append(f"| every method >= {t['speedup']} x faster than mergekit | "
                      f"{'all' if not slow else 'not: ' + ', '.join(slow)} | {_check(not slow)} |")
        checks.append(f"| every method <= {t['rss_ratio']} x mergekit's peak RSS | "
                      f"{'all' if not fat else 'not: ' + ', '.join(fat)} | {_check(not fat)} |")
        checks.append(f"| deterministic outputs within bf16 rounding of mergekit's | "
                      f"{'all' if not off else 'not: ' + ', '.join(off)} | {_check(not off)} |")
    if checks:
        lines += ["", "## The issue's checks", "", "| check | measured | met |", "|---|---|---|", *checks]
    lines += ["", "Random methods (dare_ties, dare_linear, della) draw their masks from different generators in the two "
              "tools, and rescale kept entries differently (safemerge: by 1/keep probability, as the papers; mergekit: to "
              "each tensor's L1 norm): their rows compare the share of changed entries and the merged updates' size and "
              "direction instead of entries. See benchmarks/results/mergekit-parity.md for every method on small "
              "checkpoints."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
