"""AdaMerging on a tiny random DINOv2: the functional merge equals task arithmetic, lambdas get gradients."""

from __future__ import annotations

import torch
from torch import nn

from safemerge.merging.adamerging import MergedEncoder, adamerging, entropy
from safemerge.backbones import load_backbone
from safemerge.merging.methods import merge
from safemerge.model import InputEncoder, as_head


def _setup(tiny_vision):
    bb = load_backbone(str(tiny_vision))
    base = {k: v.clone() for k, v in bb.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    models = [{k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
              for _ in range(2)]
    heads = [nn.Linear(bb.hidden_size, 3), nn.Linear(bb.hidden_size, 4)]
    x = torch.randint(0, 256, (20, 3, 28, 28), dtype=torch.uint8)
    return bb, base, models, heads, x


def test_functional_merge_matches_task_arithmetic_and_zero_gives_base(tiny_vision):
    bb, base, models, _, _ = _setup(tiny_vision)
    m = MergedEncoder(bb.model, base, models, "vision")
    ta = merge("task_arithmetic", base, models, scaling=0.3)
    p = m.params(torch.full((2,), 0.3))
    assert all(torch.allclose(p[n], ta[n], atol=1e-6) for n in m.names)
    p0 = m.params(torch.zeros(2, len(m.names)))
    assert all(torch.equal(p0[n], base[n]) for n in m.names)


def test_adamerging_lambdas_receive_gradients_and_move(tiny_vision):
    bb, base, models, heads, x = _setup(tiny_vision)
    enc = InputEncoder(bb)
    m = MergedEncoder(bb.model, base, models, "vision")
    lam = torch.full((2, len(m.names)), 0.3, requires_grad=True)
    loss = entropy(m.logits(as_head(heads[0], m.modality), m.params(lam), enc(x[:4])))
    loss.backward()
    assert lam.grad is not None and lam.grad.abs().sum() > 0
    for gran in ("task", "layer"):
        sd, lams = adamerging(bb.model, base, models, heads, [x, x], enc, granularity=gran, steps=3, lr=0.05,
                              progress=False)
        assert lams.shape == ((2,) if gran == "task" else (2, len(m.names)))
        assert not torch.allclose(lams, torch.full_like(lams, 0.3)) and lams.min() >= 0 and lams.max() <= 1
        assert set(sd) == set(base)
