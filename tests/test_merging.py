"""Every data-free merge method against a hand-computed expectation; the engine's building blocks."""

import math

import numpy as np
import pytest
import torch

from safemerge.errors import SafeMergeError
from safemerge.merging import engine
from safemerge.merging.engine import Pruner, select_cuts, sign_consensus, topk_masks
from safemerge.merging.methods import METHODS, merge, method_params, task_vectors

BASE = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b": torch.tensor([0.0, 0.0]), "ids": torch.tensor([3, 4])}
M1 = {"w": torch.tensor([2.0, 1.0, 0.5, 1.0]), "b": torch.tensor([1.0, -1.0]), "ids": torch.tensor([3, 4])}
M2 = {"w": torch.tensor([0.0, 1.5, 0.8, 3.0]), "b": torch.tensor([1.0, 2.0]), "ids": torch.tensor([3, 4])}
# task vectors: t1 = w [1, 0, -0.5, 0], b [1, -1];  t2 = w [-1, 0.5, -0.2, 2], b [1, 2]


def test_weight_average_and_weights():
    out = merge("weight_average", BASE, [M1, M2])
    assert torch.allclose(out["w"], torch.tensor([1.0, 1.25, 0.65, 2.0]))
    assert torch.allclose(out["b"], torch.tensor([1.0, 0.5]))
    assert torch.equal(out["ids"], BASE["ids"])  # integer buffers are not averaged
    out = merge("weight_average", BASE, [M1, M2], weight=[3.0, 1.0])
    assert torch.allclose(out["w"], (3 * M1["w"] + M2["w"]) / 4)


def test_task_arithmetic_with_per_model_weights():
    out = merge("task_arithmetic", BASE, [M1, M2], scaling=0.5)
    # sum of task vectors: w [0, 0.5, -0.7, 2], b [2, 1]
    assert torch.allclose(out["w"], torch.tensor([1.0, 1.25, 0.65, 2.0]))
    assert torch.allclose(out["b"], torch.tensor([1.0, 0.5]))
    out = merge("task_arithmetic", BASE, [M1, M2], scaling=1.0, weight=[1.0, 0.5], normalize=True)
    t1, t2 = task_vectors(BASE, [M1, M2])
    assert torch.allclose(out["w"], BASE["w"] + (t1["w"] + 0.5 * t2["w"]) / 1.5)


def test_ties_global_trim():
    # 6 entries per task vector; density 0.5 keeps exactly int(0.5 * 6) = 3 largest magnitudes of the WHOLE
    # vector, ranked over the tensors in sorted name order (b, then w), ties kept in that order.
    # t1 |.| = b [1, 1], w [1, 0, .5, 0] -> keeps b0, b1 and the first tie at 1 (w0) -> b [1, -1], w [1, 0, 0, 0]
    # t2 |.| = b [1, 2], w [1, .5, .2, 2] -> keeps b1, w3 and the first tie at 1 (b0) -> b [1, 2], w [0, 0, 0, 2]
    out = merge("ties", BASE, [M1, M2], density=0.5, scaling=1.0)
    # w0: only t1 -> 1;  w3: only t2 -> 2;  b0: 1, 1 -> mean 1;  b1: -1, 2 -> sum + -> only t2 -> 2
    assert torch.allclose(out["w"], torch.tensor([2.0, 1.0, 1.0, 3.0]))
    assert torch.allclose(out["b"], torch.tensor([1.0, 2.0]))


def test_ties_tensor_trim_differs_from_global():
    # per tensor, density 0.5: t1 w keeps [1, _, -.5, _]; t2 w keeps [-1, _, _, 2]
    out = merge("ties", BASE, [M1, M2], density=0.5, scaling=1.0, trim="tensor")
    # w0: +1 and -1 -> zero sum elects + (mergekit) -> only t1 -> 1; w2: only t1 -> -0.5; w3: 2
    assert torch.allclose(out["w"], torch.tensor([2.0, 1.0, 0.5, 3.0]))


