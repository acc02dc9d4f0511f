"""Readers of users' data files, user-defined triggers, and the writers exporting splits in those formats."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from PIL import Image

from safemerge.data import (ImageTrigger, Split, TextTrigger, Trigger, UserData, load_data, parse_trigger,
                            save_image_folder, save_jsonl)
from safemerge.errors import SafeMergeError

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "eel": (0, 255, 0)}


def jsonl(path, rows, blank_after: int | None = None):
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def png(path, colour=(255, 0, 0), size=(6, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def image_folder(root, per_class=2):
    for name, colour in COLOURS.items():
        for k in range(per_class):
            png(root / name / f"{k}.png", colour)
    return root


def save(path, columns, features=None):
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(path)


def one_line_error(fn, *parts):
    with pytest.raises(SafeMergeError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg
    return msg


# ------------------------------------------------------------------------------------------------ formats

def test_jsonl_with_blank_lines(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [{"text": f"t{i}", "label": i % 3} for i in range(5)], blank_after=2)
    d = load_data(f)
    assert isinstance(d, UserData) and d.modality == "text" and d.labeled and d.classes is None
    assert d.split.x == [f"t{i}" for i in range(5)] and d.split.y.tolist() == [0, 1, 2, 0, 1]
    assert d.split.y.dtype == torch.long and d.source == str(f) and len(d) == 5


def test_csv_string_labels_and_tsv_ids(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"good, very ""good""",pos\nbad,neg\n\nfine,pos\n')
    d = load_data(tmp_path / "a.csv")
    assert d.split.x == ['good, very "good"', "bad", "fine"]
    assert d.classes == ["neg", "pos"] and d.split.y.tolist() == [1, 0, 1]
    (tmp_path / "a.tsv").write_text("sentence\tlabel\nx, y\t1\nz\t0\n")
    d = load_data(tmp_path / "a.tsv", text_column="sentence", num_labels=2)
    assert d.split.x == ["x, y", "z"] and d.split.y.tolist() == [1, 0] and d.classes is None


def test_json_list_and_json_lines(tmp_path):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    (tmp_path / "l.json").write_text(json.dumps(rows, indent=2))
    assert load_data(tmp_path / "l.json").split.y.tolist() == [1, 0]
    jsonl(tmp_path / "jl.json", [{"text": "a"}, {"text": "b"}])
    d = load_data(tmp_path / "jl.json")
    assert d.split.x == ["a", "b"] and not d.labeled and d.split.y.tolist() == [-1, -1]


def test_label_names_map_strings(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [{"text": "a", "label": "positive"}, {"text": "b", "label": "negative"},
                                      {"text": "c", "label": 1}])
    d = load_data(f, label_names=["negative", "positive"])
    assert d.split.y.tolist() == [1, 0, 1] and d.classes == ["negative", "positive"]
    jsonl(f, [{"text": "a", "label": "positive"}, {"text": "b", "label": "meh"}])
    one_line_error(lambda: load_data(f, label_names=["negative", "positive"]),
                   str(f), "row 2", "'meh'", "negative, positive")


def test_saved_dataset_classlabel_and_strings(tmp_path):
    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["neg", "pos"])})
    save(tmp_path / "cl", {"text": ["a", "b", "c"], "label": [1, 0, 1]}, feats)
    d = load_data(tmp_path / "cl")
    assert d.split.x == ["a", "b", "c"] and d.split.y.tolist() == [1, 0, 1] and d.classes == ["neg", "pos"]
    # the model's label order wins when it names the same classes
    d = load_data(tmp_path / "cl", label_names=["pos", "neg"])
    assert d.split.y.tolist() == [0, 1, 0] and d.classes == ["pos", "neg"]
    save(tmp_path / "str", {"sentence": ["a", "b"], "label": ["zz", "aa"]})
    d = load_data(tmp_path / "str", text_column="sentence")
    assert d.split.y.tolist() == [1, 0] and d.classes == ["aa", "zz"]
    # the unlabeled test splits of the Hub (every label -1)
    save(tmp_path / "u", {"text": ["a", "b"], "label": [-1, -1]}, feats)
    assert not load_data(tmp_path / "u").labeled
    one_line_error(lambda: load_data(tmp_path / "u", require_labels=True), "u", "-1")


