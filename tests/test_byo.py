"""Your own checkpoints: plain Hugging Face classification folders (BERT, ViT; each with its own head and label
count; one sharded) and your own data files, through the CLI and the API."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import WORDS, tiny_tokenizer
from safemerge.cli import app

runner = CliRunner()


def _perturb(model: torch.nn.Module, eps: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(eps * p.std().nan_to_num(0.02).clamp_min(1e-3) * torch.randn(p.shape, generator=g))


def bert_family(root: Path) -> tuple[Path, list[Path]]:
    """A BERT base (with pooler) + two BertForSequenceClassification fine-tunes (3 and 4 labels, the second
    saved in shards)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    fast = tiny_tokenizer()
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    base = BertModel(cfg)
    base.save_pretrained(root / "base")
    fast.save_pretrained(root / "base")
    out = []
    for i, (n, labels) in enumerate(((3, ["neg", "neu", "pos"]), (4, None))):
        c = copy.deepcopy(cfg)
        c.num_labels = n
        if labels:
            c.id2label, c.label2id = dict(enumerate(labels)), {x: j for j, x in enumerate(labels)}
        m = BertForSequenceClassification(c)
        m.bert.load_state_dict(base.state_dict())
        _perturb(m.bert, 0.05, seed=i + 1)
        path = root / ("sentiment" if i == 0 else "topic")
        m.save_pretrained(path, max_shard_size="20KB" if i == 1 else "5GB")
        fast.save_pretrained(path)
        out.append(path)
    assert (out[1] / "model.safetensors.index.json").exists()  # the second one is sharded
    return root / "base", out


def vit_family(root: Path) -> tuple[Path, list[Path]]:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28,
                    patch_size=7)
    proc = ViTImageProcessor(size={"height": 28, "width": 28})
    base = ViTModel(cfg)
    base.save_pretrained(root / "vbase")
    proc.save_pretrained(root / "vbase")
    out = []
    for i, n in enumerate((2, 5)):
        c = copy.deepcopy(cfg)
        c.num_labels = n
        m = ViTForImageClassification(c)
        m.vit.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("pooler.")})
        _perturb(m.vit, 0.05, seed=i + 1)
        path = root / ("shapes" if i == 0 else "colors")
        m.save_pretrained(path)
        proc.save_pretrained(path)
        out.append(path)
    return root / "vbase", out


