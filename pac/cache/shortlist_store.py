"""The shortlist files kept beside an activation cache (what a shortlist is: pac.models.shortlist).

Shortlists are a function of the frozen backbone and the data, like the taps, so they live beside them:
`<cache dir>/shortlists-K/`, a safetensors file per SHARD_SAMPLES samples of the cache, built the first time a
run asks for that K and reused by every later run on the cache (other seeds, other options). Rows are read
with positional reads (ShardFile), so the process never holds them all: at K=1024 they take 0.9 MB per
128-token sample, a fifth of the taps'. A file that cannot be read back (truncated, foreign) is rebuilt, never
trained on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save

from pac.cache.format import atomic_write_bytes
from pac.cache.reader import ShardFile

log = logging.getLogger(__name__)

SHORTLIST_KEYS = ("shortlist_index", "shortlist_logits", "tail_lse", "tail_mean")
SHARD_SAMPLES = 32  # samples per shortlist file: a build holds one file's worth, an interrupted one resumes


class ShortlistStore:
    """The shortlists of `size` words for the samples `sample_ids` of the cache in `cache_dir`, in cache order."""

    def __init__(self, cache_dir: Path, sample_ids: list[str], size: int):
        self.directory = Path(cache_dir) / f"shortlists-{size}"
        self.directory.mkdir(exist_ok=True)
        self.row_of = {sample: row for row, sample in enumerate(sample_ids)}
        self.files: dict[int, ShardFile] = {}

    def missing(self) -> list[range]:
        """The rows of each file that is absent or cannot be read back, to be computed and `write`n."""
        n = len(self.row_of)
        files = [range(start, min(start + SHARD_SAMPLES, n)) for start in range(0, n, SHARD_SAMPLES)]
        return [rows for rows in files if not self._readable(self._path(rows.start), len(rows))]

    def write(self, rows: range, tensors: dict[str, torch.Tensor]) -> None:
        """Store the SHORTLIST_KEYS tensors of `rows` (one of `missing()`), each with a leading dimension per row."""
        atomic_write_bytes(self._path(rows.start), save(tensors))

    def rows(self, sample_ids: list[str]) -> dict[str, torch.Tensor]:
        """The SHORTLIST_KEYS tensors of these samples, stacked in their order."""
        parts: dict[str, list[torch.Tensor]] = {key: [] for key in SHORTLIST_KEYS}
        for row in (self.row_of[sample] for sample in sample_ids):
            start = row - row % SHARD_SAMPLES
            if start not in self.files:
                self.files[start] = ShardFile(self._path(start))
            offset = row - start
            for key in SHORTLIST_KEYS:
                parts[key].append(self.files[start].get_slice(key)[offset : offset + 1])
        return {key: torch.cat(value) for key, value in parts.items()}

    def nbytes(self) -> int:
        """Bytes of these shortlists on disk (the files of every sample of the cache)."""
        return sum(path.stat().st_size for path in self.directory.glob("*.safetensors"))

    def _path(self, start: int) -> Path:
        return self.directory / f"{start:07d}.safetensors"

    def _readable(self, path: Path, samples: int) -> bool:
        if not path.exists():
            return False
        try:
            file = ShardFile(path)
            try:
                whole = set(file.keys()) == set(SHORTLIST_KEYS) and file.complete()
                whole = whole and all(file.get_slice(key).get_shape()[0] == samples for key in SHORTLIST_KEYS)
            finally:
                file.close()
        except (OSError, ValueError, KeyError, TypeError):
            whole = False
        if not whole:
            log.warning("rebuilding %s: it cannot be read back (truncated or not a shortlist file)", path)
        return whole
