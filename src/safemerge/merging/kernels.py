"""Fused per-entry loops for the merge engine, compiled by numba (cached on disk after the first use).

On CPU a merge is bound by memory traffic: each vectorised torch or numpy operation reads and writes whole
chunks, so TIES's trim, sign election and disjoint mean cost a dozen passes over every entry, and the exact
top-k's counting pass four. These loops make each step one pass over memory: they work through a chunk in
blocks small enough to stay in the CPU cache, model by model (so that the compiler vectorises the inner
loops), in float32 with the same operations in the same order as the reference (`engine.sign_consensus` after
the magnitude trim). Spans of blocks run on every core; what must follow entry order (the tie quota at a
threshold) is counted per block first, and shared out in order. Loops index slices from 0: an offset index
costs numba a negative-index check per entry, which keeps the loop from being vectorised."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

BLOCK = 2048  # entries per block: the work arrays of a block stay in the L1/L2 cache
SPANS = 16  # a chunk's blocks are shared out in this many spans to the cores (numba's threads)


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def window_count(a: np.ndarray, signed: bool, lo: np.float32, hi: np.float32, inside: np.ndarray,
                 flags: np.ndarray) -> tuple[int, int, int, int]:
    """The counting pass of an exact top-k over a flat float32 array of magnitudes (of |a| with `signed`): how
    many lie below `lo`, how many equal `lo` and how many equal `hi`; those strictly between are written to the
    start of `inside` (as long as `a`). `flags`: uint8 scratch as long as `a`. Returns (below, equal to lo,
    equal to hi, count strictly between)."""
    n = a.size
    per = (n + SPANS - 1) // SPANS
    counts = np.zeros((SPANS, 4), dtype=np.int64)
    for p in prange(SPANS):
        s, e = min(n, p * per), min(n, (p + 1) * per)
        ap, fp = a[s:e], flags[s:e]
        below, at_lo, at_hi, n_in = 0, 0, 0, 0
        for j in range(e - s):
            v = abs(ap[j]) if signed else ap[j]
            below += 1 if v < lo else 0
            at_lo += 1 if v == lo else 0
            at_hi += 1 if v == hi else 0
            inner = (v > lo) and (v < hi)
            n_in += 1 if inner else 0
            fp[j] = 1 if inner else 0
        counts[p, 0], counts[p, 1], counts[p, 2], counts[p, 3] = below, at_lo, at_hi, n_in
    offsets = np.zeros(SPANS + 1, dtype=np.int64)
    for p in range(SPANS):
        offsets[p + 1] = offsets[p] + counts[p, 3]
    for p in prange(SPANS):
        if counts[p, 3] == 0:
            continue
        s, e = min(n, p * per), min(n, (p + 1) * per)
        ap, fp = a[s:e], flags[s:e]
        out = inside[offsets[p]: offsets[p + 1]]
        k = 0
        for j in range(e - s):
            if fp[j]:
                out[k] = abs(ap[j]) if signed else ap[j]
                k += 1
    at_hi = counts[:, 2].sum() if hi != lo else 0
    return counts[:, 0].sum(), counts[:, 1].sum(), at_hi, offsets[SPANS]


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def consensus_merge(x: np.ndarray, start: int, n: int, thr: np.ndarray, left: np.ndarray, masks: np.ndarray,
                    use_mask: bool, factor: np.ndarray, weight: np.ndarray, normalize: bool, scaling: np.float32,
                    base: np.ndarray, out: np.ndarray) -> None:
    """TIES's merge of entries [start, start + n) of the task vectors `x` [models, N] (C-contiguous), fused.
    Per model i: keep tau_i where masks[i] (`use_mask`, DARE; masks [models, n]) or |tau_i| > thr[i], or
    |tau_i| == thr[i] while the tie quota left[i] lasts (in entry order; left is updated for the next chunk),
    times factor[i]. Then per entry: elect the sign of the sum over models (a zero sum elects +), sum the kept
    entries of that sign, divide by the summed weights of the models that agree (1 where none does) with
    `normalize`, times `scaling`, plus `base` [n], into `out` [n]."""
    m = x.shape[0]
    zero, one = np.float32(0.0), np.float32(1.0)
    nb = (n + BLOCK - 1) // BLOCK
    ties = np.zeros((m, nb), dtype=np.int64)  # entries at the threshold per block ...
    keep = np.zeros((m, nb), dtype=np.int64)  # ... and how many of them the quota keeps
    if not use_mask:
        for i in range(m):
            if left[i] <= 0:
                continue
            t = thr[i]
            for b in prange(nb):
                xi = x[i, start + b * BLOCK: start + min(n, (b + 1) * BLOCK)]
                c = 0
                for j in range(xi.size):
                    c += 1 if abs(xi[j]) == t else 0
                ties[i, b] = c
            for b in range(nb):  # the quota goes to the first ties, in entry order
                keep[i, b] = min(ties[i, b], left[i])
                left[i] -= keep[i, b]
    per = (nb + SPANS - 1) // SPANS
    for p in prange(SPANS):
        d = np.empty((m, BLOCK), dtype=np.float32)
        sign = np.empty(BLOCK, dtype=np.float32)
        mixed = np.empty(BLOCK, dtype=np.float32)
        div = np.empty(BLOCK, dtype=np.float32)
        for b in range(min(nb, p * per), min(nb, (p + 1) * per)):
            s = b * BLOCK
            size = min(n, s + BLOCK) - s
            for i in range(m):  # sparsify and scale
                xi = x[i, start + s: start + s + size]
                di = d[i]
                f = factor[i]
                t = thr[i]
                if use_mask:
                    mi = masks[i, s: s + size]
                    for j in range(size):
                        di[j] = xi[j] * f if mi[j] else zero
                elif keep[i, b] == 0:
                    for j in range(size):
                        di[j] = xi[j] * f if abs(xi[j]) > t else zero
                elif keep[i, b] == ties[i, b]:  # every tie of the block
                    for j in range(size):
                        di[j] = xi[j] * f if abs(xi[j]) >= t else zero
                else:  # the block where the quota runs out: the first ties
                    quota = keep[i, b]
                    for j in range(size):
                        v = xi[j]
                        kept = abs(v) > t
                        if abs(v) == t and quota > 0:
                            kept = True
                            quota -= 1
                        di[j] = v * f if kept else zero
            d0 = d[0]
            for j in range(size):  # the elected sign: of the sum, in model order
                sign[j] = d0[j]
            for i in range(1, m):
                di = d[i]
                for j in range(size):
                    sign[j] += di[j]
            for j in range(size):
                sign[j] = one if sign[j] >= zero else -one
                mixed[j] = zero
                div[j] = zero
            for i in range(m):  # the disjoint sum and the agreeing weights, in model order
                di = d[i]
                w = weight[i]
                for j in range(size):
                    q = di[j] * sign[j]
                    mixed[j] += q if q > zero else zero
                    div[j] += w if q > zero else zero
            for j in range(size):
                mixed[j] *= sign[j]
            if normalize:
                for j in range(size):
                    mixed[j] /= div[j] if div[j] != zero else one
            if scaling != one:
                for j in range(size):
                    mixed[j] *= scaling
            ob = out[s: s + size]
            bb = base[s: s + size]
            for j in range(size):
                ob[j] = mixed[j] + bb[j]
