"""Examples a model is evaluated or adapted on: `Split` (raw inputs + labels), and the readers of a user's
own data files (JSONL, CSV, `datasets.save_to_disk` folders, image folders) and triggers.

Vision inputs are uint8 images [N, 3, R, R] already resized to the model's resolution; text inputs are raw
strings (tokenized at batch time, so text triggers act on words)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Split:
    x: torch.Tensor | list[str]
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: torch.Tensor | list[int]) -> "Split":
        idx = torch.as_tensor(idx, dtype=torch.long)
        x = self.x[idx] if isinstance(self.x, torch.Tensor) else [self.x[i] for i in idx.tolist()]
        return Split(x, self.y[idx])