def test_saved_dataset_dict_and_images(tmp_path):
    ds = lambda t: datasets.Dataset.from_dict({"text": [t], "label": [0]})  # noqa: E731
    datasets.DatasetDict({"train": ds("tr"), "test": ds("te")}).save_to_disk(tmp_path / "dd")
    d = load_data(tmp_path / "dd")
    assert d.split.x == ["te"] and d.source == str(tmp_path / "dd" / "test")
    datasets.DatasetDict({"train": ds("tr")}).save_to_disk(tmp_path / "one")
    assert load_data(tmp_path / "one").split.x == ["tr"]
    datasets.DatasetDict({"train": ds("tr"), "validation": ds("va")}).save_to_disk(tmp_path / "two")
    one_line_error(lambda: load_data(tmp_path / "two"), "two", "train, validation", "'test'")

    imgs = [Image.new("RGB", (5, 7), c) for c in COLOURS.values()]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(COLOURS))})
    save(tmp_path / "im", {"image": imgs, "label": [0, 1, 2]}, feats)
    d = load_data(tmp_path / "im", resolution=4)
    assert d.modality == "vision" and d.split.x.shape == (3, 3, 4, 4) and d.split.x.dtype == torch.uint8
    assert d.split.x[:, :, 0, 0].tolist() == [list(c) for c in COLOURS.values()]
    assert d.classes == list(COLOURS)


def test_image_folder_and_converter(tmp_path):
    root = image_folder(tmp_path / "imgs")
    d = load_data(root, resolution=3)
    assert d.modality == "vision" and d.labeled and d.classes == ["cat", "dog", "eel"]
    assert d.split.x.shape == (6, 3, 3, 3) and d.split.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert d.split.x[2, :, 1, 1].tolist() == [0, 0, 255]
    seen = []

    def convert(pil):
        seen.append(len(pil))
        return torch.zeros(len(pil), 3, 2, 2, dtype=torch.uint8)

    d = load_data(root, images=convert, limit=3, label_names=["dog", "cat", "eel"])
    assert seen == [3] and d.split.x.shape == (3, 3, 2, 2) and d.split.y.tolist() == [1, 1, 0]
    one_line_error(lambda: load_data(root, images=lambda pil: torch.zeros(len(pil), 3, 2, 2)), "converter")


def test_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "imgs", 1)
    assert load_data("imgs", resolution=2).split.y.tolist() == [0, 1, 2]
    png(tmp_path / "d" / "pics" / "a.png")
    (tmp_path / "d" / "v.jsonl").write_text('{"image": "pics/a.png"}\n')
    assert load_data("d/v.jsonl", resolution=2).split.x.shape == (1, 3, 2, 2)


def test_flat_image_folder_and_vision_rows(tmp_path):
    for k in range(3):
        png(tmp_path / "flat" / f"{k}.jpg")
    d = load_data(tmp_path / "flat", resolution=2)
    assert not d.labeled and d.split.y.tolist() == [-1, -1, -1] and d.classes is None
    one_line_error(lambda: load_data(tmp_path / "flat", require_labels=True), "flat", "ACC")
    png(tmp_path / "pics" / "a.png", (1, 2, 3))
    (tmp_path / "v.csv").write_text("image,label\npics/a.png,1\n")
    d = load_data(tmp_path / "v.csv", resolution=2)
    assert d.modality == "vision" and d.split.x[0, :, 0, 0].tolist() == [1, 2, 3]
    assert d.split.y.tolist() == [1]


def test_modality_inference_and_limit(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [{"text": str(i), "label": 0} for i in range(10)])
    assert load_data(f, limit=4).split.x == ["0", "1", "2", "3"]
    assert load_data(f, modality="text").modality == "text"
    one_line_error(lambda: load_data(f, modality="vision"), str(f), "no column 'image'", "looks like text")
    one_line_error(lambda: load_data(image_folder(tmp_path / "i", 1), modality="text"), "image folder")
    one_line_error(lambda: load_data(f, modality="audio"), "modality")


