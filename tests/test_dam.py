"""Concrete merging, DAM, Fisher, RegMean and BadMerging on tiny random encoders."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from safemerge.merging.adamerging import MergedEncoder, entropy
from safemerge.bench.attacks import make_attack
from safemerge.backbones import load_backbone
from safemerge.merging.concrete import ConcreteMask, concrete_adamerging, concrete_task_arithmetic, dam
from safemerge.merging.datadriven import fisher_merge, regmean
from safemerge.errors import SafeMergeError
from safemerge.model import InputEncoder, as_head
from safemerge.perturb import project, project_l1
from safemerge.merging.pool import Pool, run_pool_method

TEXTS = ["the movie is good", "a dog runs fast", "very bad movie", "not a slow cat", "the cat is very good"] * 4


def _pool(path, modality: str, n_models: int = 2):
    bb = load_backbone(str(path))
    base = {k: v.clone() for k, v in bb.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    models = [{k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in base.items()} for _ in range(n_models)]
    torch.manual_seed(0)
    heads = [nn.Linear(bb.hidden_size, 3 + i) for i in range(n_models)]
    x = torch.randint(0, 256, (20, 3, 28, 28), dtype=torch.uint8) if modality == "vision" else TEXTS
    return bb, base, models, heads, [x] * n_models


@pytest.fixture(params=["vision", "text"])
def pool(request, tiny_vision, tiny_text):
    return _pool(tiny_vision if request.param == "vision" else tiny_text, request.param)


def test_mask_and_lambda_receive_gradients_and_zero_mask_is_base(pool):
    bb, base, models, heads, xs = pool
    enc = InputEncoder(bb)
    m = MergedEncoder(bb.model, base, models, enc.modality)
    mask = ConcreteMask({n: m.base[n].shape for n in m.names})
    lam = torch.full((2, len(m.names)), 0.3, requires_grad=True)
    sample = mask.sample(torch.Generator().manual_seed(0))
    assert all(abs(float(v.detach().mean()) - 1.0) < 1e-4 for v in sample.values())  # rescaled to mean 1
    loss = entropy(m.logits(as_head(heads[0], m.modality), m.params(lam, sample), enc(xs[0][:4])))
    loss.backward()
    assert lam.grad is not None and lam.grad.abs().sum() > 0
    assert sum(float(p.grad.abs().sum()) for p in mask.parameters() if p.grad is not None) > 0
    zeros = {n: torch.zeros_like(m.base[n]) for n in m.names}
    p0 = m.params(torch.full((2, len(m.names)), 0.7), zeros)
    assert all(torch.equal(p0[n], base[n].float()) for n in m.names)


def test_merged_params_are_recomputed_in_backward_with_the_direct_gradients(pool):
    """The merged encoder keeps no task-vector copies or parameter values of its own, and its checkpointed
    construction gives the gradients of the direct formula base + mask * sum_i lambda_i * tau_i."""
    bb, base, models, heads, xs = pool
    enc = InputEncoder(bb)
    m = MergedEncoder(bb.model, base, models, enc.modality)
    assert all(p.device.type == "meta" for p in m.encoder.parameters())
    assert all(p.device.type != "meta" for p in bb.model.parameters())  # the caller's encoder is untouched
    mask = ConcreteMask({n: m.base[n].shape for n in m.names})
    noise = mask.noise(torch.Generator().manual_seed(0))
    x, head = enc(xs[0][:4]), as_head(heads[0], m.modality)
    grads = []
    for direct in (False, True):
        lam = torch.full((2, len(m.names)), 0.3, requires_grad=True)
        if direct:
            params = {n: m.base[n] + mask.relaxed(n, noise[n]) * sum(lam[i, j] * (models[i][n] - base[n])
                                                                      for i in range(2))
                      for j, n in enumerate(m.names)}
        else:
            params = m.params(lam, lambda n: mask.relaxed(n, noise[n]))
        entropy(m.logits(head, params, x)).backward()
        grads.append([lam.grad.clone()] + [torch.zeros(p.shape) if p.grad is None else p.grad.clone()
                                           for p in mask.parameters()])
        for p in mask.parameters():
            p.grad = None
    assert grads[0][0].abs().sum() > 0 and sum(float(g.abs().sum()) for g in grads[0][1:]) > 0
    assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-5) for a, b in zip(*grads))


def test_low_memory_changes_nothing_but_memory(pool):
    bb, base, models, heads, xs = pool
    enc = InputEncoder(bb)
    kw = dict(mask_steps=3, adamerging_steps=2, lr=0.1, adv_lr=0.1, perturb_every=1, progress=False, seed=1)
    a, ia = dam(bb.model, base, models, heads, xs, enc, low_memory=True, **kw)
    b, ib = dam(bb.model, base, models, heads, xs, enc, low_memory=False, **kw)
    assert all(torch.equal(a[k], b[k]) for k in a) and torch.equal(ia["perturbations"], ib["perturbations"])
    assert not all(torch.equal(a[k], base[k]) for k in a)


def test_dam_runs_moves_mask_and_perturbation(pool):
    bb, base, models, heads, xs = pool
    enc = InputEncoder(bb)
    for masks in ("single", "two"):
        sd, info = dam(bb.model, base, models, heads, xs, enc, mask_steps=3, adamerging_steps=2, masks=masks,
                       lr=0.1, adv_lr=0.1, progress=False)
        assert set(sd) == set(base) and all(sd[k].shape == base[k].shape for k in base)
        assert info["lambdas"].shape == (2, len([n for n, _ in bb.model.named_parameters()]))
        assert info["perturbations"].abs().sum() > 0
        assert len(info["mask_density"]) == (2 if masks == "two" else 1)
        assert not all(torch.equal(sd[k], base[k]) for k in base)


def test_dam_with_zero_lambda_adv_equals_concrete_adamerging(pool):
    bb, base, models, heads, xs = pool
    enc = InputEncoder(bb)
    kw = dict(mask_steps=3, adamerging_steps=2, lr=0.1, progress=False, seed=3)
    a, _ = dam(bb.model, base, models, heads, xs, enc, lambda_adv=0.0, adv_lr=0.1, **kw)
    b, _ = concrete_adamerging(bb.model, base, models, heads, xs, enc, **kw)
    # equal up to float rounding (DAM runs the clean rows in one batch with their perturbed copies)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4
    c, _ = dam(bb.model, base, models, heads, xs, enc, lambda_adv=1.0, adv_lr=0.1, **kw)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the adversarial term does change the mask


def test_concrete_ta_keeps_its_lambda_and_exact_inner_runs(tiny_vision):
    bb, base, models, heads, xs = _pool(tiny_vision, "vision")
    enc = InputEncoder(bb)
    _, info = concrete_task_arithmetic(bb.model, base, models, heads, xs, enc, steps=2, lr=0.1, progress=False)
    assert torch.all(info["lambdas"] == 0.3)
    _, info = concrete_adamerging(bb.model, base, models, heads, xs, enc, mask_steps=2, adamerging_steps=1,
                                  inner="exact", granularity="task", progress=False)
    assert info["lambdas"].shape == (2,)
    pool = Pool(bb.model, base, models, heads, xs, xs, enc, progress=False)
    with pytest.raises(SafeMergeError, match="dam': parameter 'masks'"):  # refused by the registry, before a run
        run_pool_method("dam", pool, masks="three")
    with pytest.raises(SafeMergeError, match="one head and one input set per model"):
        dam(bb.model, base, models, heads[:1], xs, enc, progress=False)


def test_fisher_and_regmean_of_identical_models_give_that_model(pool):
    bb, base, models, heads, xs = pool
    enc = InputEncoder(bb)
    same = [models[0], models[0]]
    f = fisher_merge(bb.model, base, same, heads, xs, enc, n_examples=4, progress=False)
    r = regmean(bb.model, base, same, xs, enc, n_examples=8, progress=False)
    for k, v in base.items():
        if v.is_floating_point():
            assert torch.allclose(f[k], models[0][k], atol=1e-5)
            assert torch.allclose(r[k], models[0][k], atol=1e-4)
    # different models: RegMean differs from the plain mean on linear weights, Fisher from both
    f2 = fisher_merge(bb.model, base, models, heads, xs, enc, n_examples=4, progress=False)
    r2 = regmean(bb.model, base, models, xs, enc, n_examples=8, progress=False)
    w = next(k for k in base if k.endswith("weight") and base[k].ndim == 2 and "embed" not in k)
    mean = (models[0][w] + models[1][w]) / 2
    assert not torch.allclose(r2[w], mean, atol=1e-6) and not torch.allclose(f2[w], mean, atol=1e-6)
    with pytest.raises(SafeMergeError, match="alpha"):
        regmean(bb.model, base, models, xs, enc, alpha=2.0, progress=False)


def test_pool_methods_registry_checks_names_and_params(tiny_vision):
    bb, base, models, heads, xs = _pool(tiny_vision, "vision")
    pool = Pool(bb.model, base, models, heads, xs, xs, InputEncoder(bb), progress=False)
    sd, _ = run_pool_method("task_arithmetic", pool, scaling=0.3)
    assert set(sd) == set(base)
    sd, info = run_pool_method("adamerging_task", pool, steps=1)
    assert info["lambdas"].shape == (2,)
    with pytest.raises(SafeMergeError, match="unknown merge method 'damm'"):
        run_pool_method("damm", pool)
    with pytest.raises(SafeMergeError, match="has no parameter 'lamda_adv'"):
        run_pool_method("dam", pool, lamda_adv=0.1)


def test_l1_projection_is_exact():
    d = torch.tensor([3.0, -1.0, 0.5, 0.0])
    p = project_l1(d, 2.0)
    assert torch.isclose(p.abs().sum(), torch.tensor(2.0)) and torch.allclose(p, torch.tensor([2.0, 0.0, 0.0, 0.0]))
    assert torch.equal(project(d, "l1", 10.0), d)
    assert torch.allclose(project(d, "linf", 1.0), torch.tensor([1.0, -1.0, 0.5, 0.0]))


def test_badmerging_attack_plants_a_corner_trigger(tiny_vision, tmp_path):
    from safemerge.bench.zoo import Profile, Zoo

    tiny = Profile("tiny", resolution=28, n_train=64, n_val=16, n_test=32, steps=2, batch_size=8, trigger_iters=2)
    zoo = Zoo(str(tiny_vision), tiny, root=tmp_path / "zoo")
    path = zoo.build("digits", "badmerging")
    zm = zoo.load("digits", "badmerging")
    assert zm.manifest["attack"] == "badmerging" and (path / "trigger.safetensors").exists()
    atk = make_attack("badmerging")
    from safemerge.bench.zoo import attack_of

    atk = attack_of(zm.manifest, path)
    x = torch.zeros(2, 3, 28, 28, dtype=torch.uint8)
    changed = (atk.apply(x) != x).any(0).any(0)
    assert changed[-7:, -7:].any() and not changed[:14, :14].any()  # only the bottom-right corner
    base = zoo.base_state()
    assert not all(torch.equal(zm.encoder_state[k], base[k]) for k in base)


def test_reference_perturbation_updates_every_step_and_logs_its_effect(pool):
    bb, base, models, heads, xs = pool
    enc = InputEncoder(bb)
    kw = {"mask_steps": 3, "adamerging_steps": 1, "lr": 0.1, "adv_lr": 0.1, "progress": False, "effect_examples": 8}
    _, ref = dam(bb.model, base, models, heads, xs, enc, perturbation="reference", **kw)
    _, amo = dam(bb.model, base, models, heads, xs, enc, perturb_every=2, **kw)
    assert ref["perturbation"] == "reference" and ref["perturbation_updates"] == 3  # every step
    assert amo["perturbation"] == "amortized" and amo["perturbation_updates"] == 2  # steps 0 and 2
    assert ref["perturbations"].abs().sum() > 0
    for info in (ref, amo):
        eff = info["perturbation_effect"]
        assert len(eff["per_task"]) == 2
        for row in eff["per_task"]:
            assert 0 <= row["flip_rate"] <= 100
            assert abs(row["entropy_change"] - (row["entropy_perturbed"] - row["entropy_clean"])) < 1e-3
        assert set(eff["mean"]) == set(eff["per_task"][0])
    if enc.modality == "vision":  # the reference clamps normalised pixels to [0, 1]: its effect is logged apart
        assert "flip_rate_clamp_only" in ref["perturbation_effect"]["mean"]
        assert "delta_mean_abs_255" in amo["perturbation_effect"]["mean"]
    pool_ = Pool(bb.model, base, models, heads, xs, xs, enc, progress=False)
    with pytest.raises(SafeMergeError, match="dam': parameter 'perturbation'"):  # the registry refuses it
        run_pool_method("dam", pool_, perturbation="strong")


def test_reference_dam_with_zero_lambda_adv_equals_concrete_adamerging(tiny_vision):
    """The reference's perturbation batches come from their own sampler: at lambda_adv = 0 the mask sees
    exactly Concrete AM's batches."""
    bb, base, models, heads, xs = _pool(tiny_vision, "vision")
    enc = InputEncoder(bb)
    kw = {"mask_steps": 3, "adamerging_steps": 2, "lr": 0.1, "progress": False, "seed": 3}
    a, _ = dam(bb.model, base, models, heads, xs, enc, lambda_adv=0.0, adv_lr=0.1, perturbation="reference", **kw)
    b, _ = concrete_adamerging(bb.model, base, models, heads, xs, enc, **kw)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4

