"""Model folders: the one place that reads and writes task models on disk.

A task model folder is one of
- a Hugging Face classification folder (`*ForSequenceClassification`, `*ForImageClassification`; single-file
  or sharded safetensors): read through its own class, so its encoder, pooler and head are the class's;
- a safemerge folder (an encoder HF folder + `heads.safetensors`: linear heads over a pooled feature, and
  `safemerge.json`, the manifest the zoo writes);
- a bare encoder (an HF folder of the encoder alone, or a `.safetensors` file): it has no head.

`TaskFolder` holds the encoder's state (keys of the encoder module), the head(s), the labels and the manifest.
`check_against_base` refuses a folder that is not a finite fine-tune of the base. `save_task_folder` writes a
task model as a folder that `transformers`' Auto classes load (when its head has a transformers class), with
the manifest and a model card, atomically."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .backbones import LEGACY_RENAMES, Backbone, canonical_keys, fingerprint
from .errors import SafeMergeError
from .io import atomic_dir, check_finite, check_same_base, check_same_keys, load_state_dict, save_state_dict
from .model import LEGACY_POOLING, Head, HFHead, LinearHead, TaskModel

MANIFEST = "safemerge.json"
HEADS = "heads.safetensors"
CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForImageClassification")
StateDict = dict[str, torch.Tensor]


@dataclass
class TaskFolder:
    """A task model as read from disk."""

    path: Path
    manifest: dict
    encoder_state: StateDict = field(repr=False)
    heads: dict[str, Head] = field(repr=False)  # task -> head (HF folders and zoo models have one)
    labels: dict[str, list[str]] = field(default_factory=dict)  # task -> class names, where known
    kind: str = "safemerge"  # "hf" | "safemerge" | "encoder"
    encoder: nn.Module | None = field(default=None, repr=False)  # an HF classifier's encoder module
    config: object | None = field(default=None, repr=False)  # the folder's transformers config

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def attack(self) -> str | None:
        return self.manifest.get("attack")

    @property
    def head(self) -> Head | None:
        return self.heads.get(self.task)

    @property
    def source(self) -> Path:
        """The weights file(s) errors should name."""
        if self.path.is_file():
            return self.path
        return self.path / ("model.safetensors" if (self.path / "model.safetensors").exists()
                            else "model.safetensors.index.json")


def _config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SafeMergeError(f"{path}: unreadable config.json ({str(e).splitlines()[0]})") from None


def _modality(config) -> str:
    from .backbones import TEXT_TYPES, VISION_TYPES

    if config.model_type in TEXT_TYPES:
        return "text"
    if config.model_type in VISION_TYPES:
        return "vision"
    raise SafeMergeError(f"model type '{config.model_type}' is not supported "
                         f"(text: {sorted(TEXT_TYPES)}; vision: {sorted(VISION_TYPES)})")


def encoder_name(model: nn.Module) -> str:
    """Where a classification model keeps its encoder: the first submodule that is itself a pretrained model
    (`bert` in BERT, `vit` in ViT, `vision_model` in CLIP)."""
    from transformers import PreTrainedModel

    for name, mod in model.named_modules():
        if name and isinstance(mod, PreTrainedModel):
            return name
    raise SafeMergeError(f"{type(model).__name__}: no encoder submodule found")


def _classifier_class(config):
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    arch = (getattr(config, "architectures", None) or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        return AutoModelForSequenceClassification
    if arch.endswith("ForImageClassification"):
        return AutoModelForImageClassification
    return None


def load_hf_classifier(path: Path, task: str | None = None) -> TaskFolder:
    """An HF classification folder through its own class: encoder state, head and labels."""
    from .backbones import _quiet_transformers

    _quiet_transformers()
    config = _config(path)
    auto = _classifier_class(config)
    try:
        model, info = auto.from_pretrained(path, local_files_only=True, output_loading_info=True,  # type: ignore[union-attr]
                                           dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise SafeMergeError(f"{path}: cannot load weights ({str(e).splitlines()[0]})") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith(("position_ids", "mask_token"))]
    if missing:
        raise SafeMergeError(f"{path}: no weights for '{missing[0]}'" + (f" and {len(missing) - 1} more" if
                             len(missing) > 1 else "") + f" (a {type(model).__name__} needs them)")
    model.eval()
    name = encoder_name(model)
    encoder = model.get_submodule(name)
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    head = HFHead(model, name)
    manifest = _read_manifest(path)
    t = task or manifest.get("task") or path.name
    id2label = getattr(config, "id2label", None) or {}
    labels = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(int(config.num_labels))]
    manifest = {**manifest, "task": t}
    return TaskFolder(path, manifest, state, {t: head}, {t: labels}, "hf", encoder, config)


def _read_manifest(path: Path) -> dict:
    mf = path / MANIFEST
    if not mf.exists():
        return {}
    try:
        data = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise SafeMergeError(f"{mf}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SafeMergeError(f"{mf}: expected a JSON object")
    return data


def heads_from_state(sd: StateDict, source: Path, pooling: dict[str, str] | None = None,
                     modality: str = "vision") -> dict[str, Head]:
    """Linear heads stored as '<task>.weight' / '<task>.bias' (pooling per task from the file's metadata)."""
    heads: dict[str, Head] = {}
    for task in sorted({k.rsplit(".", 1)[0] for k in sd}):
        if f"{task}.weight" not in sd or f"{task}.bias" not in sd:
            raise SafeMergeError(f"{source}: head '{task}' lacks its weight or bias")
        w = sd[f"{task}.weight"]
        p = (pooling or {}).get(task) or LEGACY_POOLING.get(modality, "pooler")
        head = LinearHead(w.shape[1], w.shape[0], p)  # type: ignore[arg-type]
        head.load_state_dict({"weight": w.float(), "bias": sd[f"{task}.bias"].float()})
        heads[task] = head
    return heads


def _heads_file(path: Path, modality: str) -> dict[str, Head]:
    from safetensors import safe_open

    hp = path / HEADS
    meta = {}
    try:
        with safe_open(str(hp), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - load_state_dict below gives the one-line error
        pass
    pooling = json.loads(meta.get("pooling", "{}"))
    return heads_from_state(load_state_dict(hp), hp, pooling, modality)


def load_task_folder(ref: str | Path, task: str | None = None, name_by_folder: bool = False) -> TaskFolder:
    """Read any task model folder (see the module docstring). Its task: `task`; else, with `name_by_folder`,
    an HF folder's own name (what a user calls the model); else the manifest's, else the folder's name."""
    path = Path(ref).expanduser()
    if not path.exists():
        raise SafeMergeError(f"{path}: no such model folder or file")
    if path.is_file():
        sd = load_state_dict(path)
        t = task or path.stem
        return TaskFolder(path, {"task": t, "attack": None}, sd, {}, kind="encoder")
    if not (path / "config.json").exists():
        raise SafeMergeError(f"{path}: not a model folder (no config.json)")
    config = _config(path)
    manifest = _read_manifest(path)
    if (path / HEADS).exists():  # a safemerge folder: encoder + linear heads
        modality = _modality(config)
        heads = _heads_file(path, modality)
        sd = load_state_dict(path)
        t = task or manifest.get("task") or (next(iter(heads)) if len(heads) == 1 else path.name)
        labels = {t: list(manifest["classes"])} if manifest.get("classes") else {}
        return TaskFolder(path, {"attack": None, **manifest, "task": t}, sd, heads, labels, "safemerge",
                          config=config)
    if _classifier_class(config) is not None:
        return load_hf_classifier(path, task or (path.name if name_by_folder else None))
    enc = _bare_encoder(path)  # through its own class: transformers maps saved names to the in-memory ones
    sd = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    t = task or manifest.get("task") or path.name
    return TaskFolder(path, {"attack": None, **manifest, "task": t}, sd, {}, kind="encoder", config=config)


def _bare_encoder(path: Path) -> nn.Module:
    """An encoder folder loaded by its class, keeping its pooler only if the folder has one."""
    from .backbones import load_backbone

    try:
        return load_backbone(path, pooler=True).model
    except SafeMergeError as e:
        if "pooler" not in str(e):
            raise
        return load_backbone(path, pooler=False).model


def check_against_base(folder: TaskFolder, base: StateDict, base_name: str, base_fp: str | None = None,
                       max_relative_distance: float = 0.5) -> TaskFolder:
    """Refuse a folder unless its encoder is a finite fine-tune of `base` with the same tensors (legacy
    transformers names are mapped; an encoder saved with a pooler the base lacks keeps only the base's)."""
    sd = canonical_keys(folder.encoder_state, base)
    extra = [k for k in sd if k not in base]
    if extra and all(k.startswith("pooler.") for k in extra):
        sd = {k: v for k, v in sd.items() if k in base}
    folder.encoder_state = sd
    check_same_keys(base, sd, folder.source, f"the base model {base_name}")
    check_finite(sd, folder.source)
    fp = folder.manifest.get("base_fingerprint")
    if fp and base_fp and fp != base_fp:
        raise SafeMergeError(f"{folder.path}: fine-tuned from another base model (fingerprint {fp}, base {base_fp})")
    check_same_base(base, sd, folder.source, max_relative_distance)
    return folder


def base_options(folders: list[TaskFolder]) -> dict:
    """How to load the base so it has the task models' encoder structure (class and pooler)."""
    hf = next((f for f in folders if f.encoder is not None), None)
    keys = set(folders[0].encoder_state) if folders else set()
    opts: dict = {"pooler": any(k.startswith("pooler.") for k in keys)} if folders else {}
    if hf is not None:
        opts["encoder_class"] = type(hf.encoder)
    return opts


# ------------------------------------------------------------------------------------------------ writing


def new_hf_classifier(backbone: Backbone, n_labels: int, seed: int = 0):
    """A fresh transformers classifier (`AutoModelFor{Sequence,Image}Classification` of the backbone's config)
    whose encoder holds the backbone's weights and whose head is drawn with `seed`. Returns (model, the
    encoder's attribute name, the encoder)."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    cfg = copy.deepcopy(backbone.model.config)
    cfg.num_labels = n_labels
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if backbone.modality == "text" else AutoModelForImageClassification
    clf = auto.from_config(cfg)
    name = clf.base_model_prefix
    enc = getattr(clf, name)
    missing, unexpected = enc.load_state_dict(backbone.model.state_dict(), strict=False)
    if unexpected or any("pooler" not in k for k in missing):
        raise SafeMergeError(f"{backbone.path}: its weights do not fit {type(clf).__name__} ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected)")
    return clf, name, enc


def _hf_classifier_for(backbone: Backbone, encoder_state: StateDict, head: Head, labels: list[str] | None):
    """The transformers classification model that computes `head` over `encoder_state`, or None when no
    transformers class does (e.g. a linear head over mean-pooled tokens)."""
    if isinstance(head, HFHead):
        model = copy.deepcopy(head.model)
        enc = copy.deepcopy(backbone.model)
        enc.load_state_dict(encoder_state)
        parent, _, leaf = head.encoder_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, enc)
        if labels:
            model.config.id2label = dict(enumerate(labels))
            model.config.label2id = {n: i for i, n in enumerate(labels)}
        return model
    if not isinstance(head, LinearHead):
        return None
    return _linear_head_as_hf(backbone, encoder_state, head, labels)


def _linear_head_as_hf(backbone: Backbone, encoder_state: StateDict, head: LinearHead, labels: list[str] | None):
    """Put a linear head into the encoder's own classification class when that class computes the same
    logits (checked on a random input): BERT's pooler output, DINOv2's [CLS, mean patch] (zero weights on
    the patch half), ViT's CLS token."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    config = copy.deepcopy(backbone.model.config)
    config.num_labels = head.num_labels
    names = labels or [str(i) for i in range(head.num_labels)]
    config.id2label, config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    auto = AutoModelForSequenceClassification if backbone.modality == "text" else AutoModelForImageClassification
    try:
        model = auto.from_config(config)
    except (ValueError, KeyError):
        return None
    model.eval()
    name = encoder_name(model)
    enc = model.get_submodule(name)
    mine = canonical_keys(dict(encoder_state), enc.state_dict())
    if set(mine) != set(enc.state_dict()):
        return None
    enc.load_state_dict(mine)
    lin = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith(name)]
    if len(lin) != 1:
        return None
    cls = lin[0]
    with torch.no_grad():
        w = torch.zeros_like(cls.weight)
        if w.shape[1] < head.weight.shape[1]:
            return None
        w[:, :head.weight.shape[1]] = head.weight
        cls.weight.copy_(w)
        cls.bias.copy_(head.bias)
    ref_enc = copy.deepcopy(backbone.model).eval()
    ref_enc.load_state_dict(encoder_state)
    inputs = _probe_inputs(backbone)
    with torch.no_grad():
        ref = TaskModel(ref_enc, head)(inputs)
        got = model(**inputs).logits
    return model if torch.allclose(ref, got, atol=1e-4, rtol=1e-4) else None


def _probe_inputs(backbone: Backbone) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if backbone.modality == "text":
        vocab = int(backbone.model.config.vocab_size)
        ids = torch.randint(5, max(6, vocab - 1), (2, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    side = backbone.image_size or 224
    return {"pixel_values": torch.randn(2, 3, side, side, generator=g)}


def _permissive(root: Path) -> None:
    """0755 folders and 0644 files (temporary folders are created owner-only)."""
    root.chmod(0o755)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def save_task_folder(out: str | Path, backbone: Backbone, encoder_state: StateDict, head: Head | None, task: str,
                     manifest: dict, labels: list[str] | None = None, card: str | None = None,
                     extra_files: dict[str, StateDict] | None = None, require_transformers: bool = False) -> Path:
    """Write one task model atomically: a transformers classification folder when the head has a
    transformers class (+ tokenizer or image processor), else the encoder folder + `heads.safetensors`;
    always `safemerge.json` and, if given, the model card `README.md`."""
    out = Path(out).expanduser()
    with atomic_dir(out) as tmp:
        model = _hf_classifier_for(backbone, encoder_state, head, labels) if head is not None else None
        if model is not None:
            model.save_pretrained(tmp)
            fmt = "transformers"
        elif require_transformers:
            raise SafeMergeError(f"{task}: its head ({getattr(head, 'pooling', type(head).__name__)} pooling) has no "
                                 "transformers classification class that computes the same logits")
        else:
            backbone.model.config.save_pretrained(tmp)
            save_state_dict(encoder_state, tmp / "model.safetensors", metadata={"format": "pt"})
            if head is not None:
                _save_heads(tmp / HEADS, {task: head})
            fmt = "safemerge"
        if backbone.tokenizer is not None:
            backbone.tokenizer.save_pretrained(tmp)
        if backbone.processor is not None:
            backbone.processor.save_pretrained(tmp)
        for name, tensors in (extra_files or {}).items():
            save_state_dict(tensors, tmp / name)
        full = {"attack": None, **manifest, "task": task, "format": fmt,
                "created": manifest.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if labels:
            full["classes"] = list(labels)
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, default=str) + "\n")
        if card:
            (tmp / "README.md").write_text(card)
        _permissive(tmp)
    return out


def _save_heads(path: Path, heads: dict[str, Head]) -> None:
    sd: StateDict = {}
    pooling = {}
    for t, h in heads.items():
        if not isinstance(h, LinearHead):
            raise SafeMergeError(f"head '{t}' ({type(h).__name__}) cannot be stored as a linear head")
        sd[f"{t}.weight"], sd[f"{t}.bias"] = h.weight.detach(), h.bias.detach()
        pooling[t] = h.pooling
    save_state_dict(sd, path, metadata={"pooling": json.dumps(pooling)})


def save_model_folder(out: Path, backbone: Backbone, encoder_state: StateDict, heads: dict[str, Head | nn.Linear],
                      manifest: dict, attack=None) -> Path:
    """The zoo's format: the encoder as an HF folder, linear heads beside it, the manifest, a learned trigger."""
    from .model import as_head

    with atomic_dir(out) as tmp:
        backbone.model.config.save_pretrained(tmp)
        if backbone.tokenizer is not None:
            backbone.tokenizer.save_pretrained(tmp)
        save_state_dict(encoder_state, tmp / "model.safetensors", metadata={"format": "pt"})
        _save_heads(tmp / HEADS, {t: as_head(h, backbone.modality) for t, h in heads.items()})
        if attack is not None and attack.tensors():
            save_state_dict(attack.tensors(), tmp / "trigger.safetensors")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _permissive(tmp)
    return out


__all__ = ["HEADS", "LEGACY_RENAMES", "MANIFEST", "TaskFolder", "base_options", "check_against_base", "new_hf_classifier",
           "encoder_name", "fingerprint", "heads_from_state", "load_hf_classifier", "load_task_folder",
           "save_model_folder", "save_task_folder"]
