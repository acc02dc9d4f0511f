"""Streaming merges: identical to the in-memory methods on tiny sharded checkpoints (every registered method,
per-model weights and densities), exact global TIES threshold, mergekit configs, and bad inputs as one-line
errors that leave no output folder."""

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
from safemerge.io import Checkpoint, load_state_dict
from safemerge.merging import registry
from safemerge.merging.engine import StateDictInputs
from safemerge.merging.methods import global_cuts, merge, task_vectors
from safemerge.merging.streaming import CheckpointInputs, streaming_merge

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


def _cases() -> list[tuple[str, dict]]:
    """Every registered data-free method, with per-model weights and densities where it has them."""
    out = []
    for e in registry.entries("merge"):
        fields = e.options.model_fields
        p: dict = {}
        if "weight" in fields:
            p["weight"] = [1.0, 0.5, 2.0]
        if "density" in fields:
            p["density"] = [0.3, 0.5, 0.4] if e.name != "della" else [0.5, 0.4, 0.6]
        if "seed" in fields:
            p["seed"] = 3
        if e.name == "slerp":
            p["t"] = 0.3
        out.append((e.name, p))
        if e.name == "ties":
            out.append(("ties", {**p, "trim": "tensor"}))
        if e.name == "model_stock":
            out.append(("model_stock", {"filter_wise": True}))
    return out


CASES = _cases()


@pytest.mark.parametrize("small", [False, True])
@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_streaming_equals_in_memory(ckpts, tmp_path, monkeypatch, method, params, small):
    """Identical tensors from disk and from memory; `small` cuts tensors into chunks of a few rows and maps
    one chunk at a time, so chunking, segments and the per-chunk random draws are exercised."""
    if small:  # (and per-tensor trims re-read their tensor instead of holding its inputs or task vectors)
        monkeypatch.setattr("safemerge.merging.engine.CHUNK", 24)
        monkeypatch.setattr("safemerge.merging.streaming.SEGMENT", 24)
        monkeypatch.setattr("safemerge.merging.engine.CACHE_ELEMENTS", 0)
        monkeypatch.setattr("safemerge.merging.engine.HOLD_BYTES", 0)  # every pass maps its segments anew
    base, models, bp, mps = ckpts
    if method == "slerp":
        models, mps = models[:1], mps[:1]
    out = streaming_merge(method, bp, mps, tmp_path / "out", params, max_shard_size=600, progress=False)
    got = Checkpoint(out)
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()
    ref = merge(method, base, models, **params)
    assert list(got.names()) and set(got.names()) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), (method, k)
    assert not torch.equal(ref["layers.0.attn.q.weight"], base["layers.0.attn.q.weight"])


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_bf16_inputs_read_as_stored_equal_float32(tmp_path, method):
    """The fused loops read bfloat16 inputs as their raw bits: the same tensors (in float32 before the final
    cast) as float32 inputs of the same values, from disk and from memory; a NaN in a bfloat16 input is refused."""
    base = _state(0, dtype=torch.bfloat16)
    models = [_state(i + 1, base, torch.bfloat16) for i in range(3)]
    params = {"density": [0.3, 0.5, 0.4], "weight": [1.0, 0.5, 2.0]} if method != "task_arithmetic" else {}
    if method == "ties":
        params["trim"] = "tensor"
    f32 = merge(method, {k: v.float() if v.is_floating_point() else v for k, v in base.items()},
                [{k: v.float() if v.is_floating_point() else v for k, v in m.items()} for m in models], **params)
    got = merge(method, base, models, **params)
    bp = _write(base, tmp_path / "b")
    mps = [_write(m, tmp_path / f"m{i}") for i, m in enumerate(models)]
    disk = Checkpoint(streaming_merge(method, bp, mps, tmp_path / "o", params, progress=False))
    for k in f32:
        want = f32[k].to(base[k].dtype)
        assert got[k].dtype == base[k].dtype and torch.equal(got[k], want), k
        assert torch.equal(disk[k], want), k
    models[2]["layers.0.attn.q.weight"][1, 2] = float("nan")
    with pytest.raises(SafeMergeError, match="model 2: tensor 'layers.0.attn.q.weight' holds NaN"):
        merge(method, base, models, **params)


