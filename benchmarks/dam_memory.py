"""Peak RSS and time of one DAM run on the demo's pool (vision-demo, seed 0; models cached by `safemerge demo`):

    python benchmarks/dam_memory.py                                   # this tree (low_memory=True, the default)
    python benchmarks/dam_memory.py --fast                            # low_memory=False
    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/dam_memory.py    # glibc's mmap threshold fixed for the process
    PYTHONPATH=/path/to/other/checkout/src python benchmarks/dam_memory.py   # another version of the code

The RSS is sampled every 0.2 s from /proc; prints one JSON line: the pool's RSS, DAM's peak and seconds."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time


def rss_mb() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) // 1024


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mask-steps", type=int, default=8)
    ap.add_argument("--adamerging-steps", type=int, default=4)
    ap.add_argument("--fast", action="store_true", help="low_memory=False")
    args = ap.parse_args(argv)
    import safemerge
    from safemerge.bench.suites import _pool_for, get_suite, setting_models
    from safemerge.merging.pool import run_pool_method

    peak = {"phase": "load", "load": 0}

    def sample() -> None:
        while True:
            peak[peak["phase"]] = max(peak.get(peak["phase"], 0), rss_mb())
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    suite = get_suite("vision-demo")
    sm = setting_models(suite, suite.settings[0].name, 0)
    pool, _ = _pool_for(suite, sm.setting, sm.zoo, sm.models, progress=False)
    import gc

    gc.collect()
    time.sleep(0.5)
    peak["phase"] = "pool"
    time.sleep(0.5)
    params = {**next(m for m in suite.methods if m[0] == "dam")[2], "mask_steps": args.mask_steps,
              "adamerging_steps": args.adamerging_steps, **({"low_memory": False} if args.fast else {})}
    peak["phase"] = "dam"
    t0 = time.perf_counter()
    run_pool_method("dam", pool, **params)
    seconds = time.perf_counter() - t0
    time.sleep(0.3)
    out = {"code": os.path.dirname(safemerge.__file__), "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
           "pool_rss_mb": peak.get("pool"), "dam_peak_rss_mb": peak.get("dam"), "dam_seconds": round(seconds, 1), **vars(args)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
