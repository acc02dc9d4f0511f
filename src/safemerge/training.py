"""Fine-tuning loops: full fine-tuning of encoder + head (the zoo's default, as in the papers) and the
embedding-only training used by embedding poisoning."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .model import InputEncoder, TaskModel
from .tasks import Split


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


def finetune(model: TaskModel, encode: InputEncoder, split: Split, cfg: TrainConfig, desc: str = "fine-tune") -> float:
    """Full fine-tuning with AdamW and a warm-up/cosine schedule; returns the mean loss of the last 10 steps."""
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[-10:]) / max(1, len(losses[-10:]))


@torch.no_grad()
def _features(model: TaskModel, encode: InputEncoder, x, batch_size: int = 256) -> torch.Tensor:
    from .model import batches, pooled_features

    model.eval()
    with torch.inference_mode():
        return torch.cat([pooled_features(model.encoder, encode(b), model.modality) for b in batches(x, batch_size)])


def fit_linear_probe(model: TaskModel, encode: InputEncoder, split: Split, epochs: int = 300, lr: float = 1e-2,
                     weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Fit `model.head` on the frozen encoder's features (full batch, Adam); returns the training accuracy.

    The zoo fine-tunes encoders under this fixed head, as task-arithmetic work does with CLIP's zero-shot
    heads: all task models of one task then share a head that stays compatible with merged encoders."""
    torch.manual_seed(seed)
    feats = _features(model, encode, split.x).clone()
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mu) / sd
    lin = torch.nn.Linear(z.shape[1], model.head.out_features)
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
