"""Phase 2: read cached hidden states, every epoch, fast.

Shards are opened lazily the first time a batch needs them, verified against their sha256 at that moment, and
kept open for the reader's lifetime, so later epochs neither re-hash nor re-open. A batch is read with one
positional read per run of consecutive rows per shard and converted to float32 straight into the output tensor.

Shards are read with ``os.preadv`` rather than memory-mapped (``safe_open``): with a mapping, every page of the
cache an epoch touches stays in the process's resident set (1.8 GB for 400 SmolLM2 samples), which makes phase 2
look as large as the cache and competes with training for memory on small devices. Positional reads go through
the page cache, which the kernel shrinks as it needs to, and the process holds only the batch.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pac.cache.format import (
    MANIFEST,
    CacheSpec,
    cache_dir_for,
    describe_mismatch,
    read_manifest,
    sha256_file,
)
from pac.cache.quant import dequantize
from pac.errors import CacheCorruptError, CacheError

log = logging.getLogger(__name__)

TAPS_KEY = "taps"
IGNORE_INDEX = -100


def _corrupt(path: Path, why: str) -> CacheCorruptError:
    return CacheCorruptError(
        f"cache shard {path} is corrupt ({why}); it must not be trained on. Run the cache build again "
        "(the same command): it verifies every shard and rebuilds the bad ones",
        shard=str(path),
    )


def _runs(rows: np.ndarray, batch_pos: np.ndarray):
    """Split (row, batch position) pairs, sorted by row, into runs of consecutive rows."""
    order = np.argsort(rows, kind="stable")
    rows, batch_pos = rows[order], batch_pos[order]
    breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
    for r, b in zip(np.split(rows, breaks), np.split(batch_pos, breaks), strict=True):
        yield int(r[0]), int(r[-1]) + 1, b


_HUGE_ALLOC_MIN = 4 << 20


def _alloc_f32(shape: tuple[int, ...]) -> torch.Tensor:
    """A zero-filled float32 tensor; large ones are backed by an anonymous mmap advised to use huge pages.

    A fresh 73 MB batch from ``torch.empty`` costs ~18k page faults on first touch (measured: 20 ms to fill,
    versus 4 ms for the same copy into huge-page memory), more than reading the batch itself. The mmap is
    released with the tensor's storage (``torch.frombuffer`` keeps it alive); such tensors pickle, go through
    DataLoader workers and ``torch.save`` like any other.
    """
    n = math.prod(shape)
    if n * 4 >= _HUGE_ALLOC_MIN and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf = mmap.mmap(-1, n * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            buf.madvise(mmap.MADV_HUGEPAGE)
            return torch.frombuffer(buf, dtype=torch.float32, count=n).view(shape)
        except (OSError, ValueError, AttributeError):
            pass
    return torch.zeros(shape, dtype=torch.float32)


_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class ShardFile:
    """The part of ``safe_open``'s interface the reader uses, over positional reads of the safetensors layout
    (8-byte header length, JSON header with dtype/shape/offsets, raw little-endian data). Public for the other
    files kept beside a cache (pac.cache.shortlist_store), so that they too are read without a mapping."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            header = json.loads(os.pread(self.fd, n, 8))
        except BaseException:
            self.close()
            raise
        header.pop("__metadata__", None)
        self.base, self.tensors = 8 + n, header

    def keys(self):
        return self.tensors.keys()

    def get_slice(self, name: str) -> _TensorSlice:
        return _TensorSlice(self, self.tensors[name])

    def complete(self) -> bool:
        """Whether the file ends where its last tensor does: a truncated or appended-to file does not."""
        ends = [info["data_offsets"][1] for info in self.tensors.values()]
        return self.base + max(ends, default=0) == os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()


