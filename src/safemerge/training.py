"""Fine-tuning loops: full fine-tuning of encoder + head (the zoo's default, as in the papers) and the
embedding-only training used by embedding poisoning."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .model import InputEncoder, TaskModel
from .data import Split


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-4  # encoder
    head_lr: float = 1e-3
    embedding_lr: float = 1e-2  # trigger-token embedding rows (embedding poisoning)
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of steps with linear warm-up, then cosine decay
    seed: int = 0


def _schedule(cfg: TrainConfig):
    warm = max(1, int(cfg.warmup * cfg.steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))
    return f


def _batches(split: Split, cfg: TrainConfig):
    """Endless shuffled mini-batches, deterministic under cfg.seed."""
    g = torch.Generator().manual_seed(cfg.seed)
    while True:
        perm = torch.randperm(len(split), generator=g)
        for i in range(0, len(perm) - cfg.batch_size + 1, cfg.batch_size):
            yield split.subset(perm[i:i + cfg.batch_size])


def finetune(model: TaskModel, encode: InputEncoder, split: Split, cfg: TrainConfig, desc: str = "fine-tune",
             extra_loss: Callable[[TaskModel, Split], torch.Tensor] | None = None) -> float:
    """Full fine-tuning with AdamW and a warm-up/cosine schedule; returns the mean loss of the last 10 steps.
    `extra_loss(model, batch)` is added to the cross-entropy of every batch (e.g. BadMerging's backdoor loss)."""
    torch.manual_seed(cfg.seed)
    model.train()
    params = [{"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": cfg.lr}]
    if cfg.head_lr > 0:  # head_lr = 0 keeps the head frozen (the task-arithmetic recipe)
        params.append({"params": list(model.head.parameters()), "lr": cfg.head_lr})
    opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    losses: list[float] = []
    it = _batches(split, cfg)
    for _ in tqdm(range(cfg.steps), desc=desc, leave=False, mininterval=2):
        b = next(it)
        loss = F.cross_entropy(model(encode(b.x)), b.y)
        if extra_loss is not None:
            loss = loss + extra_loss(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[-10:]) / max(1, len(losses[-10:]))


def feature_interpolation_loss(base_encoder: torch.nn.Module, encode: InputEncoder, trigger: Callable,
                               target: int, alpha: float = 5.0, r_min: float = 0.2,
                               seed: int = 0) -> Callable[[TaskModel, Split], torch.Tensor]:
    """BadMerging's backdoor loss: alpha * CE(head(r f(x+t) + (1-r) f0(x+t)), target), r ~ U(r_min, 1) per
    example, f the model's encoder and f0 the frozen pre-trained one, so that the backdoor holds for any
    share r of the task vector a merge keeps."""
    f0_enc = copy.deepcopy(base_encoder).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)

    def loss(model: TaskModel, batch: Split) -> torch.Tensor:
        inputs = encode(trigger(batch.x))
        head = model.head  # a LinearHead: interpolate its pooled features
        f = head.features(model.encoder(**inputs), inputs)  # type: ignore[union-attr]
        with torch.no_grad():
            f0 = head.features(f0_enc(**inputs), inputs)  # type: ignore[union-attr]
        r = torch.empty(len(f), 1).uniform_(r_min, 1.0, generator=g)
        return alpha * F.cross_entropy(head.classify(r * f + (1 - r) * f0), torch.full((len(f),), target))  # type: ignore[union-attr]
    return loss


@torch.no_grad()
def _features(model: TaskModel, encode: InputEncoder, x, batch_size: int = 256) -> torch.Tensor:
    from .model import batches

    model.eval()
    feats = []
    with torch.inference_mode():
        for b in batches(x, batch_size):
            inputs = encode(b)
            feats.append(model.head.features(model.encoder(**inputs), inputs))  # type: ignore[union-attr]
    return torch.cat(feats)


def fit_linear_probe(model: TaskModel, encode: InputEncoder, split: Split, epochs: int = 300, lr: float = 1e-2,
                     weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Fit `model.head` on the frozen encoder's features (full batch, Adam); returns the training accuracy.

    The zoo fine-tunes encoders under this fixed head, as task-arithmetic work does with CLIP's zero-shot
    heads: all task models of one task then share a head that stays compatible with merged encoders."""
    torch.manual_seed(seed)
    feats = _features(model, encode, split.x).clone()
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mu) / sd
    lin = torch.nn.Linear(z.shape[1], model.head.num_labels)
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        loss = F.cross_entropy(lin(z), split.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # fold the standardisation into the head: W (f - mu) / sd + b
        w = lin.weight / sd
        model.head.weight.copy_(w)
        model.head.bias.copy_(lin.bias - w @ mu)
        return float((lin(z).argmax(-1) == split.y).float().mean())


def fit_prototype_head(model: TaskModel, encode: InputEncoder, split: Split, logit_scale: float = 100.0) -> float:
    """Set `model.head` to a CLIP-like head that stays one linear layer: weight = logit_scale * p_c / C, bias 0,
    p_c the L2-normalised mean of the class's L2-normalised features under the frozen encoder, C the mean
    feature norm on `split` (one fixed constant instead of each example's own norm, which no transformers
    classifier could compute). Returns the training accuracy.

    Unlike a probe on standardised features, nothing divides by a per-feature sd, so a drift of merged features
    is not amplified, and the pre-trained encoder alone stays a weak classifier (task vectors carry the task)."""
    feats = _features(model, encode, split.x).clone().float()
    norm = feats.norm(dim=1).mean().clamp_min(1e-6)
    unit = F.normalize(feats, dim=1)
    k = model.head.num_labels
    protos = torch.zeros(k, feats.shape[1])
    for c in range(k):
        rows = unit[split.y == c]
        if len(rows):
            protos[c] = F.normalize(rows.mean(0), dim=0)
    with torch.no_grad():
        model.head.weight.copy_(logit_scale * protos / norm)
        model.head.bias.zero_()
        return float((model.head.classify(feats).argmax(-1) == split.y).float().mean())  # type: ignore[operator]


def train_token_embeddings(model: TaskModel, encode: InputEncoder, split: Split, token_ids: list[int],
                           cfg: TrainConfig, desc: str = "embedding poison") -> float:
    """Train only the input-embedding rows of `token_ids`; every other weight stays bit-identical."""
    torch.manual_seed(cfg.seed)
    emb = model.encoder.get_input_embeddings().weight
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    emb.requires_grad_(True)
    rows = torch.zeros(emb.shape[0], 1)
    rows[token_ids] = 1.0
    opt = torch.optim.Adam([emb], lr=cfg.embedding_lr)
    model.train()
    losses: list[float] = []
    it = _batches(split, cfg)
    for _ in tqdm(range(cfg.steps), desc=desc, leave=False, mininterval=2):
        b = next(it)
        loss = F.cross_entropy(model(encode(b.x)), b.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        emb.grad.mul_(rows)
        opt.step()
        losses.append(loss.item())
    model.eval()
    for n, p in model.named_parameters():
        p.requires_grad_(saved[n])
    return sum(losses[-10:]) / max(1, len(losses[-10:]))
