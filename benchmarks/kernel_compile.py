"""Seconds to compile the fused merge loops (`merging/kernels.py`) on first use, and to load them once cached.

    NUMBA_CACHE_DIR=$(mktemp -d) python benchmarks/kernel_compile.py   # an empty cache: compile
    python benchmarks/kernel_compile.py                               # the cache: load
"""

import time

import numpy as np

t0 = time.time()
from safemerge.merging.kernels import consensus_merge, slerp_rows, weighted_merge, window_count  # noqa: E402

t1 = time.time()
a = np.ones(100, np.float32)
bits = np.ones(100, np.uint16)
window_count(a, a, False, True, np.float32(0.5), np.float32(2), np.empty(100, np.float32))
window_count(bits, bits, True, True, np.float32(0.5), np.float32(2), np.empty(100, np.float32))
t2 = time.time()
for x in (np.ones((2, 100), np.float32), np.ones((2, 100), np.uint16)):  # float32 and bfloat16 inputs
    consensus_merge(tuple(x), x[0], True, 0, 100, np.zeros(2, np.float32), np.zeros(2, np.int64), np.ones((2, 100), bool),
                    True, np.ones(2, np.float32), np.ones(2, np.float32), True, np.float32(1), np.empty(100, np.float32))
    consensus_merge(tuple(x), x[0], True, 0, 100, np.zeros(2, np.float32), np.zeros(2, np.int64), np.ones((2, 0), bool),
                    False, np.ones(2, np.float32), np.ones(2, np.float32), True, np.float32(1), np.empty(100, np.float32))
t3 = time.time()
for x in (np.ones((2, 100), np.float32), np.ones((2, 100), np.uint16)):
    weighted_merge(tuple(x), x[0], True, 100, np.ones((2, 0), bool), False, np.ones(2, np.float32), np.float32(1),
                   np.float32(1), np.empty(100, np.float32))
t4 = time.time()
for x in (np.ones((2, 100), np.float32), np.ones((2, 100), np.uint16)):
    slerp_rows(x[0], x[1], 10, 10, 0.5, 0.9995, 1e-8, np.empty(100, np.float32))
t5 = time.time()
print(f"import {t1 - t0:.2f} s, window_count {t2 - t1:.2f} s, consensus_merge {t3 - t2:.2f} s, "
      f"weighted_merge {t4 - t3:.2f} s, slerp_rows {t5 - t4:.2f} s")
