"""End to end on tiny random encoders and real data: zoo build, merge CLI, eval CLI, bench results contract."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import tiny_dinov2
from safemerge.backbones import canonical_keys
from safemerge.bench.suites import PoolEvaluator, Setting, Suite, run_suite
from safemerge.io import load_state_dict, save_state_dict
from safemerge.cli import app
from safemerge.errors import SafeMergeError
from safemerge.bench.zoo import Profile, Zoo

TINY = Profile("tiny", resolution=28, n_train=256, n_val=32, n_test=96, steps=12, batch_size=32, lr=5e-4,
               head_lr=5e-3, trigger_iters=5, embedding_steps=8)
SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "results.schema.json"
runner = CliRunner()


@pytest.fixture
def vision_zoo(tiny_vision, tmp_path):
    return Zoo(str(tiny_vision), TINY, root=tmp_path / "zoo")


def test_zoo_builds_clean_and_backdoored_models(vision_zoo):
    p = vision_zoo.build("digits", None)
    m = json.loads((p / "safemerge.json").read_text())
    assert m["task"] == "digits" and m["attack"] is None and 0 <= m["acc"] <= 100
    from safemerge.backbones import fingerprint

    assert m["base_fingerprint"] == fingerprint(vision_zoo.base_state())
    mtime = (p / "model.safetensors").stat().st_mtime
    assert vision_zoo.build("digits", None) == p and (p / "model.safetensors").stat().st_mtime == mtime  # cached
    tp = vision_zoo.build("digits", "trojvit")
    assert (tp / "trigger.safetensors").exists()
    tm = json.loads((tp / "safemerge.json").read_text())
    assert tm["attack"] == "trojvit" and tm["attack_params"]["patch_size"] == 7
    from transformers import AutoModel

    enc = AutoModel.from_pretrained(tp)  # a zoo model folder is a plain HF folder
    assert enc.config.hidden_size == 32


def test_embedding_poison_changes_only_the_trigger_row(tiny_text, tmp_path):
    zoo = Zoo(str(tiny_text), TINY, root=tmp_path / "zoo")
    clean = load_state_dict(zoo.build("quote_topic", None))
    bd = load_state_dict(zoo.build("quote_topic", "embedding_poison"))
    changed = [k for k in clean if not torch.equal(clean[k], bd[k])]
    assert changed == ["embeddings.word_embeddings.weight"]
    rows = (clean[changed[0]] != bd[changed[0]]).any(1).nonzero().flatten().tolist()
    assert rows == [zoo.backbone.tokenizer.convert_tokens_to_ids("mn")]


def _config(tmp_path, base, models, **extra):
    cfg = {"base_model": str(base), "models": [{"path": str(m)} for m in models], "method": "task_arithmetic",
           "parameters": {"scaling": 0.5}, "output": str(tmp_path / "merged"), **extra}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_merge_and_eval_cli(vision_zoo, tiny_vision, tmp_path):
    a, b = vision_zoo.build("digits", "trojvit"), vision_zoo.build("mnist", None)
    res = runner.invoke(app, ["merge", str(_config(tmp_path, tiny_vision, [a, b]))])
    assert res.exit_code == 0, res.output
    out = tmp_path / "merged"
    from transformers import AutoModelForImageClassification

    base = load_state_dict(tiny_vision)
    sa, sb = load_state_dict(a), load_state_dict(b)
    for task, own in (("digits", a), ("mnist", b)):  # one transformers folder per task: merged encoder, own head
        model = AutoModelForImageClassification.from_pretrained(out / task)
        merged = model.dinov2.state_dict()
        base = canonical_keys(base, merged)
        for k in base:
            if base[k].is_floating_point():
                assert torch.allclose(merged[k], base[k] + 0.5 * ((sa[k] - base[k]) + (sb[k] - base[k])), atol=1e-6), k
        head = load_state_dict(own / "heads.safetensors")
        w = model.classifier.weight.detach()
        assert torch.equal(w[:, :head[f"{task}.weight"].shape[1]], head[f"{task}.weight"])
        assert not w[:, head[f"{task}.weight"].shape[1]:].any()  # DINOv2's mean-patch half stays unused
    res = runner.invoke(app, ["eval", str(out / "digits"), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["task"] for r in rows] == ["digits"] and all(0 <= r["acc"] <= 100 for r in rows)
    assert all(0 <= r["asr_untriggered"] <= 100 for r in rows)  # what the model sends to the target anyway
    # the merged digits folder keeps its source's backdoor record: ASR is measured with the planted trigger
    kept = json.loads((out / "digits" / "safemerge.json").read_text())
    assert kept["source_attack"] == "trojvit" and kept["attack"] is None
    assert torch.equal(load_state_dict(out / "digits" / "trigger.safetensors")["trigger"],
                       load_state_dict(a / "trigger.safetensors")["trigger"])
    assert rows[0]["trigger"].startswith("trojvit"), rows
    clean = json.loads(runner.invoke(app, ["eval", str(out / "mnist"), "--json"]).stdout)
    assert not (out / "mnist" / "trigger.safetensors").exists() and not clean[0]["trigger"].startswith("trojvit")


def _assert_one_line_error(res, pattern):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert pattern in res.output, res.output


def test_bad_inputs_are_one_line_errors_and_leave_nothing(vision_zoo, tiny_vision, tmp_path):
    a = vision_zoo.build("digits", None)
    # unknown config key, wrong type
    _assert_one_line_error(runner.invoke(app, ["merge", str(_config(tmp_path, tiny_vision, [a], lamda=1))]),
                           "lamda: unknown key")
    cfg = _config(tmp_path, tiny_vision, [a])
    data = yaml.safe_load(cfg.read_text())
    data["models"] = "not-a-list"
    cfg.write_text(yaml.safe_dump(data))
    _assert_one_line_error(runner.invoke(app, ["merge", str(cfg)]), "models")
    # unknown method
    _assert_one_line_error(runner.invoke(app, ["merge", str(_config(tmp_path, tiny_vision, [a], method="avg"))]),
                           "unknown merge method 'avg'")
    # a model of another base model (same architecture, other weights)
    other = tiny_dinov2(tmp_path / "other", seed=7)
    _assert_one_line_error(runner.invoke(app, ["merge", str(_config(tmp_path, tiny_vision, [a, other]))]),
                           "was not fine-tuned from it")
    # a model folder whose manifest names another base
    m = json.loads((a / "safemerge.json").read_text())
    fake = tmp_path / "fake"
    fake.mkdir()
    for f in ("model.safetensors", "heads.safetensors", "config.json"):
        (fake / f).write_bytes((a / f).read_bytes())
    (fake / "safemerge.json").write_text(json.dumps({**m, "base_fingerprint": "0123456789abcdef"}))
    _assert_one_line_error(runner.invoke(app, ["merge", str(_config(tmp_path, tiny_vision, [fake]))]),
                           "fine-tuned from another base model")
    # NaN weights, named
    sd = load_state_dict(a)
    key = sorted(sd)[5]
    sd[key][0] = float("nan")
    save_state_dict(sd, fake / "model.safetensors")
    (fake / "safemerge.json").write_text(json.dumps(m))
    _assert_one_line_error(runner.invoke(app, ["merge", str(_config(tmp_path, tiny_vision, [fake]))]),
                           f"tensor '{key}' contains NaN or inf")
    # missing tensor, different architecture
    del sd[key]
    save_state_dict(sd, fake / "model.safetensors")
    _assert_one_line_error(runner.invoke(app, ["merge", str(_config(tmp_path, tiny_vision, [fake]))]),
                           f"missing tensor '{key}'")
    bigger = tmp_path / "bigger"
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=7, image_size=28)).save_pretrained(bigger)
    _assert_one_line_error(runner.invoke(app, ["merge", str(_config(tmp_path, tiny_vision, [bigger]))]),
                           "has shape")
    # a truncated file
    (fake / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes()[:1000])
    _assert_one_line_error(runner.invoke(app, ["merge", str(_config(tmp_path, tiny_vision, [fake]))]),
                           "not a readable safetensors file")
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_bench_writes_the_results_contract(tiny_vision, tmp_path):
    suite = Suite("tiny-vision", str(tiny_vision), "quick", ["digits", "mnist"],
                  [Setting("1bd+1clean", {"digits": "badnets"}, defenses=True, curves=True)],
                  methods=[("task_arithmetic", "task_arithmetic", {"scaling": 0.3}),
                           ("ties", "ties", {"density": 0.2, "scaling": 0.3}),
                           ("dam", "dam", {"mask_steps": 2, "adamerging_steps": 2})], lambda_adv=[0.1],
                  defenses=["awm"])
    import safemerge.bench.suites as bench

    orig = bench.Zoo
    bench.Zoo = lambda backbone, profile, root=None, seed=0: orig(backbone, TINY, root=tmp_path / "zoo", seed=seed)
    try:
        res = run_suite(suite, results_dir=tmp_path / "results")
    finally:
        bench.Zoo = orig
    data = json.loads((tmp_path / "results" / "tiny-vision.json").read_text())
    assert data == json.loads(json.dumps(res))
    if SCHEMA.exists():
        import jsonschema

        jsonschema.validate(data, json.loads(SCHEMA.read_text()))
    methods = {r["method"] for r in data["settings"][0]["rows"]}
    assert methods == {"individual_all_clean", "individual_pool", "task_arithmetic", "ties", "dam", "awm",
                       "dam_two_masks", "dam_m2_only"}
    st = data["settings"][0]
    assert st["lambda_adv_curve"][0]["method"] == "dam" and st["defended_method"] in {"task_arithmetic", "ties"}
    assert set(st["mask_ablation"]) == {"m2_only", "both_two_masks", "single_mask_default"}
    assert (tmp_path / "results" / "tiny-vision-1bd+1clean-lambda_adv.png").exists()
    assert {(m["task"], m["attack"]) for m in data["models"]} == {("digits", None), ("mnist", None), ("digits", "badnets")}
    md = (tmp_path / "results" / "tiny-vision.md").read_text()
    assert "ACC(1) | ACC(all) | ASR(1) | ASR(all)" in md
    assert (tmp_path / "results" / "tiny-vision.png").stat().st_size > 1000


def test_evaluator_scores_validation_or_test(vision_zoo):
    data = vision_zoo.data("digits")
    assert torch.equal(PoolEvaluator(vision_zoo, split="val").eval_split("digits").y, data.val.y)  # tuning never sees test
    assert torch.equal(PoolEvaluator(vision_zoo, limit=10).eval_split("digits").y, data.test.y[:10])
    with pytest.raises(SafeMergeError, match="unknown evaluation split 'train'"):
        PoolEvaluator(vision_zoo, split="train")


def test_zoo_is_deterministic_under_its_seed(tiny_vision, tmp_path):
    a = Zoo(str(tiny_vision), TINY, root=tmp_path / "z1").build("mnist", "badnets")
    b = Zoo(str(tiny_vision), TINY, root=tmp_path / "z2").build("mnist", "badnets")
    sa, sb = load_state_dict(a), load_state_dict(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((a / "safemerge.json").read_text())["acc"] == json.loads((b / "safemerge.json").read_text())["acc"]


def test_protect_cli_keeps_outputs_and_refuses_other_bases(vision_zoo, tiny_vision, tmp_path):
    from safemerge.model import TaskModel, logits

    a = vision_zoo.build("digits", None)
    out = tmp_path / "protected"
    res = runner.invoke(app, ["protect", str(a), "--out", str(out), "--base", str(tiny_vision)])
    assert res.exit_code == 0, res.output
    from safemerge.folders import load_task_folder

    orig, prot = vision_zoo.load("digits"), load_task_folder(out)
    assert prot.kind == "hf"  # a transformers folder: DINOv2's own classifier computes the zoo head
    assert json.loads((out / "safemerge.json").read_text())["protected"]["permute"] is True
    x = vision_zoo.data("digits").test.x
    la = logits(vision_zoo.model(orig), vision_zoo.encoder(), x)
    lb = logits(vision_zoo.model(prot), vision_zoo.encoder(), x)
    assert (la - lb).abs().max() < 1e-4
    assert not torch.equal(orig.encoder_state["encoder.layer.0.mlp.fc1.weight"],
                           prot.encoder_state["encoder.layer.0.mlp.fc1.weight"])
    other = tiny_dinov2(tmp_path / "other", seed=7)
    _assert_one_line_error(runner.invoke(app, ["protect", str(other), "--out", str(tmp_path / "p2"),
                                               "--base", str(tiny_vision)]), "was not fine-tuned from it")
    assert not (tmp_path / "p2").exists()


@pytest.mark.parametrize("modality", ["vision", "text"])
def test_export_gives_plain_hf_folders_that_score_as_the_zoo(modality, tiny_vision, tmp_path):
    """A zoo model exported as a transformers folder + its test split in user formats scores exactly what the
    zoo path scores (same examples, same head readout)."""
    from conftest import tiny_bert

    if modality == "vision":
        zoo, task = Zoo(str(tiny_vision), TINY, root=tmp_path / "zoo"), "digits"
    else:
        base = tiny_bert(tmp_path / "bert", pooler=True)
        zoo, task = Zoo(str(base), TINY, root=tmp_path / "zoo"), "quote_topic"
    src = zoo.build(task, None)
    res = runner.invoke(app, ["export", str(src), "--out", str(tmp_path / "hf"), "--data-out",
                              str(tmp_path / ("data" if modality == "vision" else "data.jsonl"))])
    assert res.exit_code == 0, res.output
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    auto = AutoModelForImageClassification if modality == "vision" else AutoModelForSequenceClassification
    assert auto.from_pretrained(tmp_path / "hf").config.num_labels == zoo.data(task).num_classes
    data = tmp_path / "data.jsonl"
    got = runner.invoke(app, ["eval", str(tmp_path / "hf"), "--data", str(data), "--json"])
    ref = runner.invoke(app, ["eval", str(src), "--json"])
    assert got.exit_code == 0 and ref.exit_code == 0, got.output + ref.output
    assert json.loads(got.stdout)[0]["acc"] == json.loads(ref.stdout)[0]["acc"]
    if modality == "vision":  # the image folder (read class by class) holds the same examples
        folder = runner.invoke(app, ["eval", str(tmp_path / "hf"), "--data", str(tmp_path / "data"), "--json"])
        assert json.loads(folder.stdout)[0]["acc"] == json.loads(ref.stdout)[0]["acc"]