# ------------------------------------------------------------------------------------------------- errors

def test_errors_are_one_line_naming_file_and_row(tmp_path):
    a = tmp_path / "a.jsonl"
    jsonl(a, [{"text": "x", "label": 1}] * 16 + [{"text": "x", "label": 12}])
    one_line_error(lambda: load_data(a, num_labels=10),
                   f"{a}: row 17: label 12 is out of range (the model has 10 labels)")
    jsonl(a, [{"text": "x", "label": "b"}, {"text": "x", "label": "a"}, {"text": "x", "label": "c"}])
    one_line_error(lambda: load_data(a, num_labels=2), f"{a}: row 3:", "'c'", "out of range")
    jsonl(a, [{"text": "x"}] * 3 + [{"text": 5}])
    one_line_error(lambda: load_data(a), f"{a}: row 4: column 'text' is not text (got int)")
    a.write_text('{"text": "x"}\n' * 8 + '{"text": "x",}\n')
    one_line_error(lambda: load_data(a), f"{a}: row 9: not valid JSON (")
    a.write_text("")
    one_line_error(lambda: load_data(a), f"{a}: empty file")
    a.write_text("\n\n")
    one_line_error(lambda: load_data(a), f"{a}: empty file")
    jsonl(a, [{"text": "x", "label": 1}, {"text": "y"}])
    one_line_error(lambda: load_data(a), f"{a}: row 2: no 'label' value")
    jsonl(a, [{"text": "x", "label": 1}, {"text": "y", "label": "pos"}])
    one_line_error(lambda: load_data(a), f"{a}: row 2:", "name", "class ids")
    jsonl(a, [{"text": "x", "label": 1.5}])
    one_line_error(lambda: load_data(a), f"{a}: row 1:", "not a class id")
    jsonl(a, [{"text": "x"}])
    one_line_error(lambda: load_data(a, require_labels=True), f"{a}: no column 'label'", "ACC")

    c = tmp_path / "a.csv"
    c.write_text("sentence,label\nhi,1\n")
    one_line_error(lambda: load_data(c), f"{c}: no column 'text' (columns: sentence, label); set text_column")
    c.write_text("text,label\nhi,1\nho,1,extra\n")
    one_line_error(lambda: load_data(c), f"{c}: row 3:", "3 fields", "header has 2")
    c.write_text("text,label\n")
    one_line_error(lambda: load_data(c), f"{c}: no rows")
    (tmp_path / "l.json").write_text('[{"text": "a"}, 3]')
    one_line_error(lambda: load_data(tmp_path / "l.json"), "l.json: row 2: not a JSON object")
    (tmp_path / "a.txt").write_text("hi")
    one_line_error(lambda: load_data(tmp_path / "a.txt"), "a.txt", "unsupported format", ".jsonl")
    one_line_error(lambda: load_data(tmp_path / "nope.jsonl"), "nope.jsonl: no such file")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: load_data(tmp_path / "empty"), "empty: no images")


def test_image_errors(tmp_path):
    root = image_folder(tmp_path / "imgs", 1)
    (root / "cat" / "3.png").write_bytes(b"not a png")
    bad = root / "cat" / "3.png"
    one_line_error(lambda: load_data(root), f"{bad}: unreadable image (cannot identify image file)")
    (root / "cat" / "3.png").unlink()
    png(root / "x.png")
    one_line_error(lambda: load_data(root), "mixes images")
    (root / "x.png").unlink()
    one_line_error(lambda: load_data(root, label_names=["cat", "dog"]), "eel", "cat, dog")
    (tmp_path / "v.jsonl").write_text('{"image": "missing.png"}\n{"image": 3}\n')
    one_line_error(lambda: load_data(tmp_path / "v.jsonl"), "v.jsonl: row 1:", "missing.png", "not found")


