"""Bad input becomes a one-line error that names the file and the tensor; nothing half-written stays."""

import pytest
import torch
from safetensors.torch import save_file

from safemerge.io import (atomic_dir, atomic_write_json, check_same_base, check_same_keys, load_state_dict,
                          save_state_dict)
from safemerge.errors import SafeMergeError


def test_roundtrip(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_state_dict(sd, tmp_path / "m.safetensors")
    back = load_state_dict(tmp_path / "m.safetensors")
    assert torch.equal(back["a"], sd["a"]) and torch.equal(back["b"], sd["b"])
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left


def test_truncated_file(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(100, 100)}, str(p))
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(SafeMergeError, match=r"m\.safetensors: truncated or corrupt safetensors file") as e:
        load_state_dict(p)
    assert "\n" not in str(e.value)


def test_nan_and_inf_named(tmp_path):
    bad = torch.ones(4)
    bad[2] = float("nan")
    save_file({"ok": torch.ones(2), "layer.3.weight": bad}, str(tmp_path / "n.safetensors"))
    with pytest.raises(SafeMergeError, match=r"tensor 'layer\.3\.weight' contains NaN or inf"):
        load_state_dict(tmp_path / "n.safetensors")
    save_file({"x": torch.tensor([1.0, float("inf")])}, str(tmp_path / "i.safetensors"))
    with pytest.raises(SafeMergeError, match="'x' contains NaN or inf"):
        load_state_dict(tmp_path / "i.safetensors")


def test_missing_extra_and_shape():
    ref = {"a": torch.zeros(2, 2), "b": torch.zeros(3)}
    with pytest.raises(SafeMergeError, match="m.st: missing tensor 'b'"):
        check_same_keys(ref, {"a": torch.zeros(2, 2)}, "m.st")
    with pytest.raises(SafeMergeError, match="unexpected tensor 'c'"):
        check_same_keys(ref, {**ref, "c": torch.zeros(1)}, "m.st")
    with pytest.raises(SafeMergeError, match=r"tensor 'b' has shape \(4,\), the base model has \(3,\)"):
        check_same_keys(ref, {"a": torch.zeros(2, 2), "b": torch.zeros(4)}, "m.st")


def test_other_base_is_refused():
    torch.manual_seed(0)
    base = {"w": torch.randn(64, 64)}
    finetuned = {"w": base["w"] + 0.01 * torch.randn(64, 64)}
    check_same_base(base, finetuned, "ft")  # a fine-tune passes
    with pytest.raises(SafeMergeError, match="was not fine-tuned from it"):
        check_same_base(base, {"w": torch.randn(64, 64)}, "other")


def test_atomic_dir_removes_partial_output(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (target / "done.txt").read_text() == "ok"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_outputs_are_world_readable(tmp_path):
    """Not mkstemp's 0600 / mkdtemp's 0700: files 0644, folders 0755 (under the usual umask 022)."""
    import os

    old = os.umask(0o022)
    try:
        save_state_dict({"a": torch.zeros(2)}, tmp_path / "m.safetensors")
        atomic_write_json(tmp_path / "r.json", {"x": 1})
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f.txt").write_text("ok")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_sharded_folder_and_dtype_kinds(tmp_path):
    import json

    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"a": torch.ones(3)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.arange(4)}, str(folder / "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    sd = load_state_dict(folder)
    assert torch.equal(sd["a"], torch.ones(3)) and torch.equal(sd["b"], torch.arange(4))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SafeMergeError, match="shard listed in the index is missing"):
        load_state_dict(folder)
    with pytest.raises(SafeMergeError, match="tensor 'b' is float32, the base model has int64"):
        check_same_keys({"b": torch.arange(4)}, {"b": torch.zeros(4)}, "m.st")
