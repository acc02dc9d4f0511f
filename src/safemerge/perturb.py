"""Universal input perturbations, where the input lives: normalized pixels for vision, the token-embedding
output for text. DAM, AWM and SAU perturb inputs this way; attacks with real triggers live in `attacks.py`.

A perturbation `delta` has one shape per modality: [3, R, R] (vision) or [L, hidden] (text, added to the word
embeddings of the first L positions, padding excluded); a leading batch dimension gives one per example
(e.g. zeros for the rows that stay clean). `perturbed_inputs` turns encoded inputs plus `delta`
into keyword inputs of the encoder, differentiable in `delta` and (for text) in the embedding weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SafeMergeError
from .model import InputEncoder

Inputs = dict[str, torch.Tensor]


def word_embedding_name(encoder: nn.Module) -> str:
    """The parameter name of the encoder's input word embeddings (text models)."""
    emb = encoder.get_input_embeddings() if hasattr(encoder, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    for name, p in encoder.named_parameters():
        if p is weight:
            return name
    raise SafeMergeError(f"{type(encoder).__name__}: no input word embeddings found (is it a text encoder?)")


def zero_perturbation(encode: InputEncoder, encoder: nn.Module, resolution: int | None = None) -> torch.Tensor:
    """An all-zero universal perturbation of the right shape for this encoder."""
    if encode.modality == "vision":
        if resolution is None:
            raise SafeMergeError("a vision perturbation needs the input resolution")
        return torch.zeros(3, resolution, resolution)
    return torch.zeros(encode.max_length, int(encoder.config.hidden_size))


def pixel_range(encode: InputEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest and highest normalized pixel values per channel ([1, 3, 1, 1] each)."""
    return (0.0 - encode.mean) / encode.std, (1.0 - encode.mean) / encode.std


def perturbed_inputs(inputs: Mapping[str, torch.Tensor], delta: torch.Tensor | None, encode: InputEncoder,
                     embedding: torch.Tensor | None = None) -> Inputs:
    """Encoder inputs with `delta` added where the input lives. Vision: pixels + delta, clamped to valid
    images. Text: `inputs_embeds = embedding[input_ids] + delta` on non-padding positions; `embedding` is the
    word-embedding matrix to use (e.g. a merged one, so gradients reach it)."""
    if encode.modality == "vision":
        x = inputs["pixel_values"]
        if delta is None:
            return dict(inputs)
        lo, hi = pixel_range(encode)
        return {"pixel_values": torch.maximum(torch.minimum(x + delta, hi), lo)}
    if embedding is None:
        raise SafeMergeError("a text perturbation needs the word-embedding matrix")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    emb = F.embedding(ids, embedding)
    if delta is not None:
        length = ids.shape[1]
        if length > delta.shape[-2]:
            raise SafeMergeError(f"text perturbation covers {delta.shape[-2]} positions, inputs have {length}")
        emb = emb + delta[..., :length, :] * mask.unsqueeze(-1).to(emb.dtype)
    return {"inputs_embeds": emb, "attention_mask": mask}


def project_l1(delta: torch.Tensor, bound: float) -> torch.Tensor:
    """Euclidean projection onto the L1 ball of radius `bound` (Duchi et al., 2008)."""
    flat = delta.flatten()
    if bound <= 0:
        return torch.zeros_like(delta)
    if flat.abs().sum() <= bound:
        return delta
    u = flat.abs().sort(descending=True).values
    css = u.cumsum(0)
    k = torch.arange(1, len(u) + 1, dtype=u.dtype)
    rho = int((u * k > css - bound).nonzero().max())
    theta = (css[rho] - bound) / (rho + 1)
    return (torch.sign(flat) * (flat.abs() - theta).clamp_min(0)).view_as(delta)


def project(delta: torch.Tensor, norm: str, bound: float) -> torch.Tensor:
    """Project onto the `norm` ball ('l1', 'l2' or 'linf') of radius `bound`; bound <= 0 or inf = no bound."""
    if bound == float("inf"):
        return delta
    if norm == "l1":
        return project_l1(delta, bound)
    if norm == "l2":
        n = delta.norm()
        return delta * (bound / n) if n > bound else delta
    if norm == "linf":
        return delta.clamp(-bound, bound)
    raise SafeMergeError(f"unknown perturbation norm '{norm}' (known: l1, l2, linf)")


def insert_placeholder(texts: list[str], word: str, seed: int = 0, max_position: int = 8) -> list[str]:
    """`word` inserted once into every text at a random word position among the first `max_position`
    (seeded per text), where a searched trigger token will go; the rest of the text is unchanged."""
    import random
    import zlib

    out = []
    for text in texts:
        words = text.split()
        rng = random.Random(zlib.crc32(f"{seed}|{text}".encode()))
        words.insert(rng.randint(0, min(len(words), max_position)), word)
        out.append(" ".join(words))
    return out


class RunEncoder:
    """An `InputEncoder` whose texts may carry placeholder tokens where a token run goes: the k-th placeholder
    of a text becomes the run's k-th token after tokenizing. How a trigger found as tokens is put into texts
    exactly (a run that starts with a word-piece continuation, "##raz ##ix", has no spelling that tokenizes
    back to it); texts without placeholders encode as they would without the wrapper."""

    def __init__(self, encode: InputEncoder, placeholder_id: int, run: tuple[int, ...] | list[int]):
        if not run:
            raise SafeMergeError("a token run to put in needs at least one token")
        self.inner, self.placeholder_id = encode, int(placeholder_id)
        self.run = torch.tensor([int(t) for t in run], dtype=torch.long)

    def __getattr__(self, name: str):  # modality, tokenizer, max_length, pixels: the wrapped encoder's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, x) -> Inputs:
        enc = self.inner(x)
        if "input_ids" not in enc:
            return enc
        ids = enc["input_ids"]
        at = ids == self.placeholder_id
        if not at.any():
            return enc
        k = (at.long().cumsum(1) - 1).clamp(0, len(self.run) - 1)
        return {**enc, "input_ids": torch.where(at, self.run[k], ids)}


def inserted_embedding_inputs(inputs: Mapping[str, torch.Tensor], embedding: torch.Tensor, placeholder_id: int,
                              vector: torch.Tensor) -> Inputs:
    """Text encoder inputs where every `placeholder_id` position holds `vector` ([hidden], or [N, hidden] one
    per example) instead of a word embedding: a free inserted token, differentiable in `vector`."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    emb = F.embedding(ids, embedding)
    at = (ids == placeholder_id).unsqueeze(-1)
    vec = vector.view(1, 1, -1) if vector.ndim == 1 else vector.unsqueeze(1)
    return {"inputs_embeds": torch.where(at, vec.to(emb.dtype), emb), "attention_mask": mask}


def masked_pattern_inputs(inputs: Mapping[str, torch.Tensor], mask: torch.Tensor, pattern: torch.Tensor,
                          encode: InputEncoder) -> Inputs:
    """Vision inputs with a trigger stamped in: x' = (1 - m) x + m p, with `mask` m in [0, 1] ([R, R] or
    [K, 1, R, R]) and `pattern` p an image in [0, 1] ([3, R, R] or [K, 3, R, R]); computed on normalized
    pixels, differentiable in both (Neural-Cleanse-style trigger inversion)."""
    x = inputs["pixel_values"]
    p = (pattern - encode.mean.squeeze(0)) / encode.std.squeeze(0) if pattern.ndim == 3 else (pattern - encode.mean) / encode.std
    return {"pixel_values": (1 - mask) * x + mask * p}
