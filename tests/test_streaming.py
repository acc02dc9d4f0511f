"""Streaming merges: equal to the in-memory methods on tiny sharded checkpoints, exact global TIES threshold,
mergekit configs, and bad inputs as one-line errors that leave no output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.errors import SafeMergeError
from safemerge.merging.mergekit import load_mergekit_config
from safemerge.merging.methods import _topk_mask_global, merge, task_vectors
from safemerge.merging.streaming import LazyCheckpoint, magnitude_threshold, streaming_merge

runner = CliRunner()
SHAPES = {"embed.weight": (40, 8), "layers.0.attn.q.weight": (8, 8), "layers.0.attn.q.bias": (8,),
          "layers.0.mlp.fc1.weight": (16, 8), "layers.1.mlp.fc1.weight": (16, 8), "norm.weight": (8,),
          "step": ()}


def _state(seed: int, base: dict | None = None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in SHAPES.items():
        if k == "step":
            out[k] = torch.tensor(3, dtype=torch.int64)
            continue
        v = torch.randn(s, generator=g)
        out[k] = (base[k].float() + 0.1 * v if base is not None else v).to(dtype)
    return out


def _write(sd: dict, folder: Path, shards: int = 2) -> Path:
    """An HF-style sharded folder with an index (shards > 1) or a single model.safetensors."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    names = list(sd)
    if shards == 1:
        save_file(sd, folder / "model.safetensors")
        return folder
    parts = [names[i::shards] for i in range(shards)]
    wm = {}
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, folder / fname)
        wm.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return folder


@pytest.fixture
def ckpts(tmp_path):
    base = _state(0)
    models = [_state(i + 1, base) for i in range(3)]
    return base, models, _write(base, tmp_path / "base"), [_write(m, tmp_path / f"ft{i}") for i, m in enumerate(models)]


CASES = [("weight_average", {}), ("task_arithmetic", {"scaling": 0.4}), ("ties", {"density": 0.3}),
         ("ties", {"density": 0.3, "trim": "tensor"}), ("dare", {"density": 0.5, "seed": 3}),
         ("dare_ties", {"density": 0.5, "seed": 3})]


@pytest.mark.parametrize("block", [None, 24])
@pytest.mark.parametrize("method,params", CASES)
def test_streaming_equals_in_memory(ckpts, tmp_path, monkeypatch, method, params, block):
    """Also with tiny row blocks, so that large-tensor chunking (and DARE's per-block masks) is exercised."""
    if block:
        monkeypatch.setattr("safemerge.merging.methods.DARE_BLOCK", block)
    base, models, bp, mps = ckpts
    out = streaming_merge(method, bp, mps, tmp_path / "out", params, max_shard_size=600, progress=False)
    got = LazyCheckpoint(out)
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()
    ref = merge(method, base, models, **params)
    for k in ref:
        assert torch.allclose(got.read(k), ref[k], atol=1e-6), (method, k)


@pytest.mark.parametrize("direct", [0, 1 << 24])
def test_global_threshold_is_exact(ckpts, monkeypatch, direct):
    """Radix selection (direct = 0) and in-memory selection give kthvalue's threshold."""
    monkeypatch.setattr("safemerge.merging.streaming.DIRECT_SELECT", direct)
    base, models, bp, mps = ckpts
    tv = {k: v for k, v in task_vectors(base, [models[0]])[0].items()}
    for density in (0.01, 0.2, 0.5, 1.0):
        thr = magnitude_threshold(LazyCheckpoint(bp), LazyCheckpoint(mps[0]), density)
        flat = torch.cat([v.abs().flatten() for v in tv.values()])
        k = max(1, int(round(density * flat.numel())))
        assert thr == float(flat.kthvalue(flat.numel() - k + 1).values)
        mask = _topk_mask_global(tv, density)
        assert sum(int(m.sum()) for m in mask.values()) == sum(int((v.abs() >= thr).sum()) for v in tv.values())


