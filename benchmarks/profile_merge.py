"""One streamed merge from a mergekit YAML, timed in-process (after imports; no interpreter start-up), optionally
under cProfile: the measurement behind BENCHMARKS.md's in-process figures. Run it alone on the machine, after
`python benchmarks/streaming.py --keep` has generated the checkpoints and YAMLs.

    python benchmarks/profile_merge.py /tmp/streaming-bench/ties.yaml             # seconds
    python benchmarks/profile_merge.py /tmp/streaming-bench/ties.yaml --cprofile  # + the 25 costliest functions
    python benchmarks/profile_merge.py /tmp/streaming-bench/ties.yaml --method-params '{"trim": "global"}'
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import tempfile
import time
from pathlib import Path

from safemerge.merging.mergekit import load_mergekit_config
from safemerge.merging.streaming import streaming_merge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--method-params", default="{}", help="JSON options added to the config's (e.g. the trim)")
    args = ap.parse_args()
    plan = load_mergekit_config(args.config)
    params = {**plan.params, **json.loads(args.method_params)}
    out = Path(tempfile.mkdtemp(prefix="profile-merge-", dir=Path(args.config).parent)) / "out"

    def go() -> None:
        streaming_merge(plan.method, plan.base, plan.models, out, params, out_dtype=plan.out_dtype, progress=False)

    t = time.perf_counter()
    try:
        if args.cprofile:
            prof = cProfile.Profile()
            prof.runcall(go)
            print(f"{time.perf_counter() - t:.2f} s")
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        else:
            go()
            print(f"{time.perf_counter() - t:.2f} s")
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