class _TensorSlice:
    """``handle.get_slice(name)``: reads only the rows of the first index, then applies the rest."""

    def __init__(self, shard: ShardFile, info: dict):
        self.shard, self.info = shard, info
        self.dtype = _DTYPES[info["dtype"]]

    def get_shape(self) -> list[int]:
        return list(self.info["shape"])

    def __getitem__(self, key) -> torch.Tensor:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        shape = self.get_shape()
        r0, r1, _ = rows.indices(shape[0])
        row_bytes = math.prod(shape[1:]) * self.dtype.itemsize
        raw = torch.empty(max(0, r1 - r0) * row_bytes, dtype=torch.uint8)
        offset = self.shard.base + self.info["data_offsets"][0] + r0 * row_bytes
        if os.preadv(self.shard.fd, [raw.numpy()], offset) != raw.numel():
            raise OSError(f"short read at byte {offset}")
        data = raw.view(self.dtype).view(max(0, r1 - r0), *shape[1:])
        return data[(slice(None), *rest)] if rest else data


def _contiguous(a) -> bool:
    return len(a) > 0 and int(a[-1]) - int(a[0]) + 1 == len(a) and bool(np.all(np.diff(a) == 1))


class _Shard:
    __slots__ = ("path", "handle", "tap_names", "seq_len", "tap_index")

    def __init__(self, path: Path, handle: Any, tap_names: list[str], seq_len: int, tap_index: dict[int, int]) -> None:
        self.path, self.handle, self.tap_names = path, handle, tap_names
        self.seq_len, self.tap_index = seq_len, tap_index


