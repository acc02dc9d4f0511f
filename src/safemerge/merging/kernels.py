"""Fused per-entry loops for the merge engine, compiled by numba (cached on disk after the first use). On CPU a merge
is bound by memory traffic: each vectorised torch or numpy operation reads and writes whole chunks, so TIES's trim,
sign election and disjoint mean cost a dozen passes over every entry, and the exact top-k's counting pass four.
These loops (TIES-like merges, the counting pass, weighted sums of task vectors, SLERP's rows) make each step one
pass over memory: they work through a chunk in blocks small enough to stay in the CPU
cache, model by model (so that the compiler vectorises the inner loops), in float32 with the same operations in the
same order as the reference (`engine.sign_consensus` after the magnitude trim). Inputs are read where they lie (the
memory-mapped file) as stored: bfloat16 as its raw 16 bits (widened to float32 in the block, exactly) or float32, so
no copy of a chunk is ever written to memory; the task vector is taken in the block too. Spans of blocks run on
every core; what must follow entry order (the tie quota at a threshold) is counted per block first, and shared out
in order. Loops index slices from 0: an offset index costs numba a negative-index check per entry, which keeps the
loop from being vectorised."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

BLOCK = 2048  # entries per block: the work arrays of a block stay in the L1/L2 cache
SPANS = 16  # a chunk's blocks are shared out in this many spans to the cores (numba's threads)


@intrinsic
def _f32_from_bits(typingctx, u):  # pragma: no cover - compiled
    """The float32 whose bits are the uint32 `u` (a bit cast, no conversion)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


def value(a: np.ndarray, j: int) -> np.float32:
    """a[j] as float32: bfloat16 stored as its raw bits (uint16) widened exactly, or a float converted.
    Compiled by the overload below (in the loops, where it vectorises); this body serves plain Python calls."""
    if a.dtype == np.uint16:
        return np.uint32(int(a[j]) << 16).view(np.float32)
    return np.float32(a[j])


@overload(value, jit_options={"error_model": "numpy"})
def _value(a, j):  # pragma: no cover - compiled
    if isinstance(a.dtype, types.Integer) and a.dtype.bitwidth == 16:
        return lambda a, j: _f32_from_bits(np.uint32(a[j]) << np.uint32(16))
    return lambda a, j: np.float32(a[j])