def test_ties_disjoint_mean_and_weights():
    m3 = {"w": torch.tensor([4.0, 1.0, 1.0, 1.0]), "b": torch.tensor([0.0, 0.0]), "ids": BASE["ids"]}
    out = merge("ties", BASE, [M1, m3], density=1.0, scaling=1.0)
    assert out["w"][0].item() == pytest.approx(3.0)  # w0: t1 = 1, t3 = 3 agree -> mean 2
    out = merge("ties", BASE, [M1, m3], density=1.0, scaling=1.0, weight=[1.0, 3.0])
    assert out["w"][0].item() == pytest.approx(1 + (1 + 9) / 4)  # weighted: (1*1 + 3*3) / (1 + 3)


def test_sign_consensus_is_mergekits():
    d = torch.tensor([[1.0, -2.0, 1.0, 0.0], [-1.0, -1.0, 3.0, 0.0]])
    mixed, div = sign_consensus(d, [1.0, 1.0])
    assert torch.equal(mixed, torch.tensor([1.0, -3.0, 4.0, 0.0]))  # zero sum elects +
    assert torch.equal(div, torch.tensor([1.0, 2.0, 2.0, 1.0]))  # nobody agrees -> 1


def test_dare_with_full_density_is_task_arithmetic():
    a = merge("dare", BASE, [M1, M2], density=1.0, scaling=0.3)
    b = merge("task_arithmetic", BASE, [M1, M2], scaling=0.3)
    assert torch.allclose(a["w"], b["w"]) and torch.allclose(a["b"], b["b"])


def test_dare_drops_and_rescales():
    base = {"w": torch.zeros(20000)}
    model = {"w": torch.ones(20000)}
    out = merge("dare", base, [model], density=0.25, scaling=1.0, seed=3)["w"]
    kept = out != 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 4.0))  # 1 / density
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    assert torch.equal(out, merge("dare", base, [model], density=0.25, scaling=1.0, seed=3)["w"])
    assert not torch.equal(out, merge("dare", base, [model], density=0.25, scaling=1.0, seed=4)["w"])


def test_dare_ties_full_density_is_ties_without_trim():
    a = merge("dare_ties", BASE, [M1, M2], density=1.0, scaling=1.0)
    b = merge("ties", BASE, [M1, M2], density=1.0, scaling=1.0)
    assert torch.allclose(a["w"], b["w"]) and torch.allclose(a["b"], b["b"])


def test_breadcrumbs_drops_outliers_and_small_entries():
    base = {"w": torch.zeros(100)}
    model = {"w": torch.arange(1.0, 101.0)}
    out = merge("breadcrumbs", base, [model], density=0.5, gamma=0.1, scaling=1.0)["w"]
    # keeps ranks 11..60 from the top: values 41..90
    assert torch.equal(out, torch.where((model["w"] >= 41) & (model["w"] <= 90), model["w"], 0.0))
    ties = merge("breadcrumbs_ties", base, [model, model], density=0.5, gamma=0.1, scaling=1.0)["w"]
    assert torch.equal(ties, 2 * out)  # two agreeing copies, summed (no normalisation by default)


def test_della_keeps_large_entries_more_often():
    base = {"w": torch.zeros(64, 256)}
    model = {"w": torch.arange(1.0, 257.0).repeat(64, 1)}
    out = merge("della", base, [model], density=0.5, epsilon=0.4, scaling=1.0, normalize=False)["w"]
    kept = (out != 0).float().mean(0)
    assert kept[:32].mean() < 0.25 and kept[-32:].mean() > 0.75  # p from 0.1 to 0.9 by rank
    nz = out != 0
    p = 0.1 + 0.8 * (model["w"] - 1) / 255
    assert torch.allclose(out[nz], (model["w"] / p)[nz], rtol=1e-5)  # rescaled by 1 / p
    with pytest.raises(SafeMergeError, match="density \\+- epsilon"):
        merge("della", base, [model], density=0.9, epsilon=0.2)