def text_rows(n: int, n_labels: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    vocab = WORDS[7:]
    rows = []
    for i in range(n):
        idx = torch.randint(len(vocab), (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        rows.append({"text": " ".join(vocab[j] for j in idx), "label": int(torch.randint(n_labels, (1,), generator=g))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def image_folder(path: Path, n_classes: int, per_class: int = 3, seed: int = 0) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for c in range(n_classes):
        (path / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = (torch.rand(20 + c, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(path / f"class{c}" / f"{i}.png")
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo-text")
    base, models = bert_family(root)
    data = [write_jsonl(root / f"{m.name}.jsonl", text_rows(24, n, seed=i)) for i, (m, n) in enumerate(zip(models, (3, 4)))]
    return base, models, data, root


def _merge_config(root: Path, base: Path, models: list[Path], data: list[Path], method: str, params: dict,
                  out: str) -> Path:
    cfg = {"base_model": str(base), "models": [{"path": str(m), "data": str(d)} for m, d in zip(models, data)],
           "method": method, "parameters": params, "output": str(root / out)}
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


TEXT_METHODS = [("task_arithmetic", {"scaling": 0.5}), ("ties", {"density": 0.5, "scaling": 1.0}),
                ("fisher", {"n_examples": 4}), ("regmean", {"n_examples": 8}),
                ("adamerging_layer", {"steps": 2, "batch_size": 4}),
                ("concrete_am_layer", {"mask_steps": 2, "adamerging_steps": 2, "batch_size": 4}),
                ("dam", {"mask_steps": 2, "adamerging_steps": 2, "batch_size": 4})]


@pytest.mark.parametrize("method,params", TEXT_METHODS, ids=[m for m, _ in TEXT_METHODS])
def test_every_method_family_on_hf_text_folders(bert, method, params):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from safemerge.api import load_checked, read_data, run_method
    from safemerge.config import ModelRef
    from safemerge.folders import load_task_folder
    from safemerge.model import TaskModel

    base, models, data, root = bert
    res = runner.invoke(app, ["merge", str(_merge_config(root, base, models, data, method, params, f"out-{method}"))])
    assert res.exit_code == 0, res.output
    out = root / f"out-{method}"
    assert (out / "README.md").exists() and method in (out / "README.md").read_text()
    # the same merge in process (same seed): the reference the written folders must reproduce
    loaded = load_checked([ModelRef(path=str(m)) for m in models], str(base))
    state, _ = run_method(method, loaded, [read_data(str(d), loaded, f) for d, f in zip(data, loaded.folders)], params)
    texts = [r["text"] for r in text_rows(6, 3, seed=9)]
    for m in models:
        tm = AutoModelForSequenceClassification.from_pretrained(out / m.name).eval()
        tok = AutoTokenizer.from_pretrained(out / m.name)
        inputs = tok(texts, padding=True, return_tensors="pt")
        own = load_task_folder(m)
        enc = copy.deepcopy(loaded.base.model)
        enc.load_state_dict(state)
        with torch.no_grad():
            got = tm(**inputs).logits
            ref = TaskModel(enc, own.head)(dict(inputs))
        assert got.shape[1] == own.head.num_labels  # each task keeps its own head and label count
        assert (got - ref).abs().max() < 1e-5
        orig = AutoModelForSequenceClassification.from_pretrained(m)
        assert torch.equal(tm.classifier.weight, orig.classifier.weight)
        assert (out / m.name / "config.json").stat().st_mode & 0o777 == 0o644
    if method == "task_arithmetic":  # exactly base + lambda * sum of task vectors, pooler included
        sa, sb = (load_task_folder(m).encoder_state for m in models)
        for k, v in loaded.base_state.items():
            if v.is_floating_point():
                assert torch.allclose(state[k], v + 0.5 * ((sa[k] - v) + (sb[k] - v)), atol=1e-6), k
        assert any(k.startswith("pooler.") for k in state)


def test_vit_folders_merge_and_eval_on_image_folders(tmp_path):
    from transformers import AutoModelForImageClassification

    base, models = vit_family(tmp_path)
    data = [image_folder(tmp_path / f"data-{m.name}", n) for m, n in zip(models, (2, 5))]
    for method, params in (("task_arithmetic", {"scaling": 0.3}), ("regmean", {}),
                           ("adamerging_task", {"steps": 2, "batch_size": 4})):
        res = runner.invoke(app, ["merge", str(_merge_config(tmp_path, base, models, data, method, params, method))])
        assert res.exit_code == 0, res.output
        assert "ACC" in res.output  # labeled data: the merged model is evaluated
        for m, n in zip(models, (2, 5)):
            tm = AutoModelForImageClassification.from_pretrained(tmp_path / method / m.name)
            assert tm.config.num_labels == n
    res = runner.invoke(app, ["eval", str(tmp_path / "task_arithmetic" / "colors"), "--data", str(data[1]),
                              "--trigger", "patch:white,size=0.3", "--json"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)
    assert row["examples"] == 15 and 0 <= row["acc"] <= 100 and "asr" in row
    # scan your image folder at the side your model was trained at; a side too large for the patch search is
    # refused before any work, naming the option
    res = runner.invoke(app, ["scan", str(models[0]), "--base", str(base), "--data", str(data[0]),
                              "--resolution", "21"])
    assert res.exit_code == 2 and "take 28-px images only" in res.output, res.output  # a ViT's side is fixed
    res = runner.invoke(app, ["scan", str(models[0]), "--base", str(base), "--data", str(data[0]),
                              "--resolution", "28", "--json"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)
    assert -1 <= row["score"] <= 1 and row["confirm_inputs"] == 0  # 2 held-out images: too few to confirm on
    res = runner.invoke(app, ["scan", str(models[0]), "--base", str(base), "--data", str(data[0]),
                              "--resolution", "700"])
    assert res.exit_code == 2 and "take 28-px images only" in res.output, res.output


def test_eval_reads_every_format_and_matches_transformers(bert, tmp_path):
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base, models, data, root = bert
    rows = text_rows(20, 3, seed=3)
    m = AutoModelForSequenceClassification.from_pretrained(models[0]).eval()
    tok = AutoTokenizer.from_pretrained(models[0])
    with torch.no_grad():
        pred = m(**tok([r["text"] for r in rows], padding=True, return_tensors="pt")).logits.argmax(-1)
    acc = 100.0 * float((pred == torch.tensor([r["label"] for r in rows])).float().mean())
    csv = tmp_path / "d.csv"
    csv.write_text("sentence,label\n" + "".join(f"{r['text']},{m.config.id2label[r['label']]}\n" for r in rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for path, extra in ((write_jsonl(tmp_path / "d.jsonl", rows), []), (csv, ["--text-column", "sentence"]),
                        (tmp_path / "saved", [])):
        res = runner.invoke(app, ["eval", str(models[0]), "--data", str(path), "--json", *extra])
        assert res.exit_code == 0, res.output
        (row,) = json.loads(res.stdout)
        assert abs(row["acc"] - round(acc, 2)) < 1e-6, path  # scores what transformers scores
    res = runner.invoke(app, ["eval", str(models[0]), "--data", str(tmp_path / "d.jsonl"), "--trigger", "word:cf",
                              "--target", "1", "--json"])
    assert res.exit_code == 0 and "asr" in json.loads(res.stdout)[0], res.output
    labels = torch.tensor([r["label"] for r in rows])
    untriggered = 100.0 * float((pred[labels != 1] == 1).float().mean())  # transformers' own, without the trigger
    assert abs(json.loads(res.stdout)[0]["asr_untriggered"] - round(untriggered, 2)) < 1e-6


def _one_line_error(res, pattern: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert pattern in res.output, res.output


def test_bad_user_data_and_folders_are_one_line_errors(bert, tmp_path):
    from PIL import Image  # noqa: F401

    base, models, data, root = bert
    model = str(models[0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "good movie", "label": 1}\n')
    _one_line_error(runner.invoke(app, ["eval", model, "--data", str(bad)]), "no column 'text'")
    bad.write_text('{"text": "good movie", "label": 1}\n{"text": "bad", "label": 7}\n')
    _one_line_error(runner.invoke(app, ["eval", model, "--data", str(bad)]), "row 2")
    bad.write_text("")
    _one_line_error(runner.invoke(app, ["eval", model, "--data", str(bad)]), "empty")
    bad.write_text('{"text": 5, "label": 1}\n')
    _one_line_error(runner.invoke(app, ["eval", model, "--data", str(bad)]), "not text")
    bad.write_text('{"text": "good", "label": "positive"}\n')  # a label name the model does not have
    _one_line_error(runner.invoke(app, ["eval", model, "--data", str(bad)]), "positive")
    bad.write_text('{"text": "good"}\n')
    _one_line_error(runner.invoke(app, ["eval", model, "--data", str(bad)]), "label")
    # a folder with no head: eval fails, never an empty table
    _one_line_error(runner.invoke(app, ["eval", str(base), "--data", str(data[0])]), "no head")
    # an unreadable image in an image folder
    imgs = image_folder(tmp_path / "imgs", 2)
    (imgs / "class0" / "broken.png").write_bytes(b"not a png")
    from safemerge.data import load_data
    from safemerge.errors import SafeMergeError

    with pytest.raises(SafeMergeError, match="broken.png"):
        load_data(imgs)
    # a model whose head has fewer labels than the data
    five = write_jsonl(tmp_path / "five.jsonl", [{"text": "good", "label": 4}])
    _one_line_error(runner.invoke(app, ["eval", model, "--data", str(five)]), "out of range")


def test_data_driven_method_without_data_or_head_is_refused(bert):
    base, models, data, root = bert
    cfg = {"base_model": str(base), "models": [{"path": str(m)} for m in models], "method": "regmean",
           "output": str(root / "nope")}
    p = root / "nodata.yaml"
    p.write_text(yaml.safe_dump(cfg))
    _one_line_error(runner.invoke(app, ["merge", str(p)]), "needs examples")
    assert not (root / "nope").exists()


CORE = ["io", "backbones", "model", "folders", "data", "evaluate", "training", "perturb", "config", "errors",
        "paths", "dinov2_onnx", "merging", "safety"]


def test_core_imports_nothing_from_the_benchmark_layer():
    src = Path(__file__).resolve().parents[1] / "src" / "safemerge"
    files = [p for name in CORE for p in ([src / f"{name}.py"] if (src / f"{name}.py").exists()
                                          else sorted((src / name).glob("*.py")))]
    assert len(files) > 15
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            mods = []
            if isinstance(node, ast.ImportFrom):
                mods = [("." * node.level) + (node.module or "")] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            for mod in mods:
                parts = mod.replace(".", " ").split()
                assert "bench" not in parts and "zoo" not in parts and "api" not in parts and "cli" not in parts, \
                    f"{f.relative_to(src)} imports {mod}"


def test_protect_scan_purify_on_plain_hf_folders(bert, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, ViTConfig, ViTModel

    base, models, data, root = bert
    # protect: a BERT classifier folder (the `bert.` prefix) keeps its outputs alone
    res = runner.invoke(app, ["protect", str(models[0]), "--base", str(base), "--out", str(tmp_path / "prot")])
    assert res.exit_code == 0, res.output
    a = AutoModelForSequenceClassification.from_pretrained(models[0]).eval()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "prot").eval()
    tok = AutoTokenizer.from_pretrained(models[0])
    x = tok([r["text"] for r in text_rows(8, 3, seed=5)], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert (a(**x).logits - b(**x).logits).abs().max() < 1e-4
    assert not torch.equal(a.bert.encoder.layer[0].intermediate.dense.weight, b.bert.encoder.layer[0].intermediate.dense.weight)
    # protect: a bare ViTModel saved with save_pretrained (legacy names on disk, attention and MLP)
    torch.manual_seed(0)
    vb = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            image_size=28, patch_size=7))
    vb.save_pretrained(tmp_path / "vit-base")
    _perturb(vb, 0.05, seed=3)
    vb.save_pretrained(tmp_path / "vit-ft")
    res = runner.invoke(app, ["protect", str(tmp_path / "vit-ft"), "--base", str(tmp_path / "vit-base"), "--out",
                              str(tmp_path / "vit-prot")])
    assert res.exit_code == 0, res.output
    # scan and purify: your folder + your data (unlabeled for the scan, labeled for purification)
    res = runner.invoke(app, ["scan", str(models[0]), "--base", str(base), "--data", str(data[0]), "--json"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)
    assert -1 <= row["score"] <= 1
    res = runner.invoke(app, ["purify", str(models[0]), "--base", str(base), "--data", str(data[0]), "--method",
                              "both", "--keep-ratio", "0.5", "--keep-ratio", "1", "--epochs", "1", "--out",
                              str(tmp_path / "pure")])
    assert res.exit_code == 0, res.output
    m = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pure")
    assert m.config.num_labels == 3


def test_scanning_many_models_loads_their_base_once(bert, monkeypatch):
    import safemerge.api as api

    base, models, data, root = bert
    calls = []
    real = api.load_backbone
    monkeypatch.setattr(api, "load_backbone", lambda *a, **k: calls.append(a) or real(*a, **k))
    rows = api.scan_models([str(m) for m in models], str(base), data=str(data[0]), n_inputs=4)
    assert len(rows) == 2 and len(calls) == 1


def test_an_error_inside_a_progress_bar_gets_its_own_line():
    import typer
    from tqdm.auto import tqdm

    from safemerge.cli import one_line_errors
    from safemerge.errors import SafeMergeError

    demo = typer.Typer()

    @demo.command()
    @one_line_errors
    def run() -> None:
        for i in tqdm(range(10), desc="merging"):
            if i == 3:
                raise SafeMergeError("model.safetensors: tensor 'w' contains NaN or inf values")

    res = runner.invoke(demo, [])
    assert res.exit_code == 2
    assert any(line.startswith("error: model.safetensors") for line in res.output.splitlines()), res.output


def _family(kind: str, root: Path):
    """A tiny base + two classification fine-tunes of another architecture, saved with save_pretrained."""
    import transformers as T

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "roberta":
        cfg = T.RobertaConfig(vocab_size=len(WORDS) + 2, max_position_embeddings=40, pad_token_id=0, **small)
        base, cls, name = T.RobertaModel(cfg), T.RobertaForSequenceClassification, "roberta"
    elif kind == "dinov2":
        cfg = T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=28,
                             patch_size=7)
        base, cls, name = T.Dinov2Model(cfg), T.Dinov2ForImageClassification, "dinov2"
    else:
        cfg = T.CLIPConfig(vision_config=dict(image_size=28, patch_size=7, **small),
                           text_config=dict(vocab_size=50, **small))
        base, cls, name = T.CLIPVisionModel(cfg.vision_config), T.CLIPForImageClassification, "vision_model"
    base.save_pretrained(root / "base")
    models = []
    for i, n in enumerate((2, 3)):
        c = copy.deepcopy(cfg)
        c.num_labels = n
        m = cls(c)
        sub = m.get_submodule(name)
        missing = sub.load_state_dict(base.state_dict(), strict=False).missing_keys
        assert not [k for k in missing if not k.startswith("pooler.")]
        _perturb(sub, 0.05, seed=i + 1)
        m.save_pretrained(root / f"m{i}")
        models.append(root / f"m{i}")
    return root / "base", models


@pytest.mark.parametrize("kind", ["roberta", "dinov2", "clip"])
def test_other_architectures_merge_into_their_own_classes(kind, tmp_path):
    import transformers as T

    from safemerge.folders import load_task_folder
    from safemerge.model import TaskModel

    base, models = _family(kind, tmp_path)
    cfg = {"base_model": str(base), "models": [{"path": str(m)} for m in models], "method": "task_arithmetic",
           "parameters": {"scaling": 0.5}, "output": str(tmp_path / "out")}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["merge", str(tmp_path / "m.yaml")])
    assert res.exit_code == 0, res.output
    auto = T.AutoModelForSequenceClassification if kind == "roberta" else T.AutoModelForImageClassification
    inputs = ({"input_ids": torch.randint(3, len(WORDS), (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
              if kind == "roberta" else {"pixel_values": torch.randn(2, 3, 28, 28)})
    for m in models:
        out = auto.from_pretrained(tmp_path / "out" / m.name).eval()
        own = load_task_folder(m)
        merged = load_task_folder(tmp_path / "out" / m.name)
        enc = copy.deepcopy(own.encoder)
        enc.load_state_dict(merged.encoder_state)
        with torch.no_grad():  # the written folder computes the merged encoder under the model's own head
            assert (out(**inputs).logits - TaskModel(enc, own.head)(inputs)).abs().max() < 1e-5
        assert out.config.num_labels == own.head.num_labels