@pytest.mark.parametrize("direct", [0, 1 << 24])
def test_global_threshold_is_exact(ckpts, monkeypatch, direct):
    """Sampled (direct = 0) and exact first passes give kthvalue's threshold, and keep exactly k entries."""
    monkeypatch.setattr("safemerge.merging.engine.EXACT_BELOW", direct)
    base, models, bp, mps = ckpts
    tv = task_vectors(base, [models[0]])[0]
    flat = torch.cat([tv[k].abs().flatten() for k in sorted(tv)])
    for density in (0.01, 0.2, 0.5, 1.0):
        on_disk = global_cuts(CheckpointInputs(Checkpoint(bp), [Checkpoint(mps[0])]), [density])
        in_memory = global_cuts(StateDictInputs(base, [models[0]]), [density])
        assert on_disk == in_memory
        k = flat.numel() if density >= 1 else max(1, int(density * flat.numel()))
        cut = next(iter(in_memory.values()))[0]
        if k < flat.numel():
            assert cut.value == float(flat.kthvalue(flat.numel() - k + 1).values)
        kept = merge("ties", base, [models[0]], density=density, scaling=1.0)
        n_kept = sum(int((kept[n] != base[n]).sum()) for n in tv)
        assert n_kept == k


def test_bf16_in_bf16_out_computed_in_fp32(tmp_path):
    base = _state(0, dtype=torch.bfloat16)
    models = [_state(i + 1, base, torch.bfloat16) for i in range(2)]
    bp = _write(base, tmp_path / "b", 1)
    mps = [_write(m, tmp_path / f"m{i}", 1) for i, m in enumerate(models)]
    out = Checkpoint(streaming_merge("task_arithmetic", bp, mps, tmp_path / "o", {"scaling": 0.5}, progress=False))
    ref = merge("task_arithmetic", base, models, scaling=0.5)
    assert out["embed.weight"].dtype == torch.bfloat16 and torch.equal(out["embed.weight"], ref["embed.weight"])
    f32 = Checkpoint(streaming_merge("task_arithmetic", bp, mps, tmp_path / "o32", {"scaling": 0.5},
                                     out_dtype="float32", progress=False))
    assert f32["embed.weight"].dtype == torch.float32
    assert f32["step"].dtype == torch.int64  # integer tensors keep their dtype


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
    _expect_error(lambda: streaming_merge("ties", bp, mps, out, progress=False), "truncated or corrupt", out)
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
    # an integer tensor where the base has a float one
    m = dict(models[1])
    m["norm.weight"] = torch.zeros(8, dtype=torch.int64)
    _expect_error(lambda: streaming_merge("ties", bp, [_write(m, tmp_path / "dtype", 1)], out, progress=False),
                  "'norm.weight' is int64", out)
    # options are refused before any file is opened
    _expect_error(lambda: streaming_merge("ties", tmp_path / "nowhere", mps, out, {"densty": 0.2}, progress=False),
                  "has no parameter 'densty'", out)
    _expect_error(lambda: streaming_merge("ties", bp, mps, out, weights=[1.0, 2.0], progress=False),
                  "'weight' has 2 values for 3 models", out)
    # NaN met while streaming: the half-written output is removed
    m = dict(models[1])
    m["layers.1.mlp.fc1.weight"] = m["layers.1.mlp.fc1.weight"].clone()
    m["layers.1.mlp.fc1.weight"][0, 0] = float("nan")
    _expect_error(lambda: streaming_merge("task_arithmetic", bp, [mps[0], _write(m, tmp_path / "nan", 1)], out,
                                          progress=False), "nan.*'layers.1.mlp.fc1.weight' holds NaN or inf", out)


