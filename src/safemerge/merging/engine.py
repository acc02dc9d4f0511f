"""The merge engine: per-tensor building blocks, and the one loop that runs a merge method over tensors.

Building blocks are small pure functions over float32 tensors (in the style of PEFT's `merge_utils`): task
vectors, sparsification (exact magnitude top-k, its breadcrumbs band, DARE's random keep-and-rescale, DELLA's
rank-dependent keep), sign consensus with the disjoint sum, weighted sums, SLERP. A merge method
(`methods.py`) is a frozen spec that composes them in `merge_tensor(job, options, state)`, a generator of the
merged float32 chunks of one tensor.

`run` drives a spec over `Inputs`: state dicts in memory (`StateDictInputs`) or checkpoints read from disk
(`streaming.CheckpointInputs`). Every tensor is cut into chunks of whole rows on one grid (`grid`, about
`CHUNK` elements each) whatever the source, so both paths compute the same chunks with the same code and give
bit-identical tensors; the chunk index also keys DARE's and DELLA's random draws. Non-finite inputs are caught
by a running sum of every input chunk (NaN and inf propagate into it), then named exactly.

Exact top-k (TIES's trim, breadcrumbs, purification masks): `select_cuts` finds the k-th largest magnitude
of a stream of chunks exactly: a sample brackets it between two values, and one counting pass counts the
entries below and collects those between them; a miss falls back to two passes of radix selection on the high and low 16 bits. Entries equal to the threshold are
kept in stream order until exactly k are kept, which is what a stable descending sort would keep. The same code
serves TIES's global threshold over a whole model (streamed) and a tensor's own (in memory or streamed).

CPU cost shapes the blocks (measured in BENCHMARKS.md, streaming section): work tensors come from one
`Workspace` per merge instead of fresh allocations, sums over models run row by row (`sum_rows`), masks use
numpy's vectorised comparisons (several times faster than torch's on CPU), and the per-entry steps of TIES-like
merges and the counting pass run as fused loops (`kernels.py`) that read the inputs where they lie, as stored
(bfloat16 as raw bits, `Chunk.stack`), and take the task vectors themselves; a tensor's inputs stay mapped
across the passes over it (`TensorJob.held`)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SafeMergeError

CHUNK = 1 << 20  # elements per chunk (whole rows): the unit of work and of the random draws
SAMPLE = 64  # selection: the first pass of a long stream looks at every SAMPLE-th row
MAX_SAMPLE = 1 << 22  # ... or fewer, at most this many values
SIGMAS = 4.0  # ... and brackets the k-th value by this many standard deviations of its sample rank
EXACT_BELOW = 1 << 18  # streams shorter than this are held whole and cut directly
TRACK_CHUNKS = 1 << 16  # streams of at most this many chunks (68 B entries) record where the threshold's ties are
HOLD_BYTES = 1 << 28  # a tensor's inputs up to this size stay mapped across the passes over it
CACHE_ELEMENTS = 1 << 26  # per-tensor trims hold a tensor's task vectors (all models) up to this many floats


# --------------------------------------------------------------------------------------------- the grid
def row_length(shape: Sequence[int]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def grid(shape: Sequence[int]) -> list[tuple[int, int]]:
    """Flat element ranges of a tensor's chunks: whole rows, about CHUNK elements each."""
    n = math.prod(shape)
    if n == 0:
        return []
    step = max(1, CHUNK // row_length(shape)) * row_length(shape)
    return [(s, min(n, s + step)) for s in range(0, n, step)]


# ------------------------------------------------------------------------------------------ building blocks
def task_vector(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """tau = theta_i - theta_0, in float32 (a fresh tensor)."""
    return model.float() - base.float()


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i x_i in float32 (a fresh tensor), summed in order."""
    acc = tensors[0].float() * weights[0] if weights[0] != 1.0 else tensors[0].float().clone()
    for x, w in zip(tensors[1:], weights[1:]):
        acc.add_(x, alpha=w)
    return acc


def sum_rows(x: torch.Tensor, weights: Sequence[float] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_i x[i] over the rows of `x` [models, n], in row order (`out`: a fresh tensor if None). Row by row:
    on CPU a few n-sized ops are several times faster than one reduction or matmul over [models, n]."""
    w = [1.0] * x.shape[0] if weights is None else list(weights)
    if len(w) == 1:
        return torch.mul(x[0], w[0], out=out) if out is not None else x[0] * w[0]
    if w[0] == 1.0:
        acc = torch.add(x[0], x[1], alpha=w[1], out=out) if out is not None else torch.add(x[0], x[1], alpha=w[1])
    else:
        acc = (torch.mul(x[0], w[0], out=out) if out is not None else x[0] * w[0]).add_(x[1], alpha=w[1])
    for row, wi in zip(x[2:], w[2:]):
        acc.add_(row, alpha=wi)
    return acc


def sign_consensus(deltas: torch.Tensor, weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES's sign election and disjoint sum (mergekit's 'sum' consensus) over the rows of `deltas` [models,
    n] (already weighted; overwritten): per entry the sign of sum_i d_i wins (a zero sum elects +), and only the
    non-zero d_i of that sign are summed. Returns (that sum, the summed weights of the models that agree, 1
    where none does). The reference that `kernels.consensus_merge` is tested against; merges run the kernel."""
    elect = sum_rows(deltas).sign_().add_(0.5).sign_()  # +1 where the sum is >= 0, else -1
    for row in deltas:
        row.mul_(elect).clamp_(min=0)  # |d| where d has the elected sign, else 0
    mixed = sum_rows(deltas).mul_(elect)
    for row in deltas:
        row.sign_()  # 1 where the model agrees
    divisor = sum_rows(deltas, weights)
    return mixed, torch.where(divisor == 0, 1.0, divisor)  # no agreeing model (or weights summing to 0): 1


SLERP_DOT_THRESHOLD = 0.9995  # rows closer to collinear than this are interpolated linearly (mergekit's value)
SLERP_EPS = 1e-8  # norms at most this are taken as 1


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = SLERP_DOT_THRESHOLD,
          eps: float = SLERP_EPS) -> torch.Tensor:
    """Spherical interpolation from `a` (t = 0) to `b` (t = 1) of each row ([rows, ...] float32): the angle
    comes from the normalised rows; nearly collinear rows are interpolated linearly (mergekit's SLERP). The
    reference that `kernels.slerp_rows` is tested against; merges run the kernel."""
    x, y = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    na = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    nb = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    na = torch.where(na > eps, na, 1.0)
    nb = torch.where(nb > eps, nb, 1.0)
    dot = ((x / na) * (y / nb)).sum(dim=1, keepdim=True).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0.0, dot))
    sin = torch.sin(theta)
    ca = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin)
    cb = torch.where(linear, t, torch.sin(t * theta) / sin)
    return (ca * x + cb * y).reshape(a.shape)


def uniform16(seed: int, index: int, name: str, chunk: int, n: int, bits: int = 16) -> np.ndarray:
    """n uniform 16-bit integers (8-bit with `bits=8`) for chunk `chunk` of tensor `name` of model `index`,
    from a generator seeded by (seed, index, name, chunk): any chunk is drawn alone, the same in memory and when
    streaming."""
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, index, zlib.crc32(name.encode()), chunk])
    per_word = 64 // bits
    raw = np.random.SFC64(ss).random_raw((n + per_word - 1) // per_word)
    return raw.view(np.uint16 if bits == 16 else np.uint8)[:n]


def keep_level(p: float) -> int:
    """A keep probability as a 16-bit level: keep where uniform16 < level (p quantised to 1/65536)."""
    return int(round(min(max(p, 0.0), 1.0) * 65536))


def dare_mask(seed: int, index: int, name: str, chunk: int, n: int, density: float,
              out: np.ndarray | None = None) -> np.ndarray:
    """DARE's Bernoulli(`density`) keep mask of one chunk (boolean; fresh, or written to `out`). A density that
    is a multiple of 1/256 (0.5, 0.25, 0.1015625...) is drawn exactly from 8 random bits per entry, any other
    from 16 (to 1/65536): the random draws are the largest cost of a streamed DARE merge."""
    out = np.empty(n, dtype=np.bool_) if out is None else out
    level = keep_level(density)
    if level >= 65536:
        out[:] = True
    elif level % 256 == 0:
        np.less(uniform16(seed, index, name, chunk, n, bits=8), level >> 8, out=out)
    else:
        np.less(uniform16(seed, index, name, chunk, n), level, out=out)
    return out


def dare_keep(name: str, shape: Sequence[int], density: float, seed: int, index: int) -> torch.Tensor:
    """The whole boolean DARE keep mask of tensor `name` of model `index` (the chunks' masks, joined)."""
    n = math.prod(shape)
    parts = [torch.from_numpy(dare_mask(seed, index, name, c, e - s, density)) for c, (s, e) in enumerate(grid(shape))]
    return (torch.cat(parts) if parts else torch.zeros(n, dtype=torch.bool)).view(tuple(shape))


def della_mask(x: torch.Tensor, density: float, epsilon: float, seed: int, index: int, name: str,
               chunk: int, rescale: bool = True) -> torch.Tensor:
    """DELLA's MagPrune keep-and-rescale factors of one chunk of rows ([rows, cols] float32): within each row,
    keep probability p = density - epsilon + 2 epsilon * (rank of |x| - 1) / (cols - 1), so larger entries
    are kept more often; kept entries are divided by their p with `rescale` (0 where dropped)."""
    rows = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
    cols = rows.shape[1]
    order = rows.abs().argsort(dim=1)  # ranks by one sort: scatter 0..cols-1 to the sorted positions
    ranks = torch.empty(rows.shape, dtype=torch.float32).scatter_(
        1, order, torch.arange(cols, dtype=torch.float32).expand(rows.shape[0], cols))
    p = (density - epsilon) + ranks * (2 * epsilon / max(1, cols - 1))
    u = torch.from_numpy(uniform16(seed, index, name, chunk, rows.numel()).astype(np.float32))
    keep = (u.view_as(p) + 0.5) < p * 65536
    return (keep / p if rescale else keep.to(torch.float32)).reshape(x.shape)


# ---------------------------------------------------------------------------------------- exact top-k
@dataclass(frozen=True)
class Cut:
    """The k largest magnitudes of a stream: every |x| > value, and the first `ties` of the `n_equal` entries
    equal to value, in stream order (ties == n_equal: all of them)."""

    k: int
    n: int
    value: float = 0.0
    ties: int = 0
    n_equal: int = 0
    chunk_equal: tuple[int, ...] | None = None  # entries equal to value in each chunk of the stream, if known

    @property
    def keeps_all(self) -> bool:
        return self.k >= self.n


def _below(v: float) -> float:
    """The largest float32 smaller than v (v > 0): |x| > below(v) <=> |x| >= v."""
    t = torch.tensor(v, dtype=torch.float32)
    return float(torch.nextafter(t, torch.zeros_like(t)))


class Pruner:
    """Applies a Cut to the chunks of its stream, in stream order (the tie quota runs across chunks)."""

    def __init__(self, cut: Cut):
        self.cut = cut
        self.left = cut.ties
        self.below = _below(cut.value) if cut.value > 0 else 0.0
        self.chunk = 0  # chunks seen (to look up the ties of the next one in cut.chunk_equal)

    def __call__(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """x with the entries outside the top k set to zero (a fresh tensor, or x itself: `inplace`, or all
        entries kept)."""
        thr, quota = self.plan()
        if thr < 0:  # every entry
            return x
        if thr == math.inf:
            return x.zero_() if inplace else torch.zeros_like(x)
        out = x if inplace else None
        if quota > 0:  # this chunk's ties take what is left of the quota, in position order
            eq = x.abs() == self.cut.value
            n = int(eq.sum())
            if n <= quota:
                self.left -= n
                thr = self.below
            else:
                idx = eq.reshape(-1).nonzero()[:quota, 0]
                kept = x.reshape(-1)[idx].clone()
                res = torch.hardshrink(x, thr, out=out) if inplace else F.hardshrink(x, thr)
                res.view(-1)[idx] = kept
                self.left = 0
                return res
        return torch.hardshrink(x, thr, out=out) if inplace else F.hardshrink(x, thr)

    def plan(self) -> tuple[float, int]:
        """The next chunk's (threshold, tie quota) for the fused loop (`kernels.consensus_merge`): keep |x| >
        threshold, and |x| == threshold while the quota lasts (the loop counts that chunk's ties itself and
        gives back what is left through `used`). Known tie counts per chunk spare it the count."""
        c = self.cut
        if c.keeps_all or (c.k > 0 and c.value == 0.0):
            return -1.0, 0  # every entry
        if c.k == 0:
            return math.inf, 0
        if c.ties == c.n_equal:
            return self.below, 0
        self.chunk += 1
        if self.left == 0:
            return c.value, 0
        if c.chunk_equal is not None and c.chunk_equal[self.chunk - 1] <= self.left:
            self.left -= c.chunk_equal[self.chunk - 1]
            return self.below, 0
        return c.value, self.left

    def used(self, left: int) -> None:
        """The quota left after a chunk planned with one (`plan`)."""
        self.left = left

    def mask(self, a: torch.Tensor) -> torch.Tensor:
        """Boolean keep-mask of a chunk of magnitudes (exactly k True over the whole stream)."""
        c = self.cut
        if c.keeps_all or c.k == 0:
            return torch.full(a.shape, c.k > 0, dtype=torch.bool)
        if c.ties == c.n_equal:
            return a >= c.value
        kept = a > c.value
        if self.left:
            eq = (a == c.value).reshape(-1)
            idx = eq.nonzero()[: self.left, 0]
            kept.view(-1)[idx] = True
            self.left -= idx.numel()
        return kept


def _bits(a: torch.Tensor) -> torch.Tensor:
    return a.contiguous().view(torch.int32)


def _cut_from_values(values: torch.Tensor, sizes: list[int], n: int, k: int) -> Cut:
    """The exact cut of a stream held in memory (its chunks concatenated; `sizes`: their lengths)."""
    value = float(values.kthvalue(n - k + 1).values)
    eq = values == value
    n_gt = int((values > value).sum())
    chunk_equal = tuple(int(c.sum()) for c in eq.split(sizes)) if len(sizes) <= TRACK_CHUNKS else None
    return Cut(k=k, n=n, value=value, ties=k - n_gt, n_equal=int(eq.sum()), chunk_equal=chunk_equal)


def select_cuts(stream: Callable[..., Iterable[tuple[int, torch.Tensor]]], totals: Sequence[int],
                ks: Sequence[Sequence[int]], signed: bool = False) -> list[list[Cut]]:
    """Exact top-k cuts of several streams of magnitudes at once. `stream(every)` yields (i, chunk of |x_i|)
    pairs, float32 >= 0 (or x_i itself with `signed`), the same chunks in the same order on every call (with
    every > 1 it may yield a sample of each chunk instead, e.g. every so many rows); stream i has totals[i]
    entries and gets one Cut per k in ks[i].

    Short streams are held whole and cut directly (one pass). Long ones: a sample of each stream brackets each
    k-th value between two sample values (SIGMAS standard deviations of its sample rank either side); a counting
    pass (`kernels.window_count`) then counts the entries below the bracket and collects those inside it (a
    fraction of a percent), which gives the exact value, the ties and where they are. If the bracket missed, two
    passes of radix selection (high, then low 16 bits) find it (still exact, just slower)."""
    cuts: list[list[Cut | None]] = [[None] * len(kk) for kk in ks]
    todo = []
    for i, kk in enumerate(ks):
        for q, k in enumerate(kk):
            if k <= 0 or k >= totals[i]:
                cuts[i][q] = Cut(k=max(0, min(k, totals[i])), n=totals[i])
            else:
                todo.append((i, q))
    if not todo:
        return cuts  # type: ignore[return-value]
    streams = sorted({i for i, _ in todo})
    long = any(totals[i] >= EXACT_BELOW for i in streams)
    every = max(SAMPLE, -(-max(totals[i] for i in streams) // MAX_SAMPLE)) if long else 1
    held: dict[int, list[torch.Tensor]] = {i: [] for i in streams}  # short streams whole, long ones a sample
    for i, a in stream(every):
        if i in held:
            a = _tensor(a).reshape(-1)
            held[i].append(a.abs() if signed else a.clone())
    windows: dict[tuple[int, int], tuple[float, float]] = {}
    for i, q in todo:
        n, k = totals[i], ks[i][q]
        values = torch.cat(held[i]) if held[i] else torch.zeros(0)
        m = values.numel()
        if not long and m == n:  # the whole stream was held
            cuts[i][q] = _cut_from_values(values, [c.numel() for c in held[i]], n, k)
            continue
        r = (n - k) * m / n  # the k-th largest's rank in the sample, ascending
        spread = SIGMAS * math.sqrt(m * (k / n) * (1 - k / n)) + 2
        r_lo, r_hi = int(r - spread), int(math.ceil(r + spread))
        sample = values.numpy()
        ranks = [x for x in (r_lo, r_hi) if 0 <= x < m]
        part = np.partition(sample, ranks) if ranks else sample
        lo = float(part[r_lo]) if 0 <= r_lo < m else 0.0
        hi = float(part[r_hi]) if 0 <= r_hi < m else math.inf
        windows[(i, q)] = (lo, hi)
    del held
    if windows:
        from .kernels import window_count

        inside: dict[tuple[int, int], list[np.ndarray]] = {key: [] for key in windows}
        counts = {key: np.zeros(3, dtype=np.int64) for key in windows}  # below lo, equal to lo, equal to hi
        at_lo: dict[tuple[int, int], list[int]] = {key: [] for key in windows}  # per chunk
        at_hi: dict[tuple[int, int], list[int]] = {key: [] for key in windows}
        wanted = {i: [key for key in windows if key[0] == i] for i, _ in windows}
        buf = np.empty(0, dtype=np.float32)
        for i, a in stream(1):
            keys = wanted.get(i)
            if not keys:
                continue
            if isinstance(a, LazyTV):  # a task vector taken inside the loop, from the stored values
                x, base, sub = a.x, a.base, True
            else:
                x = a.reshape(-1).contiguous().numpy()
                base, sub = x, False
            if buf.size < x.size:
                buf = np.empty(x.size, dtype=np.float32)
            for key in keys:
                lo, hi = windows[key]
                nb, n_lo, n_hi, n_in = window_count(x, base, sub, signed, np.float32(lo), np.float32(hi), buf)
                counts[key] += (nb, n_lo, n_hi)
                at_lo[key].append(n_lo)
                at_hi[key].append(n_hi)
                inside[key].append(buf[:n_in].copy())
        for (i, q), (lo, hi) in windows.items():
            n, k = totals[i], ks[i][q]
            rank = n - k  # ascending, 0-based
            chunks = inside[(i, q)]
            vals = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
            nb, n_lo, n_hi = (int(c) for c in counts[(i, q)])
            if nb <= rank < nb + n_lo:
                value, n_le, per_chunk = lo, nb + n_lo, at_lo[(i, q)]
            elif nb + n_lo <= rank < nb + n_lo + vals.size:
                value, n_le = _select_inside(vals, rank - nb - n_lo, lo, hi)
                n_le += nb + n_lo
                per_chunk = [int(np.count_nonzero(c == value)) for c in chunks]
            elif nb + n_lo + vals.size <= rank < nb + n_lo + vals.size + n_hi:
                value, n_le, per_chunk = hi, nb + n_lo + vals.size + n_hi, at_hi[(i, q)]
            else:  # the sample's bracket missed: exact radix selection
                magnitudes = (lambda every=1: ((j, _tensor(a).abs() if signed else _tensor(a))
                                               for j, a in stream(every)))
                cuts[i][q] = _radix_cut(magnitudes, i, n, k)
                continue
            n_gt = n - n_le
            cuts[i][q] = Cut(k=k, n=n, value=value, ties=k - n_gt, n_equal=int(sum(per_chunk)),
                             chunk_equal=tuple(per_chunk) if len(per_chunk) <= TRACK_CHUNKS else None)
    return cuts  # type: ignore[return-value]


def _select_inside(vals: np.ndarray, r: int, lo: float, hi: float) -> tuple[float, int]:
    """The r-th smallest (0-based) of `vals`, all strictly between lo and hi (>= 0), and how many are <= it: by
    a histogram of their float32 bit patterns (which order non-negative floats) when the window is narrow, as
    it is after a sample's bracket (a partial sort is slow on the many ties of bf16 task vectors)."""
    lo_bits = int(np.float32(lo).view(np.int32))
    width = int(np.float32(hi).view(np.int32)) - lo_bits if math.isfinite(hi) else 1 << 31
    if width > 1 << 24 or width > 8 * vals.size:  # few values: a partial sort is cheaper than the bins
        value = float(np.partition(vals, r)[r])
        return value, int(np.count_nonzero(vals <= value))
    counts = np.bincount(vals.view(np.int32) - lo_bits, minlength=width).cumsum()
    idx = int(np.searchsorted(counts, r, side="right"))
    return float(np.int32(lo_bits + idx).view(np.float32)), int(counts[idx])


def _radix_cut(stream: Callable[..., Iterable[tuple[int, torch.Tensor]]], i: int, n: int, k: int) -> Cut:
    """The fallback: two exact passes of radix selection, on the high then the low 16 bits."""
    rank = n - k
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for j, a in stream(1):
        if j == i:
            hist += torch.bincount(_bits(a).reshape(-1) >> 16, minlength=1 << 16)
    cum = hist.cumsum(0)
    hb = int(torch.searchsorted(cum, torch.tensor(rank), right=True))
    lo, hi = hb << 16, (hb << 16) | 0xFFFF
    low = torch.zeros(hi - lo + 3, dtype=torch.int64)
    sizes: list[torch.Tensor] = []
    for j, a in stream(1):
        if j == i:
            h = torch.bincount(_bits(a).reshape(-1).clamp(lo - 1, hi + 1).sub_(lo - 1), minlength=hi - lo + 3)
            low += h
            sizes.append(h)
    below = int(low[0])
    c2 = below + low[1:-1].cumsum(0)
    idx = int(torch.searchsorted(c2, torch.tensor(rank), right=True))
    value = float(torch.tensor([lo + idx], dtype=torch.int32).view(torch.float32))
    n_gt = n - int(c2[idx])
    chunk_equal = tuple(int(h[1 + idx]) for h in sizes) if len(sizes) <= TRACK_CHUNKS else None
    return Cut(k=k, n=n, value=value, ties=k - n_gt, n_equal=int(low[1 + idx]), chunk_equal=chunk_equal)


def topk_masks(tensors: Mapping[str, torch.Tensor], share: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Boolean masks keeping the round(share * n) largest |x|, over all `tensors` together (scope "global", in
    their order) or within each tensor (scope "tensor"); ties are kept in position order, so the count is
    exact (what a stable descending sort would keep)."""
    out: dict[str, torch.Tensor] = {}
    groups = [[n] for n in tensors] if scope == "tensor" else [list(tensors)]
    for group in groups:
        flat = [tensors[n].float().abs().reshape(-1) for n in group]
        total = sum(x.numel() for x in flat)
        cut = select_cuts(lambda every=1: ((0, x) for x in flat), [total], [[int(round(share * total))]])[0][0]
        keep = Pruner(cut)
        for n, x in zip(group, flat):
            out[n] = keep.mask(x).view(tensors[n].shape)
    return out


# ---------------------------------------------------------------------------------------- inputs, jobs
@dataclass
class Segment:
    """Flat raw views of one tensor of the base and every model, elements [start, stop) (grid-aligned)."""

    start: int
    stop: int
    raw: list[torch.Tensor]  # [base, model 0, model 1, ...], as stored


class Inputs(Protocol):
    n_models: int

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def label(self, j: int) -> str: ...  # 0: the base, 1 + i: model i (for error messages)
    def segments(self, name: str) -> Iterator[Segment]: ...


class StateDictInputs:
    """A base state dict and fine-tuned ones, in memory: one segment per tensor."""

    def __init__(self, base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]],
                 labels: Sequence[str] | None = None):
        self.base, self.models, self.n_models = base, list(models), len(models)
        self.labels = list(labels) if labels else ["the base model", *(f"model {i}" for i in range(len(models)))]

    def names(self) -> list[str]:
        return list(self.base)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.base[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.base[name].dtype

    def label(self, j: int) -> str:
        return self.labels[j]

    def segments(self, name: str) -> Iterator[Segment]:
        # merged on the CPU (the fused loops and DARE's masks work on CPU memory)
        raw = [self.base[name].detach().cpu().reshape(-1), *(m[name].detach().cpu().reshape(-1) for m in self.models)]
        yield Segment(0, raw[0].numel(), raw)


@dataclass
class LazyTV:
    """A task vector chunk not yet taken: the model's and the base's stored values (`Chunk.stack`), read by the
    fused counting pass directly; `tensor()` takes it (|tau| unless `signed`) for everything else."""

    x: np.ndarray
    base: np.ndarray
    signed: bool

    def tensor(self) -> torch.Tensor:
        tau, b = np.empty(self.x.size, np.float32), np.empty(self.x.size, np.float32)
        from .kernels import widen

        widen(self.x, tau)
        widen(self.base, b)
        np.subtract(tau, b, out=tau)
        return torch.from_numpy(tau if self.signed else np.abs(tau, out=tau))


def _tensor(a: torch.Tensor | LazyTV) -> torch.Tensor:
    return a.tensor() if isinstance(a, LazyTV) else a


class Chunk:
    """One chunk of one tensor: the inputs as float32, loaded on demand."""

    def __init__(self, job: TensorJob, seg: Segment, index: int, start: int, stop: int):
        self.job, self.seg, self.index, self.start, self.stop = job, seg, index, start, stop
        self._base: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return self.stop - self.start

    def rows(self) -> tuple[int, ...]:
        """The shape of this chunk as whole rows of the tensor."""
        shape = self.job.shape
        if len(shape) < 1:
            return (self.numel,)
        return (self.numel // row_length(shape), *shape[1:])

    def raw(self, j: int, every: int = 1) -> torch.Tensor:
        """Input j (0: base, 1 + i: model i) as stored; `every` > 1: every so many rows (a sample)."""
        raw = self.seg.raw[j][self.start - self.seg.start: self.stop - self.seg.start]
        if every > 1:
            rows = self.rows()
            raw = raw.view(rows)[::every] if rows[0] >= every else raw[::every]
        return raw

    def load(self, j: int, every: int = 1, check: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
        """Input j as a flat float32 tensor (fresh, or `out`); `check`: its sum joins the finiteness check."""
        raw = self.raw(j, every).reshape(-1)
        x = out.copy_(raw) if out is not None else raw.to(torch.float32, copy=True)
        if check:
            self.job.checksum += x.sum()
        return x

    def stack(self) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        """Every model's chunk and the base's as the fused loops read them: where they lie (no copy) when every
        input is bfloat16 (its raw bits, uint16) or every input is float32, else float32 copies in the job's
        reused buffer (overwritten by the next chunk)."""
        raws = [self.raw(j).reshape(-1) for j in range(1 + self.job.n_models)]
        if all(r.dtype == torch.bfloat16 for r in raws):
            arrays = [r.view(torch.int16).numpy().view(np.uint16) for r in raws]
        elif all(r.dtype == torch.float32 for r in raws):
            arrays = [r.numpy() for r in raws]
        else:
            buf = self.job.workspace.get("stack", len(raws) * self.numel).view(len(raws), self.numel)
            for row, r in zip(buf, raws):
                row.copy_(r)
            arrays = list(buf.numpy())
        return tuple(arrays[1:]), arrays[0]

    def base(self) -> torch.Tensor:
        """The base (do not modify: shared by the model calls; valid until the next chunk's)."""
        if self._base is None:
            self._base = self.load(0, out=self.job.scratch("base", self.numel))
        return self._base

    def model(self, i: int) -> torch.Tensor:
        return self.load(1 + i)

    def tv(self, i: int) -> torch.Tensor:
        """Task vector of model i (fresh)."""
        return self.model(i).sub_(self.base())

    def models(self, every: int = 1, check: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
        """Every model's chunk as rows of one float32 [models, n] tensor: `out`, or the job's reused buffer
        (overwritten by the next chunk, so keep nothing that views it)."""
        first = self.raw(1, every)
        n = first.numel()
        buf = out if out is not None else self.job.buffer(self.job.n_models, n)
        for i in range(self.job.n_models):
            buf[i].view(first.shape).copy_(self.raw(1 + i, every) if i else first)
        if check:
            self.job.checksum += buf.sum()
        return buf


class Workspace:
    """Float32 work tensors reused by the chunks and tensors of one merge: on CPU, touching freshly allocated
    memory costs as much as the arithmetic done in it."""

    def __init__(self) -> None:
        self._slots: dict[str, torch.Tensor] = {}

    def get(self, slot: str, n: int) -> torch.Tensor:
        """n elements of `slot` (content undefined; valid until `slot` is asked for again)."""
        buf = self._slots.get(slot)
        if buf is None or buf.numel() < n:
            buf = self._slots[slot] = torch.empty(max(n, CHUNK))
        return buf[:n]


class TensorJob:
    """One floating-point tensor to merge: its chunks, as often as a method passes over them."""

    def __init__(self, inputs: Inputs, name: str, workspace: Workspace | None = None):
        self.inputs, self.name = inputs, name
        self.shape = inputs.shape(name)
        self.numel = math.prod(self.shape)
        self.n_models = inputs.n_models
        self.grid = grid(self.shape)
        self.checksum = torch.zeros(())
        self.nonfinite = False  # set by the fused loops when an input they read was NaN or inf
        self.workspace = workspace or Workspace()
        self._held: list[Segment] | None = None

    @contextmanager
    def held(self) -> Iterator[None]:
        """Within the block, every pass over the tensor reuses one mapping of its inputs (a fresh mapping costs
        a page fault per 4 KiB on every pass), when they take at most HOLD_BYTES together."""
        size = self.numel * (1 + self.n_models) * self.inputs.dtype(self.name).itemsize
        if self._held is not None or size > HOLD_BYTES:
            yield
            return
        self._held = list(self.inputs.segments(self.name))
        try:
            yield
        finally:
            self._held = None

    def buffer(self, m: int, n: int) -> torch.Tensor:
        """The [m, n] buffer the models of a chunk are loaded into."""
        return self.workspace.get("models", m * n).view(m, n)

    def scratch(self, slot: str, n: int) -> torch.Tensor:
        """A float32 work tensor of n elements, reused by every chunk (valid until the next chunk asks for the
        same slot)."""
        return self.workspace.get(slot, n)

    def chunks(self) -> Iterator[Chunk]:
        c = 0
        for seg in self._held if self._held is not None else self.inputs.segments(self.name):
            while c < len(self.grid) and self.grid[c][1] <= seg.stop:
                s, e = self.grid[c]
                yield Chunk(self, seg, c, s, e)
                c += 1

    def tv_stream(self, every: int = 1, signed: bool = False,
                  lazy: bool = False) -> Iterator[tuple[int, torch.Tensor | LazyTV]]:
        """(i, |tau_i| chunk) for every chunk and model (tau_i itself with `signed`): the magnitude stream of
        per-tensor top-k (with `every` > 1, a sample of its rows, for `select_cuts`' first pass). Chunks are
        views of a reused buffer. `lazy` (with every == 1): `LazyTV`s that the counting pass reads as stored."""
        if lazy and every == 1:
            for ch in self.chunks():
                xs, base = ch.stack()
                for i in range(self.n_models):
                    yield i, LazyTV(xs[i], base, signed)
            return
        for ch in self.chunks():
            x = ch.models(every, check=False)
            x.sub_(ch.load(0, every, check=False))
            if not signed:
                x.abs_()
            for i in range(self.n_models):
                yield i, x[i]

    def task_vectors(self) -> torch.Tensor:
        """Every model's task vector of the whole tensor, [models, numel] float32 (one pass over the inputs; for
        methods that pass over a tensor several times, when it is small enough to hold: see CACHE_ELEMENTS). In
        the workspace: valid until the next tensor's."""
        out = self.workspace.get("task_vectors", self.n_models * self.numel).view(self.n_models, self.numel)
        for ch in self.chunks():
            ch.models(out=out[:, ch.start: ch.stop]).sub_(ch.base())
        return out

    def cached_stream(self, tvs: torch.Tensor, signed: bool = False) -> Callable[..., Iterator[tuple[int, torch.Tensor]]]:
        """`tv_stream` over task vectors held in memory (same chunks, same samples)."""
        def stream(every: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
            for s, e in self.grid:
                rows = (e - s) // row_length(self.shape) if len(self.shape) > 1 else e - s
                for i in range(self.n_models):
                    v = tvs[i, s:e]
                    if every > 1:
                        v = v.view(rows, -1)[::every] if rows >= every else v[::every]
                    yield i, v if signed else torch.abs(v, out=self.scratch("magnitudes", v.numel()).view(v.shape))
        return stream

    def check_finite(self) -> None:
        """Refuse the tensor if an input chunk held NaN or inf, naming the first such input exactly."""
        if not self.nonfinite and math.isfinite(float(self.checksum)):
            return
        for j in range(1 + self.n_models):
            for seg in self.inputs.segments(self.name):
                if not torch.isfinite(seg.raw[j]).all():
                    raise SafeMergeError(f"{self.inputs.label(j)}: tensor '{self.name}' holds NaN or inf values")
        # finite inputs whose sum overflowed: nothing to refuse


class Spec(Protocol):
    """A merge method: a frozen spec composed of building blocks (see methods.py)."""

    name: str
    min_models: int
    max_models: int | None

    def prepare(self, inputs: Inputs, opts: Any) -> Any: ...
    def merge_tensor(self, job: TensorJob, opts: Any, state: Any) -> Iterator[torch.Tensor]: ...


class Sink(Protocol):
    def begin(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None: ...
    def write(self, chunk: torch.Tensor) -> None: ...  # flat, in order; float32 chunks are cast by the sink
    def end(self) -> None: ...


class DictSink:
    """Collects the merged tensors in memory."""

    def __init__(self):
        self.out: dict[str, torch.Tensor] = {}

    def begin(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.name, self.pos = name, 0
        self.flat = torch.empty(math.prod(shape), dtype=dtype)
        self.out[name] = self.flat.view(shape)

    def write(self, chunk: torch.Tensor) -> None:
        n = chunk.numel()
        self.flat[self.pos: self.pos + n].copy_(chunk.reshape(-1))
        self.pos += n

    def end(self) -> None:
        pass


def run(spec: Spec, opts: Any, inputs: Inputs, sink: Sink, out_dtype: torch.dtype | None = None,
        progress: Callable[[str], None] | None = None, state: Any = None) -> None:
    """Merge every tensor of `inputs` with `spec` into `sink`, in the inputs' order. Floating-point tensors are
    computed in float32 and written in their input dtype (or `out_dtype`); others are copied from the base."""
    if state is None:
        state = spec.prepare(inputs, opts)
    workspace = Workspace()
    for name in inputs.names():
        dtype = inputs.dtype(name)
        shape = inputs.shape(name)
        if not dtype.is_floating_point:
            sink.begin(name, shape, dtype)
            for seg in inputs.segments(name):
                sink.write(seg.raw[0])
            sink.end()
        else:
            sink.begin(name, shape, out_dtype or dtype)
            job = TensorJob(inputs, name, workspace)
            for out in spec.merge_tensor(job, opts, state):
                sink.write(out)
            job.check_finite()
            sink.end()
        if progress is not None:
            progress(name)


def per_model(value: Any, n: int, what: str) -> list[float]:
    """A per-model option (mergekit style): one value for every model, or a list with one per model."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise SafeMergeError(f"{what}: {len(value)} values for {n} models")
        return [float(v) for v in value]
    return [float(value)] * n
