"""Batch sources for the trainer: cached taps (parallel adapters) or token ids (LoRA, live eval)."""

from __future__ import annotations

import torch

from pac.cache import CacheReader
from pac.data.tokenize import TokenizedSet


class CachedTaps:
    """Phase-2 batches read from the activation cache: taps, attention mask and labels."""

    def __init__(self, reader: CacheReader, sample_ids: list[str] | None = None, taps: list[int] | None = None):
        self.reader = reader
        self.sample_ids = list(sample_ids if sample_ids is not None else reader.sample_ids)
        self.taps = tuple(taps) if taps is not None else None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.reader.load([self.sample_ids[i] for i in indices], self.taps)

    def with_taps(self, taps: list[int]) -> CachedTaps:
        """The same samples, reading only `taps` (in that order) from the cache."""
        return CachedTaps(self.reader, self.sample_ids, taps)


class Tokens:
    """Batches of token ids straight from a tokenised data set (no cache)."""

    def __init__(self, data: TokenizedSet):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.tensor(indices)
        return {
            "input_ids": self.data.input_ids[idx],
            "attention_mask": self.data.attention_mask[idx],
            "labels": self.data.labels[idx],
        }


class LiveTaps(Tokens):
    """Taps computed on the fly by a full backbone: evaluation of an adapter without a cache."""

    def __init__(self, data: TokenizedSet, backbone, taps: list[int]):
        super().__init__(data)
        self.backbone, self.taps = backbone, taps

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = super().batch(indices)
        with torch.inference_mode():
            out = self.backbone(batch["input_ids"], batch["attention_mask"], taps=self.taps)
        batch["taps"] = torch.stack([out.taps[t] for t in self.taps], 1)
        return batch
