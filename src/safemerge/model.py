"""A task model = a shared encoder (the part that is merged) + a task head (never merged).

Inputs arrive raw (uint8 images [N,3,R,R] or strings) and are encoded per batch, so attacks can act on
pixels or words and every method evaluates through one code path."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .backbones import Backbone

Inputs = dict[str, torch.Tensor]


class InputEncoder:
    """Turns raw examples into the encoder's keyword inputs."""

    def __init__(self, backbone: Backbone, max_length: int = 32):
        self.modality = backbone.modality
        self.tokenizer = backbone.tokenizer
        self.max_length = max_length
        self.mean = torch.tensor(backbone.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(backbone.image_std).view(1, 3, 1, 1)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in [0, 1]) images -> normalized pixel values."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images
        return (x - self.mean) / self.std

    def __call__(self, x: torch.Tensor | list[str]) -> Inputs:
        if self.modality == "vision":
            return {"pixel_values": self.pixels(x)}  # type: ignore[arg-type]
        enc = self.tokenizer(list(x), padding=True, truncation=True, max_length=self.max_length,  # type: ignore[misc]
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def pooled_features(encoder: nn.Module, inputs: Mapping[str, torch.Tensor], modality: str) -> torch.Tensor:
    """Vision: the (layer-normed) class token; text: attention-masked mean of the last hidden states."""
    return pool(encoder(**inputs), inputs, modality)


def pool(out, inputs: Mapping[str, torch.Tensor], modality: str) -> torch.Tensor:
    """The pooling of `pooled_features`, on an encoder output already computed (e.g. by functional_call)."""
    if modality == "vision":
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]
    mask = inputs["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class TaskModel(nn.Module):
    """Encoder + linear head for one task."""

    def __init__(self, encoder: nn.Module, head: nn.Linear, modality: str):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.modality = modality

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(pooled_features(self.encoder, inputs, self.modality))


def batches(x: torch.Tensor | list[str], batch_size: int) -> Iterator[torch.Tensor | list[str]]:
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]


@torch.inference_mode()
def logits(model: TaskModel, encode: InputEncoder, x: torch.Tensor | list[str], batch_size: int = 256) -> torch.Tensor:
    """Logits of every example, in large batches without autograd."""
    model.eval()
    if isinstance(x, list):  # texts: batch by length, so padding (wasted compute) stays small
        order = sorted(range(len(x)), key=lambda i: len(x[i]))
        outs = [model(encode([x[i] for i in order[j:j + batch_size]])) for j in range(0, len(x), batch_size)]
        if not outs:
            return torch.empty(0, model.head.out_features)
        cat = torch.cat(outs)
        out = torch.empty_like(cat)
        out[torch.tensor(order)] = cat
        return out
    outs = [model(encode(b)) for b in batches(x, batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, model.head.out_features)


def predict(model: TaskModel, encode: InputEncoder, x: torch.Tensor | list[str], batch_size: int = 256) -> torch.Tensor:
    """Predicted class of every example."""
    return logits(model, encode, x, batch_size).argmax(-1)
