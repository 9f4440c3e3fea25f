"""Reading a sequence out for classification: pooling over real tokens and a linear head."""

from __future__ import annotations

import torch
from torch import nn

POOLINGS = ("mean", "last")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, d] -> [B, d] over real tokens only, so padding never changes the answer.

    "mean" averages real tokens; "last" takes the last real token (right padding)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if how == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    if how == "last":
        last = attention_mask.long().sum(1).clamp_min(1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    raise ValueError(f"pooling must be one of {POOLINGS}, not {how!r}")


class ClassificationHead(nn.Module):
    def __init__(self, hidden_size: int, num_labels: int, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        self.pooling = pooling
        self.proj = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(pool(hidden, attention_mask, self.pooling))