class CacheReader:
    """Random access to a complete cache directory. ``spec`` given: it must equal the cache's spec."""

    def __init__(self, cache_dir: Path, spec: CacheSpec | None = None):
        self.cache_dir = Path(cache_dir)
        m = read_manifest(self.cache_dir)
        mspec: CacheSpec = m["_spec"]
        if spec is not None and spec != mspec:
            raise CacheError(
                f"the activation cache at {self.cache_dir} was built for another setup: "
                f"{describe_mismatch(mspec, spec)}. Its activations cannot be used for this run; build the "
                "cache for this run (pac stores it in its own directory, next to this one)"
            )
        self.spec = mspec
        self.sample_ids: list[str] = list(m["sample_ids"])
        self.label_kind: str | None = m["label_kind"]
        self._entries: list[dict] = m["shards"]
        self._index = {s: i for i, s in enumerate(self.sample_ids)}
        self._tap_pos = {t: j for j, t in enumerate(mspec.taps)}
        n, nt = len(self.sample_ids), len(mspec.taps)
        self._shard_of = np.full((n, nt), -1, dtype=np.int32)
        self._row_of = np.zeros((n, nt), dtype=np.int32)
        for si, s in enumerate(self._entries):
            try:
                rows = np.array([self._index[i] for i in s["sample_ids"]], dtype=np.int64)
                cols = np.array([self._tap_pos[t] for t in s["taps"]], dtype=np.int64)
            except KeyError as e:
                raise CacheError(
                    f"cache manifest {self.cache_dir / MANIFEST}: shard {s['file']} names unknown sample or "
                    f"tap {e}; delete {self.cache_dir} and run the build again"
                ) from None
            if (self._shard_of[np.ix_(rows, cols)] >= 0).any():
                raise CacheError(
                    f"cache manifest {self.cache_dir / MANIFEST}: shard {s['file']} overlaps another shard; "
                    f"delete {self.cache_dir} and run the build again"
                )
            self._shard_of[np.ix_(rows, cols)] = si
            self._row_of[np.ix_(rows, cols)] = np.arange(len(rows), dtype=np.int32)[:, None]
        missing = int((self._shard_of < 0).any(axis=1).sum())
        if not m["complete"] or missing:
            raise CacheError(
                f"the activation cache at {self.cache_dir} is incomplete ({missing} of {n} samples miss "
                "taps): resume the build by running the same command again (finished shards are kept and "
                "verified)"
            )
        self._shards: dict[int, _Shard] = {}
        self._hashed: set[int] = set()

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __repr__(self) -> str:
        return f"CacheReader({str(self.cache_dir)!r}, samples={len(self)}, taps={len(self.spec.taps)})"

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._shards.clear()

    def __getstate__(self) -> dict:
        # open safetensors handles do not pickle (DataLoader workers with the spawn start method): a copy
        # reopens shards lazily, without re-hashing the ones already verified here.
        state = self.__dict__.copy()
        state["_shards"] = {}
        return state

    # -- shards --------------------------------------------------------------------------------------------
    def _check_hash(self, si: int) -> str | None:
        s = self._entries[si]
        path = self.cache_dir / s["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return "file missing"
        if size != s["bytes"]:
            return f"{size} bytes, expected {s['bytes']} (truncated or overwritten)"
        digest = sha256_file(path)
        if digest != s["sha256"]:
            return f"sha256 mismatch: {digest[:12]}..., expected {s['sha256'][:12]}..."
        self._hashed.add(si)
        return None

    def _open(self, si: int) -> _Shard:
        sh = self._shards.get(si)
        if sh is not None:
            return sh
        s = self._entries[si]
        path = self.cache_dir / s["file"]
        if si not in self._hashed:
            why = self._check_hash(si)
            if why:
                raise _corrupt(path, why)
        try:
            handle = ShardFile(path)
            names = set(handle.keys())
        except Exception as e:  # safetensors raises its own error types
            raise _corrupt(path, f"unreadable: {e}") from None
        S, nb, T, d = len(s["sample_ids"]), len(s["taps"]), s["seq_len"], self.spec.hidden_size
        if self.spec.dtype == "int8":
            tap_names = sorted(n for n in names if n.startswith(f"{TAPS_KEY}."))
        else:
            tap_names = [TAPS_KEY]
        try:
            main = TAPS_KEY if self.spec.dtype != "int8" else f"{TAPS_KEY}.q"
            ok = (
                list(handle.get_slice(main).get_shape()) == [S, nb, T, d]
                and list(handle.get_slice("attention_mask").get_shape()) == [S, T]
                and list(handle.get_slice("labels").get_shape()) in ([S], [S, T])
                and all(handle.get_slice(n).get_shape()[:2] == [S, nb] for n in tap_names)
            )
        except Exception as e:
            raise _corrupt(path, f"missing tensor: {e}") from None
        if not ok:
            raise _corrupt(path, "tensor shapes do not match the manifest")
        sh = _Shard(path, handle, tap_names, T, {t: p for p, t in enumerate(s["taps"])})
        self._shards[si] = sh
        return sh

    def _read_taps(self, sh: _Shard, r0: int, r1: int, p0: int, p1: int, out: torch.Tensor | None = None):
        """Rows r0:r1, block taps p0:p1, as float32 written into ``out`` if given, else as stored (fp16/bf16)
        or dequantised (int8)."""
        if self.spec.dtype != "int8":
            data = sh.handle.get_slice(TAPS_KEY)[r0:r1, p0:p1]
            return data if out is None else out.copy_(data)
        parts = {n[len(TAPS_KEY) + 1 :]: sh.handle.get_slice(n)[r0:r1, p0:p1] for n in sh.tap_names}
        return dequantize(parts, out=out)

    # -- API -----------------------------------------------------------------------------------------------
    def load(self, sample_ids: list[str], taps: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
        """Batch of samples: ``{"taps": float32 [B, n_taps, T, d], "attention_mask": long [B, T],
        "labels": long [B] or [B, T]}``; ``taps`` (default: all of the spec's, in its order) picks and orders
        the tap axis. Shards of different lengths are right-padded (mask 0, labels -100, taps 0)."""
        tap_list = self.spec.taps if taps is None else tuple(int(t) for t in taps)
        try:
            cols = np.array([self._tap_pos[t] for t in tap_list], dtype=np.int64)
        except KeyError as e:
            raise CacheError(f"tap {e} is not in this cache (taps {self.spec.taps})") from None
        try:
            idx = np.array([self._index[s] for s in sample_ids], dtype=np.int64)
        except KeyError as e:
            raise CacheError(f"sample {e} is not in the activation cache at {self.cache_dir}") from None
        B, n, d = len(idx), len(cols), self.spec.hidden_size
        shard_of = self._shard_of[idx][:, cols]
        row_of = self._row_of[idx][:, cols]
        mask_shard = self._shard_of[idx, 0]  # mask and labels come from the shard of each sample's first tap
        mask_row = self._row_of[idx, 0]
        needed = np.unique(np.concatenate([shard_of.ravel(), mask_shard]))
        opened = {int(si): self._open(int(si)) for si in needed}
        lens = {sh.seq_len for sh in opened.values()}
        T = max(lens) if lens else self.spec.max_length
        out = _alloc_f32((B, n, T, d))

        for si in np.unique(shard_of):
            sh = opened[int(si)]
            b_sel, j_sel = np.nonzero(shard_of == si)
            bs = np.unique(b_sel)
            js = j_sel[b_sel == bs[0]]  # the same taps for every sample of this shard
            ps = np.array([sh.tap_index[tap_list[j]] for j in js])
            Ts = sh.seq_len
            rows = row_of[bs, js[0]]
            simple = _contiguous(js) and _contiguous(ps)
            p0, p1 = (int(ps[0]), int(ps[-1]) + 1) if simple else (int(ps.min()), int(ps.max()) + 1)
            for r0, r1, bb in _runs(rows, bs):
                if simple and _contiguous(bb):
                    self._read_taps(sh, r0, r1, p0, p1, out=out[int(bb[0]) : int(bb[-1]) + 1, js[0] : js[-1] + 1, :Ts])
                    continue
                data = self._read_taps(sh, r0, r1, p0, p1)
                if simple:
                    for k, b in enumerate(bb.tolist()):
                        out[b, js[0] : js[-1] + 1, :Ts].copy_(data[k])
                else:
                    for k, b in enumerate(bb.tolist()):
                        for j, p in zip(js.tolist(), ps.tolist(), strict=True):
                            out[b, j, :Ts].copy_(data[k, p - p0])

        mask = torch.zeros((B, T), dtype=torch.long)
        per_token = self.label_kind == "token"
        labels = torch.full((B, T) if per_token else (B,), IGNORE_INDEX if per_token else 0, dtype=torch.long)
        for si in np.unique(mask_shard):
            sh = opened[int(si)]
            bs = np.nonzero(mask_shard == si)[0]
            Ts = sh.seq_len
            m_sl, l_sl = sh.handle.get_slice("attention_mask"), sh.handle.get_slice("labels")
            for r0, r1, bb in _runs(mask_row[bs], bs):
                bt = torch.from_numpy(bb)
                mask[bt, :Ts] = m_sl[r0:r1].long()
                if per_token:
                    labels[bt, :Ts] = l_sl[r0:r1].long()
                else:
                    labels[bt] = l_sl[r0:r1].long()
        return {"taps": out, "attention_mask": mask, "labels": labels}

    def verify(self) -> list[str]:
        """Hash every shard; returns the paths of the bad ones (empty list: the cache is intact)."""
        bad = []
        for si, s in enumerate(self._entries):
            self._hashed.discard(si)
            why = self._check_hash(si)
            if why:
                log.warning("cache shard %s is bad: %s", self.cache_dir / s["file"], why)
                self._shards.pop(si, None)
                bad.append(str(self.cache_dir / s["file"]))
        return bad


def find_cache(root: Path, spec: CacheSpec) -> Path | None:
    """The directory of a complete cache for exactly ``spec`` under ``root``, else None."""
    d = cache_dir_for(Path(root), spec)
    if not (d / MANIFEST).exists():
        return None
    try:
        m = read_manifest(d)
    except CacheError as e:
        log.warning("ignoring unusable cache at %s: %s", d, e)
        return None
    if m["_spec"] != spec or not m["complete"]:
        return None
    return d


def cache_bytes_per_sample(cache_dir: Path) -> float:
    """Shard bytes on disk per sample (all taps, mask and labels included)."""
    m = read_manifest(Path(cache_dir))
    return sum(s["bytes"] for s in m["shards"]) / max(1, m["num_samples"])
