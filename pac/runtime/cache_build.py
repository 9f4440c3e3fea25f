"""Phase 1 on one device: one inference-mode pass of the frozen backbone writes the activation cache.

Resumable: shards already written (and passing their checksum) are skipped; a corrupt shard is
deleted by the writer and its samples are computed again. The backbone is loaded only when
something is left to compute, and freed when the pass ends.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pac.cache import CacheReader, CacheSpec, CacheWriter, choose_dtype, find_cache
from pac.cache.fingerprint import model_fingerprint, tokenizer_fingerprint
from pac.data.tokenize import TokenizedSet
from pac.models.backbone import load_backbone, load_config
from pac.plan.costs import CACHE_MICRO_BATCH
from pac.runtime.device import inference, move
from pac.runtime.progress import RunClock, Stopwatch

log = logging.getLogger(__name__)


@dataclass
class CacheBuildResult:
    cache_dir: Path
    spec: CacheSpec
    computed_samples: int  # 0 when a complete cache was reused
    seconds: float
    reader: CacheReader | None = None  # a reader whose shards are already verified (reused caches)

    def open(self) -> CacheReader:
        return self.reader if self.reader is not None else CacheReader(self.cache_dir, self.spec)


def cache_spec(model_dir: Path, data: TokenizedSet, taps: list[int], dtype: str) -> CacheSpec:
    config = load_config(model_dir)
    return CacheSpec(
        model_fingerprint=model_fingerprint(model_dir),
        tokenizer_fingerprint=tokenizer_fingerprint(model_dir),
        data_fingerprint=data.fingerprint(),
        max_length=int(data.input_ids.shape[1]),
        taps=tuple(taps),
        hidden_size=config.hidden_size,
        dtype=dtype,
    )


def build_cache(
    model_dir: Path,
    data: TokenizedSet,
    cache_root: Path,
    taps: list[int],
    dtype: str = "fp16",
    batch_size: int = CACHE_MICRO_BATCH,
    shard_size: int = 32,
    desc: str = "cache build",
    clock: RunClock | None = None,
    device: torch.device | None = None,
) -> CacheBuildResult:
    """Make sure a complete, verified cache of `data` exists; compute only what is missing, with the backbone on
    `device` (default: the CPU). `clock` (the whole run's estimate) learns phase 1's rate and shows what is left
    of the run."""
    device = device or torch.device("cpu")
    clock = clock or RunClock()
    started = time.perf_counter()
    spec = cache_spec(model_dir, data, taps, dtype)
    if (found := find_cache(cache_root, spec)) is not None:
        # Verify through the reader that phase 2 will use: each shard is hashed once per process,
        # and the trainer reads only shards that passed. Bad ones fall through to the writer below,
        # which deletes and rebuilds them.
        reader = CacheReader(found, spec)
        if not reader.verify():
            clock.cache_reused(len(data))
            return CacheBuildResult(found, spec, 0, time.perf_counter() - started, reader)

    position = {sid: i for i, sid in enumerate(data.sample_ids)}
    backbone = None
    writer = CacheWriter(cache_root, spec, data.sample_ids, shard_size, data.sample_digests())
    writer.adopt()  # samples another subset's cache holds already
    pending = writer.pending()
    computed = 0
    total = sum(len(g) for g in pending)
    clock.cache_reused(len(data) - total)
    bar = tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True, disable=None if total else True)
    lap = Stopwatch()
    for group in pending:
        if backbone is None:
            backbone = move(load_backbone(model_dir), device)
            lap.lap()  # loading the model is not part of the per-sample rate
        rows = torch.tensor([position[s] for s in group])
        # One buffer per shard, filled micro-batch by micro-batch (no list of parts + concatenated copy).
        stacked = torch.empty(len(group), len(taps), data.input_ids.shape[1], backbone.hidden_size)
        with inference(device):
            for offset, chunk in zip(range(0, len(group), batch_size), rows.split(batch_size), strict=True):
                ids, mask = data.input_ids[chunk].to(device), data.attention_mask[chunk].to(device)
                out = backbone(ids, mask, taps=taps)
                part = stacked[offset : offset + len(chunk)]
                if device.type == "cpu":
                    torch.stack([out.taps[t] for t in taps], 1, out=part)
                else:  # the shard is written from the CPU
                    part.copy_(torch.stack([out.taps[t] for t in taps], 1).to("cpu"))
                clock.cache_progress(len(chunk), lap.lap())
                bar.set_postfix_str(clock.left(), refresh=False)
                bar.update(len(chunk))
        if computed == 0 and (safe := choose_dtype(float(stacked.abs().max()), spec.dtype)) != spec.dtype:
            # Before anything is written: switch (e.g. fp16 -> bf16) when values exceed the range.
            log.warning("activations reach %.0f, beyond %s: caching as %s", stacked.abs().max(), spec.dtype, safe)
            spec = cache_spec(model_dir, data, taps, safe)
            writer = CacheWriter(cache_root, spec, data.sample_ids, shard_size, data.sample_digests())
        writer.write(group, stacked, data.attention_mask[rows], data.labels[rows])
        computed += len(group)
    bar.close()
    cache_dir = writer.finalize()
    del backbone
    gc.collect()  # the backbone is not needed in phase 2
    return CacheBuildResult(cache_dir, spec, computed, time.perf_counter() - started)
