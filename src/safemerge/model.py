"""A task model = a shared encoder (the part that is merged) + a task head (never merged).

The head reads what the model's own class reads: `HFHead` wraps a Hugging Face `*ForSequenceClassification`
/ `*ForImageClassification` model whose encoder is cut out, so its logits are the class's own (BERT's pooler
over CLS, ViT's CLS token, DINOv2's CLS + mean patch token, CLIP's mean patch token...); `LinearHead` is a
linear layer over a pooled feature (the zoo's frozen probes). Both take the encoder's output and the encoder
inputs, so every method runs one functional encoder forward and then each task's head.

Inputs arrive raw (uint8 images [N,3,R,R] or strings) and are encoded per batch, so triggers can act on
pixels or words and every method evaluates through one code path."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Inputs = dict[str, torch.Tensor]
Pooling = Literal["mean", "cls", "pooler"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class InputEncoder:
    """Turns raw examples into the encoder's keyword inputs: a tokenizer and a length for text, the image
    normalisation for vision."""

    def __init__(self, backbone=None, max_length: int = 32, *, modality: str | None = None, tokenizer=None,
                 image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, resolution: int | None = None):
        if backbone is not None:
            modality, tokenizer = backbone.modality, backbone.tokenizer
            image_mean, image_std = backbone.image_mean, backbone.image_std
        self.modality = modality
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.resolution = resolution
        self.mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in [0, 1]) images -> normalized pixel values."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images
        return (x - self.mean) / self.std

    def __call__(self, x: torch.Tensor | list[str]) -> Inputs:
        if self.modality == "vision":
            return {"pixel_values": self.pixels(x)}  # type: ignore[arg-type]
        if self.tokenizer is None:
            from .errors import SafeMergeError

            raise SafeMergeError("no tokenizer: neither the base folder nor the model folders have one")
        enc = self.tokenizer(list(x), padding=True, truncation=True, max_length=self.max_length,  # type: ignore[misc]
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def pool(out, inputs: Mapping[str, torch.Tensor], pooling: Pooling) -> torch.Tensor:
    """A pooled feature of an encoder output: 'mean' (attention-masked mean of the last hidden states),
    'cls' (the first token's last hidden state), 'pooler' (the encoder's pooler output, else the CLS token)."""
    hidden = out.last_hidden_state
    if pooling == "pooler":
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else hidden[:, 0]
    if pooling == "cls":
        return hidden[:, 0]
    mask = inputs.get("attention_mask")
    if mask is None:
        return hidden.mean(1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class Head(nn.Module):
    """Maps the encoder's output (and its inputs) to logits. Subclasses: `LinearHead`, `HFHead`."""

    num_labels: int

    def forward(self, out, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class LinearHead(Head):
    """A linear layer over a pooled feature (`pool`); its state dict is a linear layer's (weight, bias)."""

    def __init__(self, in_features: int, num_labels: int, pooling: Pooling = "pooler"):
        super().__init__()
        lin = nn.Linear(in_features, num_labels)
        self.weight, self.bias = lin.weight, lin.bias
        self.pooling: Pooling = pooling
        self.num_labels = num_labels
        self.in_features = in_features

    @classmethod
    def of(cls, linear: nn.Linear, pooling: Pooling) -> "LinearHead":
        head = cls(linear.in_features, linear.out_features, pooling)
        head.weight, head.bias = linear.weight, linear.bias
        return head

    def features(self, out, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return pool(out, inputs, self.pooling)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)

    def forward(self, out, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.classify(self.features(out, inputs))


class _EncoderOutput(nn.Module):
    """Stands where a classifier's encoder was: returns the output computed outside (by a merged encoder)."""

    def __init__(self):
        super().__init__()
        self.value = None

    def forward(self, *args, **kwargs):
        return self.value


HF_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "inputs_embeds", "pixel_values")


class HFHead(Head):
    """The head of a Hugging Face classification model: the model itself with its encoder submodule
    (`encoder_name`) replaced by a slot for an output computed elsewhere. Its logits are the class's own."""

    def __init__(self, model: nn.Module, encoder_name: str):
        super().__init__()
        parent, _, leaf = encoder_name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        self.slot = _EncoderOutput()
        setattr(holder, leaf, self.slot)
        self.model = model
        self.encoder_name = encoder_name
        self.num_labels = int(model.config.num_labels)

    def forward(self, out, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.slot.value = out
        try:
            return self.model(**{k: v for k, v in inputs.items() if k in HF_INPUTS}).logits
        finally:
            self.slot.value = None


class TaskModel(nn.Module):
    """Encoder + head for one task; forward(inputs) -> logits."""

    def __init__(self, encoder: nn.Module, head: Head | nn.Linear, modality: str | None = None):
        super().__init__()
        self.encoder = encoder
        self.head = as_head(head, modality)
        self.modality = modality

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.encoder(**inputs), inputs)


LEGACY_POOLING: dict[str, Pooling] = {"text": "mean", "vision": "pooler"}


def as_head(head: Head | nn.Linear, modality: str | None) -> Head:
    """A bare nn.Linear is a head over the pooling the zoo used before heads named theirs."""
    if isinstance(head, Head):
        return head
    if isinstance(head, nn.Linear):
        return LinearHead.of(head, LEGACY_POOLING.get(modality or "vision", "pooler"))
    raise TypeError(f"not a task head: {type(head).__name__}")


def batches(x: torch.Tensor | list[str], batch_size: int) -> Iterator[torch.Tensor | list[str]]:
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]


@torch.inference_mode()
def logits(model: TaskModel, encode: InputEncoder, x: torch.Tensor | list[str], batch_size: int = 256) -> torch.Tensor:
    """Logits of every example, in large batches without autograd."""
    model.eval()
    n_out = int(getattr(getattr(model, "head", None), "num_labels", 0))
    if isinstance(x, list):  # texts: batch by length, so padding (wasted compute) stays small
        order = sorted(range(len(x)), key=lambda i: len(x[i]))
        outs = [model(encode([x[i] for i in order[j:j + batch_size]])) for j in range(0, len(x), batch_size)]
        if not outs:
            return torch.empty(0, n_out)
        cat = torch.cat(outs)
        out = torch.empty_like(cat)
        out[torch.tensor(order)] = cat
        return out
    outs = [model(encode(b)) for b in batches(x, batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, n_out)


def predict(model: TaskModel, encode: InputEncoder, x: torch.Tensor | list[str], batch_size: int = 256) -> torch.Tensor:
    """Predicted class of every example."""
    return logits(model, encode, x, batch_size).argmax(-1)
