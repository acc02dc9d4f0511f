"""Post-hoc defenses (AWM, SAU, ANP) on tiny random encoders: keys and dtypes, identity at zero steps, ANP
pruning, the text path (perturbations in embedding space), one-line errors, and SAU actually training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from safemerge.backbones import load_backbone
from safemerge.safety.defenses import DEFENSES, _Net, anp_neurons, anp_pruned, defend, defense_params
from safemerge.errors import SafeMergeError
from safemerge.model import InputEncoder
from safemerge.data import Split

FAST = {"awm": {"steps": 2, "batch_size": 4}, "sau": {"steps": 2, "batch_size": 4, "pgd_steps": 2},
        "anp": {"steps": 2, "batch_size": 4}}
WORDS = ["good", "bad", "the", "movie", "is", "a", "dog", "cat", "runs", "fast", "slow", "very", "not"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine OpenMP spinning slows them ~50x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pool(path, text: bool):
    """A tiny encoder, a 'merged' copy (0.05 noise), two heads (3 and 4 classes), 12 examples per task."""
    bb = load_backbone(str(path))
    base = {k: v.clone() for k, v in bb.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    merged = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
              for k, v in base.items()}
    torch.manual_seed(0)
    heads = [nn.Linear(bb.hidden_size, 3), nn.Linear(bb.hidden_size, 4)]
    if text:
        lengths = torch.randint(2, 9, (12,), generator=g).tolist()
        xs = [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (n,), generator=g).tolist())
              for n in lengths]
        x0, x1 = xs, xs[::-1]
    else:
        x0 = torch.randint(0, 256, (12, 3, 28, 28), dtype=torch.uint8, generator=g)
        x1 = x0.flip(0)
    data = [Split(x0, torch.randint(0, 3, (12,), generator=g)),
            Split(x1, torch.randint(0, 4, (12,), generator=g))]
    return bb, base, merged, heads, data, InputEncoder(bb, max_length=16)


def _run(name, pool, **params):
    bb, base, merged, heads, data, enc = pool
    return defend(name, bb.model, base, merged, heads, data, enc, progress=False, **params)


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_keys_dtypes_and_identity_at_zero_steps(tiny_vision, name):
    pool = _pool(tiny_vision, text=False)
    bb, base, merged = pool[:3]
    out = _run(name, pool, **FAST[name])
    assert list(out) == list(merged)
    assert all(out[k].shape == merged[k].shape and out[k].dtype == merged[k].dtype for k in merged)
    if name != "anp":  # two ANP steps leave every mask above 0.2 (its pruning has its own test)
        assert any(not torch.equal(out[k], merged[k]) for k in merged), "the defense changed nothing"
    same = _run(name, pool, **{**FAST[name], "steps": 0})
    assert all(torch.equal(same[k], merged[k]) for k in merged)
    assert all(torch.equal(bb.model.state_dict()[k], base[k]) for k in base)  # caller's encoder untouched


def test_awm_mask_of_zero_gives_base_and_row_masks_scale_rows(tiny_vision):
    pool = _pool(tiny_vision, text=False)
    bb, base, merged = pool[:3]
    # a huge L1 weight drives every mask entry to 0: the merge falls back to the pre-trained weights
    out = _run("awm", pool, steps=3, batch_size=4, l1=1e3, mask_lr=1.0)
    assert all(torch.allclose(out[n], base[n], atol=1e-6) for n, _ in bb.model.named_parameters())
    row = _run("awm", pool, steps=2, batch_size=4, granularity="row", labeled=False)
    w = "encoder.layer.0.mlp.fc1.weight"
    ratio = (row[w] - base[w]) / (merged[w] - base[w])  # one factor per row
    assert not torch.allclose(ratio, torch.ones_like(ratio))
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-3)


def test_anp_prunes_with_threshold_one_and_only_neuron_rows(tiny_vision):
    pool = _pool(tiny_vision, text=False)
    merged = pool[2]
    out = _run("anp", pool, steps=2, batch_size=4, threshold=1.0)
    assert anp_pruned(merged, out) > 0
    layers = set(anp_neurons(list(merged)))
    assert len(layers) == 4  # 2 blocks x (mlp.fc1, attention o_proj)
    changed = {k for k in merged if not torch.equal(out[k], merged[k])}
    assert changed and changed <= layers
    for w in changed:
        rows = ~(out[w] == merged[w]).all(1)
        assert (out[w][rows] == 0).all()
    assert anp_pruned(merged, _run("anp", pool, steps=2, batch_size=4, threshold=0.0)) == 0


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_text_path_runs(tiny_text, name):
    pool = _pool(tiny_text, text=True)
    merged = pool[2]
    params = {**FAST[name], "threshold": 1.0} if name == "anp" else FAST[name]
    out = _run(name, pool, **params)
    assert list(out) == list(merged) and all(out[k].dtype == merged[k].dtype for k in merged)
    assert any(not torch.equal(out[k], merged[k]) for k in merged)


def test_text_perturbations_act_on_embeddings(tiny_text):
    bb, base, merged, heads, data, enc = _pool(tiny_text, text=True)
    net = _Net(bb.model, base, merged, heads, data, enc, "test")
    x = enc(data[0].x[:4])
    clean = net.logits(net.merged, 0, x)
    universal = net.logits(net.merged, 0, x, torch.zeros(16, bb.hidden_size))
    per_example = net.logits(net.merged, 0, x, torch.zeros(4, x["input_ids"].shape[1], bb.hidden_size))
    assert torch.allclose(clean, universal, atol=1e-5) and torch.allclose(clean, per_example, atol=1e-5)
    assert not torch.allclose(clean, net.logits(net.merged, 0, x, torch.randn(16, bb.hidden_size)), atol=1e-3)


def test_errors_are_one_liners(tiny_vision):
    pool = _pool(tiny_vision, text=False)
    bb, base, merged, heads, data, enc = pool
    with pytest.raises(SafeMergeError, match="unknown defense 'fp'"):
        _run("fp", pool)
    with pytest.raises(SafeMergeError, match="no parameter 'stepz'"):
        _run("anp", pool, stepz=3)
    with pytest.raises(SafeMergeError, match="one head and one clean split"):
        defend("sau", bb.model, base, merged, heads[:1], data, enc, progress=False)
    with pytest.raises(SafeMergeError, match="granularity"):
        _run("awm", pool, granularity="column")
    with pytest.raises(SafeMergeError, match="missing"):
        defend("awm", bb.model, base, {k: v for k, v in merged.items() if "fc1" not in k}, heads, data, enc)
    assert set(defense_params("anp")) >= {"steps", "threshold", "eps", "alpha", "lr", "momentum"}
    assert "seed" not in defense_params("sau") and "encoder" not in defense_params("awm")


def test_defenses_are_deterministic_under_seed(tiny_vision):
    pool = _pool(tiny_vision, text=False)
    a, b = (_run("awm", pool, steps=2, batch_size=4, seed=3) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sau_lowers_the_clean_loss_of_a_damaged_merge(tiny_vision):
    """SAU's objective contains lmd1 * CE_clean: on a merge with random heads it must fit the clean data."""
    pool = _pool(tiny_vision, text=False)
    bb, base, merged, heads, data, enc = pool

    def clean_loss(sd):
        net = _Net(bb.model, base, sd, heads, data, enc, "test")
        with torch.no_grad():
            return sum(float(F.cross_entropy(net.logits(net.merged, i, enc(d.x)), d.y))
                       for i, d in enumerate(data))

    out = _run("sau", pool, steps=15, batch_size=12, pgd_steps=1, lr=3e-3)
    assert clean_loss(out) < clean_loss(merged) - 0.1