def widen(src: np.ndarray, dst: np.ndarray) -> None:
    """dst[:] = src as float32 (src: bfloat16 bits as uint16, or a float array)."""
    if src.dtype == np.uint16:
        dst.view(np.uint32)[:] = src.astype(np.uint32) << 16
    else:
        dst[:] = src


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def window_count(x: np.ndarray, base: np.ndarray, sub_base: bool, signed: bool, lo: np.float32, hi: np.float32,
                 inside: np.ndarray) -> tuple[int, int, int, int]:
    """The counting pass of an exact top-k over one stream chunk: magnitudes v = |x - base| (`sub_base`: a task
    vector from stored inputs), |x| (`signed`) or x itself (already magnitudes). Counts the v below `lo`, equal to
    `lo` and equal to `hi`, and writes those strictly between to the start of `inside` (float32, as long as x).
    Returns (below, equal to lo, equal to hi, count strictly between)."""
    n = x.size
    per = (n + SPANS - 1) // SPANS
    counts = np.zeros((SPANS, 4), dtype=np.int64)
    for p in prange(SPANS):
        s, e = min(n, p * per), min(n, (p + 1) * per)
        d = np.empty(BLOCK, dtype=np.float32)
        flags = np.zeros(BLOCK, dtype=np.uint8)
        words = flags.view(np.uint64)
        below, at_lo, at_hi, n_in = 0, 0, 0, 0
        out = inside[s:e]  # this span's values go to its own stretch first, and are moved together below
        for q in range(s, e, BLOCK):
            size = min(e, q + BLOCK) - q
            xq, bq = x[q: q + size], base[q: q + size]
            if sub_base:
                for j in range(size):
                    d[j] = abs(value(xq, j) - value(bq, j))
            elif signed:
                for j in range(size):
                    d[j] = abs(value(xq, j))
            else:
                for j in range(size):
                    d[j] = value(xq, j)
            c_in = 0
            for j in range(size):  # branch-free, so that it vectorises
                v = d[j]
                below += 1 if v < lo else 0
                at_lo += 1 if v == lo else 0
                at_hi += 1 if v == hi else 0
                f = 1 if (v > lo) and (v < hi) else 0
                flags[j] = f
                c_in += f
            if c_in:  # then the few inside the bracket, eight flags at a time, from the block still in the cache
                for w in range((size + 7) // 8):
                    if words[w]:
                        for j in range(8 * w, min(size, 8 * w + 8)):
                            if flags[j]:
                                out[n_in] = d[j]
                                n_in += 1
        counts[p, 0], counts[p, 1], counts[p, 2], counts[p, 3] = below, at_lo, at_hi, n_in
    k = 0
    for p in range(SPANS):  # in order: each span's values move left (or stay), never over unread ones
        s = min(n, p * per)
        for j in range(counts[p, 3]):
            inside[k + j] = inside[s + j]
        k += counts[p, 3]
    at_hi = counts[:, 2].sum() if hi != lo else 0
    return counts[:, 0].sum(), counts[:, 1].sum(), at_hi, k


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _take(xq: np.ndarray, bs: np.ndarray, sub_base: bool, size: int, d: np.ndarray) -> int:
    """d[:size] = the block's task vector x - base (`sub_base`: stored inputs) or x itself, as float32; returns
    how many of them are NaN or inf (a NaN or inf in the model or the base leaves tau non-finite)."""
    if sub_base:
        for j in range(size):
            d[j] = value(xq, j) - value(bs, j)
    else:
        for j in range(size):
            d[j] = value(xq, j)
    bad = 0
    for j in range(size):
        bad += 0 if abs(d[j]) < np.float32(np.inf) else 1
    return bad


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def consensus_merge(xs: tuple, base: np.ndarray, sub_base: bool, start: int, n: int, thr: np.ndarray,
                    left: np.ndarray, masks: np.ndarray, use_mask: bool, factor: np.ndarray, weight: np.ndarray,
                    normalize: bool, scaling: np.float32, out: np.ndarray) -> int:
    """TIES's merge of entries [start, start + n) of the models `xs` (a tuple of 1-D arrays of one type: stored
    models with `sub_base`, read in place, else float32 task vectors) with the same entries of the base, `base`
    [n], fused. Per model i: tau_i (x_i - base with
    `sub_base`), kept where masks[i] (`use_mask`, DARE; masks [models, n]) or |tau_i| > thr[i], or |tau_i| ==
    thr[i] while the tie quota left[i] lasts (in entry order; left is updated for the next chunk), times
    factor[i]. Then per entry: elect the sign of the sum over models (a zero sum elects +), sum the kept entries
    of that sign, divide by the summed weights of the models that agree (1 where none does) with `normalize`,
    times `scaling`, plus the base, into `out` [n]. Returns how many inputs read were NaN or inf."""
    m = len(xs)
    zero, one, inf = np.float32(0.0), np.float32(1.0), np.float32(np.inf)
    nb = (n + BLOCK - 1) // BLOCK
    ties = np.zeros((m, nb), dtype=np.int64)  # entries at the threshold per block ...
    keep = np.zeros((m, nb), dtype=np.int64)  # ... and how many of them the quota keeps
    if not use_mask:
        for i in range(m):
            if left[i] <= 0:
                continue
            t = thr[i]
            xi = xs[i]
            for bk in prange(nb):
                s = bk * BLOCK
                size = min(n, s + BLOCK) - s
                xq, bs = xi[start + s: start + s + size], base[s: s + size]
                c = 0
                if sub_base:
                    for j in range(size):
                        c += 1 if abs(value(xq, j) - value(bs, j)) == t else 0
                else:
                    for j in range(size):
                        c += 1 if abs(value(xq, j)) == t else 0
                ties[i, bk] = c
            for bk in range(nb):  # the quota goes to the first ties, in entry order
                keep[i, bk] = min(ties[i, bk], left[i])
                left[i] -= keep[i, bk]
    per = (nb + SPANS - 1) // SPANS
    bad = np.zeros(SPANS, dtype=np.int64)
    for p in prange(SPANS):
        d = np.empty((m, BLOCK), dtype=np.float32)
        sign = np.empty(BLOCK, dtype=np.float32)
        mixed = np.empty(BLOCK, dtype=np.float32)
        div = np.empty(BLOCK, dtype=np.float32)
        for bk in range(min(nb, p * per), min(nb, (p + 1) * per)):
            s = bk * BLOCK
            size = min(n, s + BLOCK) - s
            bs = base[s: s + size]
            nonfinite = 0
            for i in range(m):  # task vector, sparsify and scale
                di = d[i]
                nonfinite += _take(xs[i][start + s: start + s + size], bs, sub_base, size, di)
                f = factor[i]
                t = thr[i]
                if use_mask:
                    mi = masks[i, s: s + size]
                    for j in range(size):
                        di[j] = di[j] * f if mi[j] else zero
                elif keep[i, bk] == 0:
                    for j in range(size):
                        di[j] = di[j] * f if abs(di[j]) > t else zero
                elif keep[i, bk] == ties[i, bk]:  # every tie of the block
                    for j in range(size):
                        di[j] = di[j] * f if abs(di[j]) >= t else zero
                else:  # the block where the quota runs out: the first ties
                    quota = keep[i, bk]
                    for j in range(size):
                        v = di[j]
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
            for j in range(size):
                ob[j] = mixed[j] + value(bs, j)
            if not sub_base:  # the base itself, when the task vectors came taken
                for j in range(size):
                    nonfinite += 0 if abs(value(bs, j)) < inf else 1
            bad[p] += nonfinite
    return bad.sum()


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def slerp_rows(a: np.ndarray, b: np.ndarray, rows: int, cols: int, t: float, threshold: float, eps: float,
               out: np.ndarray) -> int:
    """SLERP of each row of `a` (t = 0) towards the same row of `b` (t = 1), `rows` rows of `cols` entries read
    as stored, into `out` [rows * cols] float32, fused: one pass takes each row's norms and dot product (summed
    in float64), the second writes ca * a + cb * b with `engine.slerp`'s coefficients (linear where the
    normalised rows' |dot| > `threshold`, norms <= `eps` taken as 1). Returns how many rows held NaN or inf."""
    bad = np.zeros(rows, dtype=np.uint8)
    for r in prange(rows):
        s = r * cols
        ar, br = a[s: s + cols], b[s: s + cols]
        saa, sbb, sab = 0.0, 0.0, 0.0
        for j in range(cols):
            x, y = np.float64(value(ar, j)), np.float64(value(br, j))
            saa += x * x
            sbb += y * y
            sab += x * y
        if not (saa < np.inf and sbb < np.inf):  # an infinite or NaN entry
            bad[r] = 1
            continue
        na, nb = np.sqrt(saa), np.sqrt(sbb)
        na = na if na > eps else 1.0
        nb = nb if nb > eps else 1.0
        dot = min(1.0, max(-1.0, sab / (na * nb)))
        if abs(dot) > threshold:
            ca, cb = 1.0 - t, t
        else:
            theta = np.arccos(dot)
            sin = np.sin(theta)
            ca, cb = np.sin((1.0 - t) * theta) / sin, np.sin(t * theta) / sin
        fa, fb = np.float32(ca), np.float32(cb)
        o = out[s: s + cols]
        for j in range(cols):
            o[j] = fa * value(ar, j) + fb * value(br, j)
    return int(bad.sum())


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def weighted_merge(xs: tuple, base: np.ndarray, sub_base: bool, n: int, masks: np.ndarray, use_mask: bool,
                   factor: np.ndarray, divisor: np.float32, scaling: np.float32, out: np.ndarray) -> int:
    """Task arithmetic, DARE's linear merge and the weighted average of n entries, fused: per entry, the sum over
    models `xs` (a tuple of 1-D arrays of one type, stored models read in place) of factor[i] * (x_i - base)
    (x_i itself without `sub_base`), kept where masks[i] (`use_mask`; masks [models, n]), divided by `divisor`,
    times `scaling`, plus the base (with `sub_base`), into `out` [n] (float32). Returns how many values read
    were NaN or inf (with `sub_base`, an entry of the base counts once per model)."""
    m = len(xs)
    zero = np.float32(0.0)
    nb = (n + BLOCK - 1) // BLOCK
    per = (nb + SPANS - 1) // SPANS
    bad = np.zeros(SPANS, dtype=np.int64)
    for p in prange(SPANS):
        acc = np.empty(BLOCK, dtype=np.float32)
        d = np.empty(BLOCK, dtype=np.float32)
        for bk in range(min(nb, p * per), min(nb, (p + 1) * per)):
            s = bk * BLOCK
            size = min(n, s + BLOCK) - s
            bs = base[s: s + size]
            nonfinite = 0
            for j in range(size):
                acc[j] = zero
            for i in range(m):
                f = factor[i]
                nonfinite += _take(xs[i][s: s + size], bs, sub_base, size, d)
                if use_mask:
                    mi = masks[i, s: s + size]
                    for j in range(size):
                        acc[j] += d[j] * f if mi[j] else zero
                else:
                    for j in range(size):
                        acc[j] += d[j] * f
            ob = out[s: s + size]
            if sub_base:
                for j in range(size):
                    ob[j] = acc[j] / divisor * scaling + value(bs, j)
            else:
                for j in range(size):
                    ob[j] = acc[j] / divisor * scaling
            bad[p] += nonfinite
    return bad.sum()