def test_mergekit_config_cli(ckpts, tmp_path):
    base, models, bp, mps = ckpts
    cfg = {"merge_method": "ties", "base_model": str(bp), "dtype": "float32", "parameters": {"normalize": True},
           "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.3}} for p in mps]}
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump(cfg))
    plan = load_mergekit_config(path)
    assert plan.method == "ties" and plan.params == {"normalize": True, "scaling": 1.0, "density": 0.3,
                                                     "trim": "tensor", "weight": 1.0}
    res = runner.invoke(app, ["merge", "--mergekit", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    ref = merge("ties", base, models, density=0.3, trim="tensor")
    got = Checkpoint(tmp_path / "o")
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    # task arithmetic with per-model weights and lambda
    cfg.update(merge_method="task_arithmetic", parameters={"lambda": 0.5})
    cfg["models"] = [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(mps, (1.0, 0.5, 0.25))]
    path.write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["merge", "--mergekit", str(path), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    tvs = task_vectors(base, models)
    want = base["embed.weight"] + 0.5 * (tvs[0]["embed.weight"] + 0.5 * tvs[1]["embed.weight"]
                                         + 0.25 * tvs[2]["embed.weight"])
    assert torch.allclose(Checkpoint(tmp_path / "o2")["embed.weight"], want, atol=1e-5)
    # per-model densities, mergekit's defaults (dare_linear: no normalisation, rescale)
    cfg.update(merge_method="dare_linear", parameters={})
    cfg["models"] = [{"model": str(p), "parameters": {"weight": 1.0, "density": d}} for p, d in zip(mps, (.3, .5, .7))]
    path.write_text(yaml.safe_dump(cfg))
    plan = load_mergekit_config(path)
    assert plan.method == "dare" and plan.params["density"] == [0.3, 0.5, 0.7]
    assert plan.params["normalize"] is False and plan.params["scaling"] == 1.0
    # slerp: the base and one other model
    cfg.update(merge_method="slerp", parameters={"t": 0.3})
    cfg["models"] = [{"model": str(bp)}, {"model": str(mps[0])}]
    path.write_text(yaml.safe_dump(cfg))
    plan = load_mergekit_config(path)
    assert plan.method == "slerp" and plan.models == [str(mps[0])] and plan.params == {"t": 0.3}
    # an unsupported key, a bad option and a bad count are one line, before any file is opened
    for change, pattern in [({"slices": []}, "slices: unsupported mergekit key"),
                            ({"merge_method": "ties", "parameters": {"normalize": "maybe"}}, "parameter 'normalize'"),
                            ({"merge_method": "model_stock", "parameters": {},
                              "models": [{"model": str(mps[0])}]}, "at least 2 model")]:
        bad = {**cfg, **change}
        path.write_text(yaml.safe_dump(bad))
        res = runner.invoke(app, ["merge", "--mergekit", str(path), "--out", str(tmp_path / "o3")])
        assert res.exit_code == 2 and pattern in res.output.replace("\n", " "), res.output
        assert not (tmp_path / "o3").exists()


def test_output_permissions_and_error_below_the_bar(ckpts, tmp_path, capsys):
    base, models, bp, mps = ckpts
    out = streaming_merge("task_arithmetic", bp, mps, tmp_path / "perm", progress=False)
    assert out.stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in out.iterdir())
    m = dict(models[1])
    m["norm.weight"] = torch.full((8,), float("inf"))
    with pytest.raises(SafeMergeError):
        streaming_merge("task_arithmetic", bp, [mps[0], _write(m, tmp_path / "inf", 1)], tmp_path / "o", progress=True)
    err = capsys.readouterr().err
    assert err.endswith("\n")  # the bar was closed before the error propagates: the message gets its own line


def test_sharded_folder_loads_everywhere(ckpts):
    base, models, bp, mps = ckpts
    sd = load_state_dict(mps[0])
    assert set(sd) == set(models[0]) and all(torch.equal(sd[k], models[0][k]) for k in sd)


def test_checkpoint_of_another_base_is_refused(ckpts, tmp_path):
    base, models, bp, mps = ckpts
    other = _write(_state(99), tmp_path / "other", 1)
    out = tmp_path / "merged"
    _expect_error(lambda: streaming_merge("task_arithmetic", bp, [mps[0], other], out, progress=False),
                  "was not fine-tuned from it", out)
