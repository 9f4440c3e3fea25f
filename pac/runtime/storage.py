"""A full disk, told as what to do: where it filled up, how much the run needs there, and that nothing
finished is lost (cache shards and checkpoints are written beside, then renamed, and checksummed)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from pac.methods.registry import get_method
from pac.models.backbone import load_config
from pac.models.loading import cache_root
from pac.runconfig import TrainOptions
from pac.runtime.prepare import PreparedData


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, from Python's own I/O or from a library that words it (safetensors, torch.save)."""
    return getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc)


def disk_full_message(
    exc: BaseException, opts: TrainOptions, data: PreparedData, out: Path, again: str = "run the same command again"
) -> str:
    """Where the disk filled up, how much the run needs there (the cache in its root, checkpoints in `out`), and
    that nothing finished is lost: `again` says how to continue."""
    root = cache_root(opts.cache.dir)
    where = getattr(exc, "filename", None) or "the disk"
    config = load_config(data.model_dir)
    # Phase 1 stores every tapped layer's output for every token: 2 bytes a value (fp16/bf16), 1 (int8).
    per_value = 1 if opts.cache.dtype == "int8" else 2
    method = get_method(opts.method)
    taps = len(method.taps(opts.method_options, opts.data.task, config.num_hidden_layers)) if method.cached else 0
    samples = len(data.train) + len(data.val)
    cache_mb = samples * opts.data.max_length * config.hidden_size * taps * per_value / 1e6
    free = {path: shutil.disk_usage(path).free / 1e6 for path in (root, out) if path.exists()}
    room = ", ".join(f"{free_mb:,.0f} MB free on the disk of {path}" for path, free_mb in free.items())
    parts = [f"the disk is full: writing {where} failed ({room})."]
    if taps:
        parts.append(f"The activation cache needs about {cache_mb:,.0f} MB in {root}.")
    parts.append(
        f"The adapter and its checkpoints need a few MB in {out}. Free space, or pass --cache-dir / --out on a "
        f"larger disk, then {again}: finished cache shards and checkpoints are kept, so it continues where it "
        "stopped."
    )
    return " ".join(parts)
