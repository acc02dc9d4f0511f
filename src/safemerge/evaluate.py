"""Clean accuracy (ACC) and attack success rate (ASR), in percent.

ASR = share of triggered test inputs whose true label is not the target that are classified as the target.
It is reported for clean models too (their ASR is the trigger's natural effect)."""

from __future__ import annotations

import torch

from .data import Split, Trigger
from .model import InputEncoder, TaskModel, predict


def accuracy(model: TaskModel, encode: InputEncoder, split: Split, batch_size: int = 256) -> float:
    pred = predict(model, encode, split.x, batch_size)
    return 100.0 * float((pred == split.y).float().mean()) if len(split) else 0.0


def attack_success_rate(model: TaskModel, encode: InputEncoder, triggered: Split, target: int,
                        batch_size: int = 256) -> float:
    """`triggered` comes from `Trigger.asr_split` (non-target examples with the trigger)."""
    pred = predict(model, encode, triggered.x, batch_size)
    return 100.0 * float((pred == target).float().mean()) if len(triggered) else 0.0


def _target_share(pred: torch.Tensor, y: torch.Tensor, target: int) -> float:
    """Share (%) of the rows labelled other than `target` that `pred` sends to `target`."""
    other = y != target
    return 100.0 * float((pred[other] == target).float().mean()) if other.any() else 0.0


def target_rate(model: TaskModel, encode: InputEncoder, split: Split, target: int, batch_size: int = 256) -> float:
    """Share (%) of the rows whose label is not `target` that are classified as `target` without any trigger:
    the part of an ASR the trigger does not explain (a model that sends everything to one class has ASR 100)."""
    return _target_share(predict(model, encode, split.x, batch_size), split.y, target)


def attack_rates(model: TaskModel, encode: InputEncoder, test: Split, attack: Trigger | None,
                 triggered: Split | None = None, batch_size: int = 256) -> tuple[float, float, float]:
    """ACC on `test`, ASR of `attack` on its triggered copy and the untriggered target rate (`target_rate`),
    ACC and that rate from one pass over the clean inputs (0 for both rates with no attack)."""
    pred = predict(model, encode, test.x, batch_size)
    acc = 100.0 * float((pred == test.y).float().mean()) if len(test) else 0.0
    if attack is None:
        return acc, 0.0, 0.0
    triggered = triggered if triggered is not None else attack.asr_split(test)
    return (acc, attack_success_rate(model, encode, triggered, attack.target, batch_size),
            _target_share(pred, test.y, attack.target))


def acc_asr(model: TaskModel, encode: InputEncoder, test: Split, attack: Trigger | None,
            triggered: Split | None = None, batch_size: int = 256) -> tuple[float, float]:
    """ACC on `test`; ASR of `attack` (or 0 with no attack to measure) on its triggered copy."""
    acc, asr, _ = attack_rates(model, encode, test, attack, triggered, batch_size)
    return acc, asr