def test_slerp_endpoints_and_angle():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(4, 16, generator=g), "v": torch.randn(16, generator=g)}
    b = {"w": torch.randn(4, 16, generator=g), "v": torch.randn(16, generator=g)}
    assert torch.allclose(merge("slerp", a, [b], t=0.0)["w"], a["w"], atol=1e-6)
    assert torch.allclose(merge("slerp", a, [b], t=1.0)["w"], b["w"], atol=1e-5)
    mid = merge("slerp", a, [b], t=0.5)["w"]
    x, y = a["w"] / a["w"].norm(dim=1, keepdim=True), b["w"] / b["w"].norm(dim=1, keepdim=True)
    theta = torch.acos((x * y).sum(1, keepdim=True))
    want = (torch.sin(theta / 2) / torch.sin(theta)) * (a["w"] + b["w"])
    assert torch.allclose(mid, want, atol=1e-5)
    # 1-D tensors: each entry is its own row (collinear), so linear interpolation (mergekit)
    assert torch.allclose(merge("slerp", a, [b], t=0.25)["v"], 0.75 * a["v"] + 0.25 * b["v"], atol=1e-6)
    with pytest.raises(SafeMergeError, match="exactly 1 model"):
        merge("slerp", a, [b, b])


def test_model_stock_ratio():
    base = {"w": torch.zeros(2, 2)}
    e1, e2 = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    # orthogonal task vectors: cos 0 -> t = 0 -> the base
    assert torch.equal(merge("model_stock", base, [{"w": e1}, {"w": e2}])["w"], base["w"])
    # identical task vectors: cos 1 -> t = 2 / 2 = 1 -> their mean
    out = merge("model_stock", base, [{"w": e1}, {"w": e1.clone()}])["w"]
    assert torch.allclose(out, e1)
    cos = 0.6
    v2 = torch.tensor([[cos, math.sqrt(1 - cos ** 2)], [0.0, 0.0]])
    t = 2 * cos / (1 + cos)
    assert torch.allclose(merge("model_stock", base, [{"w": e1}, {"w": v2}])["w"], t * (e1 + v2) / 2, atol=1e-6)
    with pytest.raises(SafeMergeError, match="at least 2"):
        merge("model_stock", base, [{"w": e1}])


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("mode", ["whole", "window", "miss"])
def test_select_cuts_is_exact_with_ties(monkeypatch, mode, signed):
    """The k-th largest and the tie quota equal a stable descending sort: a stream held whole, sampled and
    resolved in a window, or with a window that misses (the radix fallback)."""
    if mode != "whole":
        monkeypatch.setattr(engine, "EXACT_BELOW", 0)
        monkeypatch.setattr(engine, "SAMPLE", 7)
    if mode == "miss":
        monkeypatch.setattr(engine, "SIGMAS", -3.0)  # brackets that exclude the k-th value
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-50, 50, (5000,), generator=g).float() / 7  # many ties
    chunks = list(x.split(333))
    for k in (1, 17, 1000, 2500, 4999, 5000):
        stream = (lambda every=1: ((0, (c if signed else c.abs())[::every]) for c in chunks))
        cut = select_cuts(stream, [x.numel()], [[k]], signed=signed)[0][0]
        order = torch.argsort(x.abs(), descending=True, stable=True)
        want = torch.zeros(x.numel(), dtype=torch.bool)
        want[order[:k]] = True
        prune = Pruner(cut)
        got = torch.cat([prune.mask(c.abs()) for c in chunks])
        assert torch.equal(got, want), k
        pruned = Pruner(cut)
        kept = torch.cat([pruned(c) for c in chunks])
        assert torch.equal(kept, torch.where(want, x, 0.0)), k
        if k < x.numel():
            assert cut.chunk_equal is not None and sum(cut.chunk_equal) == cut.n_equal


def test_topk_masks_global_and_tensor():
    t = {"a": torch.tensor([3.0, -1.0, 2.0]), "b": torch.tensor([2.0, 0.5])}
    m = topk_masks(t, 0.4, "global")  # round(0.4 * 5) = 2: 3.0, then the first 2.0 (a[2])
    assert m["a"].tolist() == [True, False, True] and m["b"].tolist() == [False, False]
    m = topk_masks(t, 0.5, "tensor")  # round(1.5) = 2 in a, round(1.0) = 1 in b
    assert m["a"].tolist() == [True, False, True] and m["b"].tolist() == [True, False]