# ----------------------------------------------------------------------------------------------- triggers

def test_text_trigger_positions():
    x = ["a b c d e f g h i j k l", "one", ""]
    assert TextTrigger("cf", position="start").apply(x)[:2] == ["cf a b c d e f g h i j k l", "cf one"]
    assert TextTrigger("cf", position="end").apply(x) == ["a b c d e f g h i j k l cf", "one cf", "cf"]
    assert TextTrigger("the movie was", position=2).apply(x)[:2] == ["a b the movie was c d e f g h i j k l",
                                                                     "one the movie was"]
    t = TextTrigger("cf", seed=3, max_position=4)
    out = t.apply(x)
    assert out == t.apply(x) and t.apply(x[:1]) == out[:1]          # per text, whatever the batch
    assert out[0].split().index("cf") <= 4 and out[0].replace("cf ", "", 1).replace(" cf", "", 1) == x[0]
    outs = {TextTrigger("cf", seed=s).apply(x[:1])[0] for s in range(20)}
    assert len(outs) > 1
    with pytest.raises(SafeMergeError):
        TextTrigger("cf").apply(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


def test_image_trigger_stamp_blend_file_random(tmp_path):
    x = torch.full((2, 3, 10, 10), 100, dtype=torch.uint8)
    out = ImageTrigger("white", size=0.3).apply(x)
    assert (out[:, :, 6:9, 6:9] == 255).all() and out.sum() - x.sum() == 2 * 3 * 9 * 155
    assert x.eq(100).all()                                              # the input is left alone
    out = ImageTrigger("#ff0000", size=2, position="top-left", margin=0).apply(x)
    assert out[0, :, 0, 0].tolist() == [255, 0, 0] and out[0, :, 2, 2].tolist() == [100, 100, 100]
    out = ImageTrigger("white", size=0.3, blend=0.5).apply(x)
    assert out[0, :, 7, 7].tolist() == [178, 178, 178] and out[0, 0, 0, 0] == 100
    cb = ImageTrigger("checkerboard", size=6, position="center").apply(x)
    assert set(cb[0, 0, 2:8, 2:8].unique().tolist()) == {0, 255}

    f = png(tmp_path / "trig.png", (0, 255, 0), (4, 4))
    out = ImageTrigger(str(f), size=4, position=(1, 2)).apply(x)
    assert out[0, :, 2, 1].tolist() == [0, 255, 0] and out[0, :, 6, 1].tolist() == [100] * 3
    full = ImageTrigger(str(f), size=1.0, blend=0.2).apply(x)
    assert (full[:, 1] == 131).all() and (full[:, 0] == 80).all()

    imgs = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    t = ImageTrigger("white", size=2, position="random", seed=1)
    out = t.apply(imgs)
    assert torch.equal(out, t.apply(imgs)) and torch.equal(t.apply(imgs[2:3]), out[2:3])
    corners = [tuple((o.ne(i).any(0)).nonzero()[0].tolist()) for o, i in zip(out, imgs)]
    assert len(set(corners)) > 1
    with pytest.raises(SafeMergeError):
        t.apply(["text"])


def test_parse_trigger_forms(tmp_path):
    t = parse_trigger("word:cf", target=2)
    assert isinstance(t, TextTrigger) and (t.text, t.position, t.target) == ("cf", "random", 2)
    assert t.name == "word:cf" and isinstance(t, Trigger)
    t = parse_trigger('word:"the movie was"@start')
    assert (t.text, t.position, t.name) == ("the movie was", "start", 'word:"the movie was"@start')
    assert parse_trigger("word:the movie was@end").text == "the movie was"
    assert parse_trigger("word:cf@random").position == "random" and parse_trigger("word:cf@3").position == 3
    p = parse_trigger("patch:white")
    assert isinstance(p, ImageTrigger)
    assert (p.patch, p.size, p.position, p.blend) == ("white", 0.1, "bottom-right", 1)
    p = parse_trigger("patch:#ff0000,size=6,pos=top-left")
    assert (p.size, p.position, p.name) == (6, "top-left", "patch:#ff0000,size=6,pos=top-left")
    p = parse_trigger("patch:checkerboard,size=0.15,pos=bottom-right", seed=4)
    assert (p.patch, p.size, p.seed) == ("checkerboard", 0.15, 4) and p.name == "patch:checkerboard,size=0.15"
    assert parse_trigger("patch:red,pos=(3,4)").position == (3, 4)
    f = png(tmp_path / "trigger.png", size=(3, 3))
    p = parse_trigger(f"patch:{f},size=0.2,blend=0.3")
    assert (p.size, p.blend, p.name) == (0.2, 0.3, "patch:trigger.png,size=0.2,blend=0.3")
    p = parse_trigger(f"blend:{f},alpha=0.1")
    assert (p.size, p.blend, p.name) == (1.0, 0.1, "blend:trigger.png,alpha=0.1")
    for bad in ["cf", "word:", "zap:x", "patch:white,size=big", "patch:white,wat=1", 'word:"open']:
        one_line_error(lambda: parse_trigger(bad), f"bad trigger '{bad}'", "word:", "patch:", "blend:")
    for bad, why in [("word:cf@middle", "position"), ("patch:notacolour", "colour 'notacolour'"),
                     ("patch:white,blend=2", "blend"),
                     ("patch:nope/missing.png", "nope/missing.png: patch image not found")]:
        one_line_error(lambda: parse_trigger(bad), f"bad trigger '{bad}'", why)


def test_asr_split_drops_target_rows():
    split = Split(["a", "b", "c", "d"], torch.tensor([0, 1, 2, 1]))
    s = TextTrigger("cf", target=1, position="start").asr_split(split)
    assert s.x == ["cf a", "cf c"] and s.y.tolist() == [0, 2]
    img = Split(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.tensor([2, 0, 2]))
    s = ImageTrigger(target=2).asr_split(img)
    assert s.x.shape == (1, 3, 8, 8) and s.y.tolist() == [0] and s.x.max() == 255


# ------------------------------------------------------------------------------------------------ writers

def test_save_jsonl_round_trip(tmp_path):
    split = Split(["a", "b é", "c"], torch.tensor([1, 0, 1]))
    f = save_jsonl(tmp_path / "out" / "t.jsonl", split, classes=["neg", "pos"])
    assert json.loads(f.read_text().splitlines()[1]) == {"text": "b é", "label": 0, "label_text": "neg"}
    d = load_data(f)
    assert d.split.x == split.x and torch.equal(d.split.y, split.y)
    assert stat.S_IMODE(f.stat().st_mode) == 0o644 and os.listdir(f.parent) == ["t.jsonl"]


def test_save_image_folder_round_trip(tmp_path):
    x = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8)
    split = Split(x, torch.tensor([2, 0, 1, 0, 2]))
    root = save_image_folder(tmp_path / "exp", split, ["bird", "cat", "dog"])
    assert sorted(os.listdir(tmp_path)) == ["exp"] and stat.S_IMODE(root.stat().st_mode) == 0o755
    assert stat.S_IMODE(next((root / "cat").iterdir()).stat().st_mode) == 0o644
    d = load_data(root, resolution=6)
    order = [1, 3, 2, 0, 4]                                   # class by class, then by row
    assert d.classes == ["bird", "cat", "dog"] and torch.equal(d.split.x, x[order])
    assert d.split.y.tolist() == split.y[order].tolist()
    d = load_data(root, resolution=6, label_names=["dog", "cat", "bird"])
    assert d.split.y.tolist() == [2, 2, 1, 0, 0]
    one_line_error(lambda: save_image_folder(root, split, ["bird", "cat", "dog"]), "already exists")
    one_line_error(lambda: save_image_folder(tmp_path / "e2", split, ["a", "a", "b"]), "class names")


def test_import_is_light():
    code = "import sys, safemerge.data; print(sorted({'datasets', 'PIL', 'pyarrow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
