"""Merge protection: exactness on tiny random BERT, ViT, DINOv2 and CLIP vision models, the direction of the
permutation, that it breaks task arithmetic, and the attacker's recovery."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn

from safemerge.errors import SafeMergeError
from safemerge.merging.methods import merge
from safemerge.safety.protect import find_blocks, mlp_permutation, protect_state, undo_protection

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def _models():
    return {
        "bert": (T.BertModel(T.BertConfig(vocab_size=60, intermediate_size=64, max_position_embeddings=32, **TINY),
                             add_pooling_layer=False), "text"),
        "vit": (T.ViTModel(T.ViTConfig(intermediate_size=64, image_size=28, patch_size=7, **TINY),
                           add_pooling_layer=False), "image"),
        "dinov2": (T.Dinov2Model(T.Dinov2Config(mlp_ratio=2, image_size=28, patch_size=7, layerscale_value=0.5,
                                                **TINY)), "image"),
        "clip": (T.CLIPVisionModel(T.CLIPVisionConfig(intermediate_size=64, image_size=28, patch_size=7, **TINY)),
                 "image"),
    }


def _inputs(kind: str):
    g = torch.Generator().manual_seed(1)
    if kind == "text":
        return {"input_ids": torch.randint(0, 60, (4, 12), generator=g),
                "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    return {"pixel_values": torch.randn(4, 3, 28, 28, generator=g)}


def _finetuned(model: nn.Module, seed: int = 0, eps: float = 0.02) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + eps * v.std().nan_to_num(0) * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


def _out(model: nn.Module, sd, kind: str) -> torch.Tensor:
    model.load_state_dict(sd)
    model.eval()
    with torch.no_grad():
        return model(**_inputs(kind)).last_hidden_state


@pytest.mark.parametrize("arch", ["bert", "vit", "dinov2", "clip"])
def test_protected_model_computes_the_same_function(arch):
    torch.manual_seed(0)
    model, kind = _models()[arch]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ft = _finetuned(model)
    prot = protect_state(ft, base, seed=3)
    assert max((prot[k] - ft[k]).abs().max() for k in ft if ft[k].is_floating_point()) > 0.1  # weights did move
    diff = (_out(model, prot, kind) - _out(model, ft, kind)).abs().max()
    assert diff < 1e-4, f"{arch}: protected output differs by {diff}"


def test_permutation_moves_away_from_base_and_matching_undoes_it():
    g = torch.Generator().manual_seed(0)
    base_in, base_out = torch.randn(16, 8, generator=g), torch.randn(8, 16, generator=g)
    w_in, w_out = base_in + 0.01 * torch.randn(16, 8, generator=g), base_out + 0.01 * torch.randn(8, 16, generator=g)
    far = mlp_permutation(w_in, w_out, base_in, base_out, far=True)
    ident = (base_in * w_in).sum() + (base_out * w_out).sum()
    permuted = (base_in * w_in[far]).sum() + (base_out * w_out[:, far]).sum()
    assert permuted < ident - 1.0  # new neuron i = old neuron far[i] is far from base neuron i
    # the attacker's matching maps the permuted neurons back to their original places
    back = mlp_permutation(w_in[far], w_out[:, far], base_in, base_out, far=False)
    assert torch.equal(far[back], torch.arange(16))


def test_protection_breaks_task_arithmetic_and_attacker_recovers_it():
    torch.manual_seed(0)
    model, kind = _models()["vit"]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = _finetuned(model, 1), _finetuned(model, 2)
    ref = _out(model, merge("task_arithmetic", base, [a, b], scaling=0.5), kind)
    prot = protect_state(a, base, seed=0)
    broken = _out(model, merge("task_arithmetic", base, [prot, b], scaling=0.5), kind)
    undone = undo_protection(prot, base)
    # permutations come back exactly, scales up to the fine-tuning's change of row norms
    assert max(float((undone[k] - a[k]).norm() / a[k].norm()) for k in a if a[k].ndim == 2) < 0.02
    recovered = _out(model, merge("task_arithmetic", base, [undone, b], scaling=0.5), kind)
    assert (broken - ref).abs().mean() > 10 * (recovered - ref).abs().mean()


def test_dropout_pruning_blocks_exact_recovery():
    torch.manual_seed(0)
    model, _ = _models()["bert"]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    a = _finetuned(model, 1)
    undone = undo_protection(protect_state(a, base, dropout=0.5, seed=0), base)
    assert max((undone[k] - a[k]).abs().max() for k in a if a[k].is_floating_point()) > 1e-3


def test_fused_qkv_layout_is_exact():
    """A timm-style block (fused qkv) protected through its state dict."""

    class Block(nn.Module):
        def __init__(self, d=16, h=2):
            super().__init__()
            self.h = h
            self.attn = nn.Module()
            self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            n, t, d = x.shape
            q, k, v = self.attn.qkv(x).view(n, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
            a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.h) ** 0.5, -1) @ v
            x = x + self.attn.proj(a.transpose(1, 2).reshape(n, t, d))
            return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(x)))

    torch.manual_seed(0)
    net = nn.Module()
    net.blocks = nn.ModuleList([Block(), Block()])
    base = {k: v.clone() for k, v in net.state_dict().items()}
    ft = _finetuned(net)
    x = torch.randn(3, 5, 16)

    def run(sd):
        net.load_state_dict(sd)
        with torch.no_grad():
            return net.blocks[1](net.blocks[0](x))

    assert find_blocks(ft)[0].name == "timm-vit"
    assert (run(protect_state(ft, base, seed=1)) - run(ft)).abs().max() < 1e-4


def test_unknown_architecture_is_a_one_line_error():
    sd = {"conv.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}
    with pytest.raises(SafeMergeError, match="unknown architecture.*'fc'") as e:
        protect_state(sd, sd)
    assert "\n" not in str(e.value)