def test_unknown_method_and_parameter_are_one_line_errors():
    with pytest.raises(SafeMergeError, match="unknown merge method 'tie'"):
        merge("tie", BASE, [M1])
    with pytest.raises(SafeMergeError, match="no parameter 'lambda'"):
        merge("task_arithmetic", BASE, [M1], **{"lambda": 0.3})
    with pytest.raises(SafeMergeError, match="parameter 'trim'"):
        merge("ties", BASE, [M1], trim="layer")
    with pytest.raises(SafeMergeError, match="parameter 'density'"):
        merge("ties", BASE, [M1], density=1.5)
    with pytest.raises(SafeMergeError, match="'weight' has 3 values for 2 models"):
        merge("task_arithmetic", BASE, [M1, M2], weight=[1.0, 1.0, 1.0])
    with pytest.raises(SafeMergeError, match="needs heads and unlabeled inputs"):
        merge("dam", BASE, [M1])
    assert method_params("ties") == {"weight": 1.0, "density": 0.2, "scaling": 1.0, "normalize": True,
                                     "trim": "global"}
    assert set(METHODS) >= {"slerp", "breadcrumbs", "breadcrumbs_ties", "della", "model_stock"}
    assert torch.equal(METHODS["task_arithmetic"](BASE, [M1])["w"], merge("task_arithmetic", BASE, [M1])["w"])