def test_bf16_in_bf16_out_computed_in_fp32(tmp_path):
    base = _state(0, dtype=torch.bfloat16)
    models = [_state(i + 1, base, torch.bfloat16) for i in range(2)]
    bp = _write(base, tmp_path / "b", 1)
    mps = [_write(m, tmp_path / f"m{i}", 1) for i, m in enumerate(models)]
    out = LazyCheckpoint(streaming_merge("task_arithmetic", bp, mps, tmp_path / "o", {"scaling": 0.5}, progress=False))
    ref = merge("task_arithmetic", base, models, scaling=0.5)
    assert out.read("embed.weight").dtype == torch.bfloat16 and torch.equal(out.read("embed.weight"), ref["embed.weight"])
    f32 = LazyCheckpoint(streaming_merge("task_arithmetic", bp, mps, tmp_path / "o32", {"scaling": 0.5},
                                         out_dtype="float32", progress=False))
    assert f32.read("embed.weight").dtype == torch.float32


def _expect_error(fn, pattern: str, out: Path):
    with pytest.raises(SafeMergeError, match=pattern) as e:
        fn()
    assert "\n" not in str(e.value)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_bad_inputs(ckpts, tmp_path):
    base, models, bp, mps = ckpts
    out = tmp_path / "merged"
    # a truncated shard
    shard = sorted(mps[0].glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) - 20])
    _expect_error(lambda: streaming_merge("ties", bp, mps, out, progress=False), "truncated file", out)
    shard.write_bytes(raw)
    # a missing tensor
    m = dict(models[1])
    m.pop("norm.weight")
    _expect_error(lambda: streaming_merge("ties", bp, [mps[0], _write(m, tmp_path / "miss", 1)], out, progress=False),
                  "missing tensor 'norm.weight'", out)
    # a shape mismatch
    m = dict(models[1])
    m["layers.0.attn.q.weight"] = torch.zeros(8, 4)
    _expect_error(lambda: streaming_merge("ties", bp, [_write(m, tmp_path / "shape", 1)], out, progress=False),
                  "'layers.0.attn.q.weight' has shape", out)
    # NaN met while streaming: the half-written output is removed
    m = dict(models[1])
    m["layers.1.mlp.fc1.weight"] = m["layers.1.mlp.fc1.weight"].clone()
    m["layers.1.mlp.fc1.weight"][0, 0] = float("nan")
    _expect_error(lambda: streaming_merge("task_arithmetic", bp, [mps[0], _write(m, tmp_path / "nan", 1)], out,
                                          progress=False), "NaN or inf", out)


def test_mergekit_config_cli(ckpts, tmp_path):
    base, models, bp, mps = ckpts
    cfg = {"merge_method": "ties", "base_model": str(bp), "dtype": "float32", "parameters": {"normalize": True},
           "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.3}} for p in mps]}
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump(cfg))
    plan = load_mergekit_config(path)
    assert plan.method == "ties" and plan.params == {"density": 0.3, "trim": "tensor", "scaling": 1.0}
    res = runner.invoke(app, ["merge", "--mergekit", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    ref = merge("ties", base, models, density=0.3, trim="tensor")
    got = LazyCheckpoint(tmp_path / "o")
    assert all(torch.allclose(got.read(k), ref[k], atol=1e-6) for k in ref)
    # task arithmetic with per-model weights and lambda
    cfg.update(merge_method="task_arithmetic", parameters={"lambda": 0.5})
    cfg["models"] = [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(mps, (1.0, 0.5, 0.25))]
    path.write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["merge", "--mergekit", str(path), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    tvs = task_vectors(base, models)
    want = base["embed.weight"] + 0.5 * (tvs[0]["embed.weight"] + 0.5 * tvs[1]["embed.weight"]
                                         + 0.25 * tvs[2]["embed.weight"])
    assert torch.allclose(LazyCheckpoint(tmp_path / "o2").read("embed.weight"), want, atol=1e-5)
    # an unsupported key is one line
    cfg["slices"] = []
    path.write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["merge", "--mergekit", str(path), "--out", str(tmp_path / "o3")])
    assert res.exit_code == 2 and "slices: unsupported mergekit key" in res.output
    assert not (tmp_path / "o3").exists()


def test_checkpoint_of_another_base_is_refused(ckpts, tmp_path):
    base, models, bp, mps = ckpts
    other = _write(_state(99), tmp_path / "other", 1)
    out = tmp_path / "merged"
    _expect_error(lambda: streaming_merge("task_arithmetic", bp, [mps[0], other], out, progress=False),
                  "was not fine-tuned from it", out)
