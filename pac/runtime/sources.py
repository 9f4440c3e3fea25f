"""Batch sources for the trainer: cached taps (parallel adapters), with or without shortlists, or token ids (LoRA,
live eval)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from pac.cache import CacheReader
from pac.cache.shortlist_store import ShortlistStore
from pac.data.images import ImageSet
from pac.data.tokenize import TokenizedSet
from pac.models.shortlist import shortlist_rows

log = logging.getLogger(__name__)


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


class Wrapped:
    """A batch source over another one (`source`): the same samples, their batches made otherwise."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    @property
    def sample_ids(self) -> list[str]:
        return self.source.sample_ids


class Shortlisted(Wrapped):
    """A cached training source whose batches also carry each next-token position's shortlist
    (pac.models.shortlist), from the files beside the cache (pac.cache.shortlist_store); the files a cache
    lacks are computed here, before the first epoch, from its last tap."""

    def __init__(self, source: CachedTaps, last_tap: int, final_norm: torch.nn.Module, head: torch.Tensor, size: int):
        super().__init__(source)
        reader = source.reader
        self.store = ShortlistStore(reader.cache_dir, reader.sample_ids, size)
        self.built = 0  # files this run computed (0: all were there)
        h_last = CachedTaps(reader, reader.sample_ids, [last_tap])
        with torch.inference_mode():
            for rows in tqdm(
                self.store.missing(),
                desc=f"shortlists ({size} words)",
                unit="file",
                leave=False,
                dynamic_ncols=True,
                disable=None,
            ):
                batch = h_last.batch(list(rows))
                base = final_norm(batch["taps"][:, -1, :-1])  # position t predicts token t+1
                targets = batch["labels"][:, 1:].clamp_min(0)  # padding gets a shortlist too, never used
                listed = shortlist_rows(base.flatten(0, 1), targets.flatten(), head, size)
                self.store.write(
                    rows, {key: value.unflatten(0, targets.shape).contiguous() for key, value in listed.items()}
                )
                self.built += 1

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {**self.source.batch(indices), **self.store.rows([self.sample_ids[i] for i in indices])}

    def nbytes(self) -> int:
        """Bytes of this source's shortlists on disk (the files of every sample of the cache)."""
        return self.store.nbytes()


def with_shortlists(source: CachedTaps, model: Any, size: int) -> CachedTaps | Shortlisted:
    """`source` with shortlists of `size` words for a language-model ParallelAdapterModel (its last tap, final
    norm and head), or as it is where they would save nothing: size 0, or a vocabulary no larger than the
    shortlist (a small model's; training then scores every word, exactly)."""
    if not size:
        return source
    head = model.top.lm_head.weight
    if size >= head.shape[0] - 1:
        log.info("a shortlist of %d words covers the %d-word vocabulary: training on all of it", size, head.shape[0])
        return source
    return Shortlisted(source, model.taps[-1], model.top.final_norm, head, size)


class Tokens:
    """Batches of token ids straight from a tokenised data set (no cache)."""

    def __init__(self, data: TokenizedSet):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    @property
    def sample_ids(self) -> list[str]:
        return self.data.sample_ids

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.tensor(indices)
        return {
            "input_ids": self.data.input_ids[idx],
            "attention_mask": self.data.attention_mask[idx],
            "labels": self.data.labels[idx],
        }


def batches_of(part: TokenizedSet | ImageSet) -> Tokens | ImageSet:
    """The trainer's batch source of a data part: token ids, or images (an ImageSet is a source itself)."""
    return Tokens(part) if isinstance(part, TokenizedSet) else part


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