@pytest.mark.parametrize("use_mask", [False, True])
def test_fused_consensus_equals_the_reference(use_mask):
    """kernels.consensus_merge (trim with a tie quota running across chunks and blocks, or DARE masks; scale;
    sign election; disjoint mean; scaling; base) gives the same float32 entries as Pruner + sign_consensus."""
    from safemerge.merging.engine import Cut
    from safemerge.merging.kernels import BLOCK, consensus_merge

    g = torch.Generator().manual_seed(3)
    m, n = 3, 5 * BLOCK + 77
    x = torch.randint(-40, 40, (m, n), generator=g).float() / 9  # many ties at every threshold
    base = torch.randn(n, generator=g)
    w, f = [1.0, 0.5, 2.0], [1.0, 0.25, 3.0]
    masks = torch.rand(m, n, generator=g) < 0.4
    value = 20 / 9
    n_eq = int((x.abs() == value).sum(1)[0])
    cuts = [Cut(k=1, n=n, value=value, ties=n_eq // 2, n_equal=n_eq), Cut(k=1, n=n, value=value, ties=0,
            n_equal=1), Cut(k=1, n=n, value=1 / 9, ties=0, n_equal=1)]
    ref = x.clone()
    for i in range(m):
        if use_mask:
            ref[i] *= masks[i]
        else:
            prune = Pruner(cuts[i])  # the quota in entry order, across chunks
            ref[i] = torch.cat([prune(c) for c in ref[i].split(1000)])
        ref[i] *= f[i]
    mixed, div = sign_consensus(ref, w)
    want = (mixed / div * 0.7 + base)
    thr = np.array([c.value for c in cuts], dtype=np.float32)
    left = np.array([c.ties for c in cuts], dtype=np.int64)
    out = np.empty(n, dtype=np.float32)
    for s, e in ((0, 1000), (1000, n)):  # two chunks: the quota carries over
        consensus_merge(tuple(x.numpy()), base[s:e].numpy(), False, s, e - s, thr, left, masks[:, s:e].contiguous().numpy(),
                        use_mask, np.array(f, np.float32), np.array(w, np.float32), True, np.float32(0.7),
                        out[s:e])
    assert torch.equal(torch.from_numpy(out), want)
    # the same from stored bfloat16 inputs (their raw bits), the task vectors taken inside the loop
    b16 = base.bfloat16()
    models = (x.bfloat16().float() + b16.float()).bfloat16()  # tau = model - base, as the loop takes it
    tau = models.float() - b16.float()
    thr = np.array([float(tau[0].abs().kthvalue(n // 2).values), float(tau[1].abs().max()), 0.0], np.float32)
    n_eq = int((tau[0].abs() == float(thr[0])).sum())
    cuts = [Cut(k=1, n=n, value=float(thr[0]), ties=n_eq // 3, n_equal=n_eq), Cut(k=1, n=n, value=float(thr[1]),
            ties=0, n_equal=1), Cut(k=n, n=n)]
    ref = tau.clone()
    for i in range(m):
        ref[i] = ref[i] * masks[i] if use_mask else Pruner(cuts[i])(ref[i])
        ref[i] *= f[i]
    mixed, div = sign_consensus(ref, w)
    want = mixed / div * 0.7 + b16.float()
    left = np.array([c.ties for c in cuts], dtype=np.int64)
    thr[2] = -1
    bits = lambda t: t.view(torch.int16).numpy().view(np.uint16)  # noqa: E731
    assert consensus_merge(tuple(bits(models)), bits(b16), True, 0, n, thr, left, masks.numpy(), use_mask,
                           np.array(f, np.float32), np.array(w, np.float32), True, np.float32(0.7), out) == 0
    assert torch.equal(torch.from_numpy(out), want)
    models[1, 5] = float("nan")
    assert consensus_merge(tuple(bits(models)), bits(b16), True, 0, n, thr, left, masks.numpy(), use_mask,
                           np.array(f, np.float32), np.array(w, np.float32), True, np.float32(0.7), out) == 1


@pytest.mark.parametrize("use_mask", [False, True])
def test_fused_weighted_sum_equals_the_reference(use_mask):
    """kernels.weighted_merge (task arithmetic, DARE's linear merge) gives the entries of the plain formula
    base + scaling * sum_i f_i * mask_i * (x_i - base) / divisor, from float32 and stored bfloat16 inputs, and
    counts NaN or inf."""
    from safemerge.merging.kernels import BLOCK, weighted_merge

    g = torch.Generator().manual_seed(4)
    m, n = 3, 3 * BLOCK + 17
    base = torch.randn(n, generator=g).bfloat16()
    x = (base.float() + 0.1 * torch.randn(m, n, generator=g)).bfloat16()
    masks = torch.rand(m, n, generator=g) < 0.5
    f = [1.0, 0.5, 2.0]
    tau = x.float() - base.float()
    want = torch.zeros(n)
    for i in range(m):
        want += tau[i] * f[i] * (masks[i] if use_mask else 1)
    want = want / 1.75 * 0.3 + base.float()
    bits = lambda t: t.contiguous().view(torch.int16).numpy().view(np.uint16)  # noqa: E731
    args = (masks.numpy() if use_mask else np.ones((m, 0), np.bool_), use_mask, np.array(f, np.float32),
            np.float32(1.75), np.float32(0.3))
    for xs, b in ((tuple(x.float().numpy()), base.float().numpy()), (tuple(bits(x)), bits(base))):
        out = np.empty(n, dtype=np.float32)
        assert weighted_merge(xs, b, True, n, *args, out) == 0
        assert torch.allclose(torch.from_numpy(out), want, rtol=1e-6, atol=1e-6)
        # without the base: the weighted sum of the models themselves (the weighted average)
        assert weighted_merge(xs, b, False, n, *args, out) == 0
        plain = sum(x[i].float() * f[i] * (masks[i] if use_mask else 1) for i in range(m)) / 1.75 * 0.3
        assert torch.allclose(torch.from_numpy(out), plain, rtol=1e-6, atol=1e-6)
    x[2, 9] = float("inf")
    assert weighted_merge(tuple(bits(x)), bits(base), True, n, *args, np.empty(n, dtype=np.float32)) == 1


def test_fused_slerp_equals_the_reference():
    """kernels.slerp_rows gives engine.slerp's rows (float32 and stored bfloat16 inputs, collinear, opposite and
    zero rows, 1-entry rows), and counts the rows holding NaN or inf."""
    from safemerge.merging.engine import SLERP_DOT_THRESHOLD, SLERP_EPS, slerp
    from safemerge.merging.kernels import slerp_rows

    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(9, 300, generator=g), torch.randn(9, 300, generator=g)
    b[1] = 2 * a[1]  # collinear: linear
    b[2] = -a[2]  # opposite: linear
    a[3] = 0  # a zero row: its norm is taken as 1
    b[4] = a[4] + 1e-3 * torch.randn(300, generator=g)  # nearly collinear
    bits = lambda t: t.contiguous().view(torch.int16).numpy().view(np.uint16)  # noqa: E731
    for t in (0.0, 0.3, 1.0):
        for x, y, rd in ((a, b, lambda v: v.numpy()), (a.bfloat16(), b.bfloat16(), bits)):
            for rows, cols in ((9, 300), (2700, 1)):
                out = np.empty(9 * 300, dtype=np.float32)
                want = slerp(x.float().reshape(rows, cols), y.float().reshape(rows, cols), t).reshape(-1)
                assert slerp_rows(rd(x).reshape(-1), rd(y).reshape(-1), rows, cols, t, SLERP_DOT_THRESHOLD,
                                  SLERP_EPS, out) == 0
                assert torch.allclose(torch.from_numpy(out), want, rtol=1e-5, atol=1e-6), (t, rows)
    a[6, 7], b[8, 0] = float("nan"), float("inf")
    out = np.empty(9 * 300, dtype=np.float32)
    assert slerp_rows(a.numpy().reshape(-1), b.numpy().reshape(-1), 9, 300, 0.5, SLERP_DOT_THRESHOLD, SLERP_EPS,
                      out) == 2


@pytest.mark.parametrize("method,params", [("ties", {"trim": "tensor", "density": [0.3, 0.5, 0.4]}),
                                           ("ties", {"density": [0.3, 0.5, 0.4]}),
                                           ("breadcrumbs_ties", {"density": [0.7, 0.8, 0.6], "gamma": 0.05}),
                                           ("breadcrumbs", {"density": [0.7, 0.8, 0.6], "gamma": 0.05})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("track", [True, False])
def test_trims_equal_a_sort_reference(monkeypatch, method, params, dtype, track):
    """TIES and breadcrumbs against a plain reference (a stable sort of |tau| per tensor or over the model, ties
    kept in position order; sign election and disjoint sum), with tensors cut into many chunks so that every
    path meets offsets: the fused loop on stored inputs, and float32 task vectors held per tensor. `track`:
    the ties' places come from the selection's per-chunk counts; else they are counted again (long streams)."""
    monkeypatch.setattr("safemerge.merging.engine.CHUNK", 64)
    if not track:
        monkeypatch.setattr("safemerge.merging.engine.TRACK_CHUNKS", 0)
    g = torch.Generator().manual_seed(5)
    shapes = {"a": (40, 16), "b": (24, 8), "c": (16,)}
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    models = [{k: (v.float() + torch.randint(-6, 7, v.shape, generator=g) / 64).to(dtype) for k, v in base.items()}
              for _ in range(3)]
    w = [1.0, 0.5, 2.0]
    got = merge(method, base, models, weight=w, **params)
    dens = params["density"]
    scope = [[k] for k in shapes] if params.get("trim", "tensor" if "breadcrumbs" in method else "global") == "tensor" \
        else [list(shapes)]
    keep = {k: [None] * 3 for k in shapes}
    for names in scope:
        for i in range(3):
            tau = torch.cat([(models[i][k].float() - base[k].float()).reshape(-1) for k in names])
            n = tau.numel()
            order = torch.argsort(-tau.abs(), stable=True)
            if "breadcrumbs" in method:
                k1 = n - max(0, n - int(dens[i] * n) - int(params["gamma"] * n)) - int(dens[i] * n)
                top = order[k1: k1 + int(dens[i] * n)]
            else:
                top = order[: max(1, int(dens[i] * n))]
            mask = torch.zeros(n, dtype=torch.bool)
            mask[top] = True
            pos = 0
            for k in names:
                keep[k][i] = mask[pos: pos + base[k].numel()].view(shapes[k])
                pos += base[k].numel()
    for k in shapes:
        d = torch.stack([((models[i][k].float() - base[k].float()) * keep[k][i] * w[i]).reshape(-1)
                         for i in range(3)])
        if method == "ties":  # disjoint mean, scaling 1
            mixed, div = sign_consensus(d, w)
            want = mixed / div + base[k].float().reshape(-1)
        elif method == "breadcrumbs_ties":  # disjoint sum, scaling 0.3
            want = sign_consensus(d, w)[0] * 0.3 + base[k].float().reshape(-1)
        else:
            want = d.sum(0) * 0.3 + base[k].float().reshape(-1)
        assert torch.equal(got[k].float().reshape(-1), want.to(dtype).float()), k
