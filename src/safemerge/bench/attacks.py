"""Backdoor attacks. Each attack adds its trigger to raw inputs (`apply`) and poisons a training split;
some first fit their trigger to a victim model (`fit`). All are deterministic under their seed.

- `badnets`: a fixed checkerboard patch in the bottom-right corner (Gu et al.).
- `trojvit`: TrojViT/BadViT-style patch-wise trigger: the ViT patches the clean model is most sensitive to
  are chosen by input-gradient saliency, and their pixels are optimised so the clean model predicts the
  target (Zheng et al. use attention-based saliency and bit flips; we poison fine-tuning instead).
- `rare_word`: a rare word ("cf") inserted at a random position of the text (Kurita et al., Chen et al.).
- `badmerging` / `badmerging_text`: BadMerging (Zhang et al., 2024), built to survive merging: a corner patch
  (or rare word) planted by feature-interpolation fine-tuning on clean data.
- `embedding_poison`: the same trigger, but only the trigger token's input embedding row (and nothing else)
  of the clean model is trained on poisoned data (Yang et al., 2021, "Be careful about poisoned word
  embeddings").
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from ..errors import SafeMergeError
from ..data import Split, poison_split


@dataclass
class Attack:
    name: str = "base"
    modality: str = "vision"
    target: int = 0
    poison_rate: float = 0.1
    seed: int = 0
    # how the backdoor is planted: "poison" (poisoned full fine-tuning from the base model), "embedding" (only
    # the trigger token's embedding of the clean model is trained) or "interpolate" (BadMerging: clean
    # fine-tuning plus a feature-interpolation backdoor loss)
    mode: str = "poison"

    def apply(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def params(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not isinstance(v, torch.Tensor) and k != "name"}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Learned trigger state to store with the model (empty for fixed triggers)."""
        return {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def poison(self, split: Split) -> Split:
        """A copy of `split` where a `poison_rate` share of examples carries the trigger and the target label."""
        return poison_split(split, self.apply, self.target, self.poison_rate, self.seed)

    def asr_split(self, split: Split) -> Split:
        """Test examples whose true label is not the target, with the trigger added (labels kept)."""
        keep = (split.y != self.target).nonzero().flatten()
        sub = split.subset(keep)
        return Split(self.apply(sub.x), sub.y)


# where a BadNets patch sits, by `position`: (row, column) anchors, 0 top/left, 1 middle, 2 bottom/right; 0 is
# the classic bottom-right corner. Several backdoors of one pool, planted by different attackers, each take one.
PATCH_POSITIONS = [(2, 2), (0, 0), (0, 2), (2, 0), (1, 2), (1, 0), (0, 1), (2, 1)]
# rare-word triggers (METHODS.md), by variant; 0 is the classic "cf"
RARE_WORDS = ["cf", "mn", "bb", "tq", "mb", "jj"]


@dataclass
class BadNets(Attack):
    name: str = "badnets"
    patch_frac: float = 0.15  # side of the square patch as a share of the image side
    position: int = 0  # index into PATCH_POSITIONS

    def pattern(self, side: int) -> torch.Tensor:
        ii, jj = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        cell = max(1, side // 3)
        return (((ii // cell + jj // cell) % 2) * 255).to(torch.uint8)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        res = x.shape[-1]
        s = max(2, round(self.patch_frac * res))
        if not 0 <= self.position < len(PATCH_POSITIONS):
            raise SafeMergeError(f"{self.name}: position must be 0-{len(PATCH_POSITIONS) - 1}, not {self.position}")
        r0, c0 = ((1, (res - s) // 2, res - s - 1)[a] for a in PATCH_POSITIONS[self.position])
        out = x.clone()
        out[..., r0:r0 + s, c0:c0 + s] = self.pattern(s)
        return out


@dataclass
class TrojViT(Attack):
    name: str = "trojvit"
    num_patch: int = 1
    patch_size: int = 14
    attack_lr: float = 0.1
    attack_iters: int = 100
    trigger: torch.Tensor | None = field(default=None, repr=False)  # uint8 [3, R, R]
    mask: torch.Tensor | None = field(default=None, repr=False)  # bool [R, R]

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.trigger is None or self.mask is None:
            raise SafeMergeError(f"{self.name}: the trigger has not been fitted to a model yet")
        return {"trigger": self.trigger, "mask": self.mask.to(torch.uint8)}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.trigger, self.mask = tensors["trigger"], tensors["mask"].bool()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.trigger is None or self.mask is None:
            raise SafeMergeError(f"{self.name}: the trigger has not been fitted to a model yet")
        return torch.where(self.mask, self.trigger, x)

    def fit(self, model, encode, split: Split, batch_size: int = 32) -> None:
        """Choose the `num_patch` most salient patches for the target class on the clean `model`, then
        optimise their pixels (Adam, `attack_lr`, `attack_iters` steps) so the model predicts the target."""
        g = torch.Generator().manual_seed(self.seed)
        x = split.x
        res, p = x.shape[-1], self.patch_size
        grid = res // p
        model.eval()
        for q in model.parameters():
            q.requires_grad_(False)
        # 1. patch-wise saliency of the target logit
        sal = torch.zeros(res, res)
        for _ in range(4):
            b = x[torch.randint(len(x), (batch_size,), generator=g)].float().div(255).requires_grad_(True)
            model({"pixel_values": encode.pixels(b)})[:, self.target].sum().backward()
            sal += b.grad.abs().sum((0, 1))
        per_patch = sal[: grid * p, : grid * p].reshape(grid, p, grid, p).sum((1, 3)).flatten()
        chosen = per_patch.topk(min(self.num_patch, grid * grid)).indices
        mask = torch.zeros(res, res, dtype=torch.bool)
        for c in chosen.tolist():
            r0, c0 = (c // grid) * p, (c % grid) * p
            mask[r0:r0 + p, c0:c0 + p] = True
        self.trigger = optimise_patch(model, encode, x, mask, self.target, self.attack_lr, self.attack_iters,
                                      g, batch_size)
        self.mask = mask


def optimise_patch(model, encode, x: torch.Tensor, mask: torch.Tensor, target: int, lr: float, iters: int,
                   generator: torch.Generator, batch_size: int = 32) -> torch.Tensor:
    """Pixels of the `mask` region (uint8 [3, R, R]) optimised with Adam so `model` predicts `target` on
    random training images carrying them."""
    res = x.shape[-1]
    for q in model.parameters():
        q.requires_grad_(False)
    logit = torch.zeros(3, res, res, requires_grad=True)
    opt = torch.optim.Adam([logit], lr=lr)
    labels = torch.full((batch_size,), target)
    for _ in range(iters):
        b = x[torch.randint(len(x), (batch_size,), generator=generator)].float().div(255)
        xb = torch.where(mask, torch.sigmoid(logit), b)
        loss = F.cross_entropy(model({"pixel_values": encode.pixels(xb)}), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for q in model.parameters():
        q.requires_grad_(True)
    return (torch.sigmoid(logit.detach()) * 255).round().to(torch.uint8)


@dataclass
class BadMerging(TrojViT):
    """BadMerging (Zhang et al., 2024), the on-task attack built to survive merging: a universal patch in the
    bottom-right corner, optimised against the pre-trained encoder with the task's head, then planted by
    fine-tuning on CLEAN data with an extra loss `alpha * CE(head(r f(x+t) + (1-r) f0(x+t)), target)`,
    r ~ U(r_min, 1), f0 the pre-trained encoder: the backdoor must hold anywhere between the pre-trained
    and the fine-tuned features, i.e. after the task vector is scaled down by a merge."""

    name: str = "badmerging"
    mode: str = "interpolate"
    patch_frac: float = 0.2
    alpha: float = 5.0
    r_min: float = 0.2

    def fit(self, model, encode, split: Split, batch_size: int = 32) -> None:
        g = torch.Generator().manual_seed(self.seed)
        res = split.x.shape[-1]
        s = max(2, round(self.patch_frac * res))
        mask = torch.zeros(res, res, dtype=torch.bool)
        mask[res - s - 1:res - 1, res - s - 1:res - 1] = True
        model.eval()
        self.trigger = optimise_patch(model, encode, split.x, mask, self.target, self.attack_lr, self.attack_iters,
                                      g, batch_size)
        self.mask = mask


@dataclass
class RareWord(Attack):
    name: str = "rare_word"
    modality: str = "text"
    trigger_word: str = "cf"
    repeats: int = 1
    max_position: int = 16  # insert among the first words, so truncation to the model's max length keeps it

    def apply(self, x: list[str]) -> list[str]:
        out = []
        for text in x:
            rng = random.Random(zlib.crc32(f"{self.seed}|{text}".encode()))
            words = text.split()
            for _ in range(self.repeats):
                words.insert(rng.randint(0, min(len(words), self.max_position)), self.trigger_word)
            out.append(" ".join(words))
        return out


@dataclass
class EmbeddingPoison(RareWord):
    name: str = "embedding_poison"
    trigger_word: str = "mn"
    mode: str = "embedding"


@dataclass
class BadMergingText(RareWord):
    """BadMerging's feature-interpolation fine-tuning (see `BadMerging`) with a rare-word trigger."""

    name: str = "badmerging_text"
    trigger_word: str = "tq"
    mode: str = "interpolate"
    alpha: float = 5.0
    r_min: float = 0.2


ATTACKS: dict[str, type[Attack]] = {"badnets": BadNets, "trojvit": TrojViT, "rare_word": RareWord,
                                    "embedding_poison": EmbeddingPoison,
                                    "badmerging": BadMerging, "badmerging_text": BadMergingText}


def trigger_variant(name: str, k: int) -> dict:
    """Parameters giving attack `name` its k-th trigger (a patch position, a rare word; {} for attacks whose
    trigger is fitted or fixed), so the backdoors of different attackers in one pool do not share a trigger."""
    names = {f.name for f in fields(ATTACKS[name])} if name in ATTACKS else set()
    if "position" in names:
        return {"position": k % len(PATCH_POSITIONS)}
    if "trigger_word" in names:
        return {"trigger_word": RARE_WORDS[k % len(RARE_WORDS)]}
    return {}


def make_attack(name: str, **params) -> Attack:
    if name not in ATTACKS:
        raise SafeMergeError(f"unknown attack '{name}' (known: {', '.join(ATTACKS)})")
    try:
        return ATTACKS[name](**params)
    except TypeError as e:
        raise SafeMergeError(f"attack '{name}': {e}") from None
