"""Phase 1: write backbone hidden states into the activation cache, resumably and crash-safely.

Typical use::

    w = CacheWriter(root, spec, sample_ids)
    for group in w.pending():                 # only what is still missing (bad shards are rebuilt)
        taps, mask, labels = run_backbone(group)
        w.write(group, taps, mask, labels)
    cache_dir = w.finalize()

Every shard is written to a fsynced temp file, renamed into place and only then recorded (with its sha256)
in ``manifest.json``, itself replaced atomically; rename and manifest update happen under a lock of the
cache directory. A kill at any moment therefore leaves a consistent cache: at worst a temp file or a shard
file the manifest does not list, both removed by the next :meth:`CacheWriter.pending`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save

from pac.cache.format import (
    MANIFEST,
    SHARD_SUFFIX,
    CacheSpec,
    cache_dir_for,
    commit_temp,
    describe_mismatch,
    dir_lock,
    new_manifest,
    read_manifest,
    sha256_file,
    temp_owner_pid,
    write_manifest,
    write_temp,
)
from pac.cache.quant import DEFAULT_OUTLIERS, DEFAULT_SCHEME, quantize
from pac.cache.reader import CacheReader
from pac.errors import CacheError

log = logging.getLogger(__name__)
ADOPTED_PREFIX = "adopted_"  # shard files another cache of this root wrote (CacheWriter.adopt)

FP16_MAX = 65504.0
TAPS_KEY = "taps"


def choose_dtype(max_abs: float, requested: str, headroom: float = 1.5) -> str:
    """Storage dtype to use given the largest |activation| seen (e.g. on a calibration batch).

    fp16 is switched to bf16 when ``max_abs * headroom`` exceeds the fp16 range (65504); ``headroom`` leaves
    room for batches not seen yet, since :meth:`CacheWriter.write` refuses values beyond fp16 outright.
    """
    if requested not in ("fp16", "bf16", "int8"):
        raise CacheError(f"unknown cache dtype {requested!r}: use fp16, bf16 or int8")
    if not math.isfinite(max_abs):
        raise CacheError(
            f"the backbone produced non-finite activations (max |x| = {max_abs}); no cache dtype can store "
            "them: check the model files and run the backbone in fp32"
        )
    if requested == "fp16" and max_abs * headroom > FP16_MAX:
        log.warning(
            "activations reach |x| = %.4g, too close to the fp16 limit %.0f: caching in bf16 instead",
            max_abs,
            FP16_MAX,
        )
        return "bf16"
    return requested


def coverage(manifest: dict, spec: CacheSpec, index: dict[str, int]) -> np.ndarray:
    """int8 array [num_samples, num_taps]: how many shards hold each (sample, tap)."""
    tap_pos = {t: j for j, t in enumerate(spec.taps)}
    cov = np.zeros((len(index), len(spec.taps)), dtype=np.int8)
    for s in manifest["shards"]:
        try:
            rows = np.array([index[i] for i in s["sample_ids"]], dtype=np.int64)
            cols = np.array([tap_pos[t] for t in s["taps"]], dtype=np.int64)
        except KeyError as e:
            raise CacheError(
                f"cache manifest in shard entry {s['file']} names an unknown sample or tap {e}; the cache is "
                "damaged: delete its directory and run the build again"
            ) from None
        cov[np.ix_(rows, cols)] += 1
    return cov


class CacheWriter:
    """Writes one cache (``root/<spec key>/``); see the module docstring."""

    def __init__(
        self,
        root: Path,
        spec: CacheSpec,
        sample_ids: list[str],
        shard_size: int = 32,
        sample_digests: list[str] | None = None,
    ):
        # Zero samples is a valid (complete, empty) cache: a peer's share of a small split can be empty.
        ids = [str(s) for s in sample_ids]
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dup = next(i for i in ids if i in seen or seen.add(i))
            raise CacheError(f"sample ids must be unique (found {dup!r} twice): fix the dataset ids")
        if int(shard_size) < 1:
            raise CacheError(f"shard_size must be >= 1, got {shard_size}")
        self.root = Path(root)
        self.spec = spec
        self.sample_ids = ids
        self.shard_size = int(shard_size)
        self.cache_dir = cache_dir_for(self.root, spec)
        self._index = {s: i for i, s in enumerate(ids)}
        self._tap_pos = {t: j for j, t in enumerate(spec.taps)}
        self._verified: dict[str, tuple[int, int, str]] = {}  # file -> (size, mtime_ns, sha256) hashed OK
        if sample_digests is not None and len(sample_digests) != len(ids):
            raise CacheError(f"{len(sample_digests)} sample digests for {len(ids)} samples: pass one per sample")
        self._digest = dict(zip(ids, sample_digests, strict=True)) if sample_digests is not None else {}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with dir_lock(self.cache_dir):
            if (self.cache_dir / MANIFEST).exists():
                m = read_manifest(self.cache_dir)
                self._check_same(m)
                if m["sample_digests"] is None and sample_digests is not None:  # a cache from before digests
                    m["sample_digests"] = list(sample_digests)  # the same spec: the same data, so the same samples
                    write_manifest(self.cache_dir, m)
            else:
                write_manifest(self.cache_dir, new_manifest(spec, ids, sample_digests))

    # -- helpers -------------------------------------------------------------------------------------------
    def _check_same(self, m: dict) -> None:
        if m["_spec"] != self.spec:  # only on a key-prefix collision or a hand-edited manifest
            raise CacheError(
                f"{self.cache_dir} holds a cache for another spec "
                f"({describe_mismatch(m['_spec'], self.spec)}); delete that directory or use another cache root"
            )
        if m["sample_ids"] != self.sample_ids:
            old, new = m["sample_ids"], self.sample_ids
            where = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
            raise CacheError(
                f"the cache at {self.cache_dir} was started for a different list of samples ({len(old)} ids, "
                f"this run has {len(new)}; first difference at position {where}) although the data "
                "fingerprint is the same: the data fingerprint must cover the sample ids and their order. "
                f"Delete {self.cache_dir} to rebuild, or pass the same samples in the same order"
            )

    def _load(self) -> dict:
        m = read_manifest(self.cache_dir)
        self._check_same(m)
        return m

    def _block(self, tap_block) -> tuple[int, ...]:
        taps = self.spec.taps
        if tap_block is None:
            return taps
        block = tuple(int(t) for t in tap_block)
        if block and block[0] in self._tap_pos:
            j = self._tap_pos[block[0]]
            if taps[j : j + len(block)] == block:
                return block
        raise CacheError(
            f"tap block {block} is not a contiguous run of the cache taps {taps}: each shard stores a "
            "contiguous block of taps"
        )

    def _shard_ok(self, s: dict) -> str | None:
        """None if the shard file matches its manifest entry, else why not."""
        path = self.cache_dir / s["file"]
        try:
            st = path.stat()
        except FileNotFoundError:
            return "file missing"
        if st.st_size != s["bytes"]:
            return f"size {st.st_size} bytes, manifest says {s['bytes']}"
        memo = self._verified.get(s["file"])
        if memo == (st.st_size, st.st_mtime_ns, s["sha256"]):
            return None
        digest = sha256_file(path)
        if digest != s["sha256"]:
            return f"sha256 {digest[:12]}..., manifest says {s['sha256'][:12]}..."
        self._verified[s["file"]] = (st.st_size, st.st_mtime_ns, s["sha256"])
        return None

    def _cleanup(self, m: dict) -> None:
        """Remove leftovers of killed writers: their temp files and shard files the manifest does not list.

        Runs under the directory lock; a live writer only renames a shard into place while holding that lock
        and records it in the same critical section, so an unlisted shard file is always a leftover.
        """
        listed = {s["file"] for s in m["shards"]}
        for p in self.cache_dir.iterdir():
            pid = temp_owner_pid(p.name)
            if pid is not None and pid != os.getpid() and not _pid_alive(pid):
                log.warning("removing %s left by an interrupted cache build", p)
                with contextlib.suppress(OSError):
                    p.unlink()
            elif p.name.endswith(SHARD_SUFFIX) and p.name not in listed:
                log.warning("removing cache shard %s: not in the manifest (interrupted write)", p)
                with contextlib.suppress(OSError):
                    p.unlink()

    # -- API -----------------------------------------------------------------------------------------------
    def pending(self, taps: tuple[int, ...] | None = None) -> list[list[str]]:
        """Groups of sample ids (shard-sized, in dataset order) still to compute for the tap block ``taps``.

        Shards already written for this block are verified (size and sha256, once per writer) first; a bad
        or missing shard is deleted, logged as a warning, and its samples come back as pending.
        """
        block = self._block(taps)
        with dir_lock(self.cache_dir):
            m = self._load()
            keep, bad = [], []
            for s in m["shards"]:
                why = self._shard_ok(s) if set(s["taps"]) & set(block) else None
                (bad if why else keep).append(s)
                if why:
                    log.warning(
                        "cache shard %s is bad (%s): deleting it, its %d samples will be recomputed",
                        self.cache_dir / s["file"],
                        why,
                        len(s["sample_ids"]),
                    )
                    self._verified.pop(s["file"], None)
                    with contextlib.suppress(OSError):
                        (self.cache_dir / s["file"]).unlink()
            if bad:
                m["shards"] = keep
                m["complete"] = False
                write_manifest(self.cache_dir, m)
            self._cleanup(m)
            cov = coverage(m, self.spec, self._index)
        cols = [self._tap_pos[t] for t in block]
        missing = (cov[:, cols] == 0).any(axis=1)
        todo = [sid for sid, miss in zip(self.sample_ids, missing.tolist(), strict=True) if miss]
        return [todo[i : i + self.shard_size] for i in range(0, len(todo), self.shard_size)]

    def adopt(self) -> int:
        """Take in the verified shards of other caches under this root that hold samples and taps of this one for
        the same model, tokenizer, length and dtype: caches of other subsets of the data, such as a re-planned
        run's owner built before its share changed (pac.plan.placement.Inheritance), or of other layers, such as
        a side-pipeline stage's before its range grew. Only samples whose digests agree with this cache's come in
        (a sample id names a row of a file, which may since have changed). A shard comes in whole, by hard link
        (a copy across file systems), if all its samples and taps are here and none of them is held yet; a shard
        of a complete cache that holds more samples or taps than wanted (a stage whose range shrank) has the
        wanted ones copied out. Returns the number of samples whose taps came in."""
        adopted = 0
        for other in sorted(p for p in self.root.iterdir() if p.is_dir() and p != self.cache_dir):
            try:
                theirs = read_manifest(other) if (other / MANIFEST).exists() else None
            except CacheError:
                continue  # a damaged cache is simply not adopted from
            # Other samples, or other layers of the same model and length (a side pipeline's stage that grew).
            if theirs is None or not set(theirs["_spec"].diff(self.spec)) <= {"data_fingerprint", "taps"}:
                continue
            same = self._same_samples(theirs)
            if not same:
                continue
            reader: list[CacheReader] = []  # opened for the first shard that must be cut
            for shard in theirs["shards"]:
                taken = self._adopt_shard(other, shard, theirs["label_kind"], same)
                if not taken and theirs["complete"]:
                    taken = self._adopt_part(other, shard, reader, same)
                adopted += taken
        if adopted:
            log.info("%s: %d samples' taps taken from earlier caches of other subsets", self.cache_dir, adopted)
        return adopted

    def _same_samples(self, theirs: dict) -> set[str]:
        """The sample ids of another cache whose tokens, mask and labels are this cache's (by digest): only these
        may be adopted; none without digests on either side (a cache from before them: nothing is trusted)."""
        digests = theirs["sample_digests"]
        if not self._digest or digests is None:
            return set()
        return {sid for sid, d in zip(theirs["sample_ids"], digests, strict=True) if self._digest.get(sid) == d}

    def _adopt_shard(self, other: Path, shard: dict, label_kind: str | None, same: set[str]) -> int:
        source = other / shard["file"]
        rows = [self._index.get(sid) if sid in same else None for sid in shard["sample_ids"]]
        if None in rows or any(t not in self._tap_pos for t in shard["taps"]):
            return 0
        with dir_lock(self.cache_dir):
            m = self._load()
            cols = [self._tap_pos[t] for t in shard["taps"]]
            covered = coverage(m, self.spec, self._index)[np.ix_(rows, cols)].any()
            if covered or m["label_kind"] not in (None, label_kind):
                return 0
            target = self.cache_dir / f"{ADOPTED_PREFIX}{shard['file']}"
            try:
                if source.stat().st_size != shard["bytes"] or sha256_file(source) != shard["sha256"]:
                    return 0  # a bad shard there: this cache computes those samples itself
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()  # a leftover of an adoption killed before its manifest entry
                try:
                    os.link(source, target)
                except OSError:
                    commit_temp(write_temp(target, source.read_bytes()), target)
            except OSError:
                return 0
            st = target.stat()
            self._verified[target.name] = (st.st_size, st.st_mtime_ns, shard["sha256"])  # hashed just now
            m["shards"].append({**shard, "file": target.name})
            m["label_kind"] = label_kind
            m["complete"] = bool((coverage(m, self.spec, self._index) > 0).all())
            write_manifest(self.cache_dir, m)
        return len(rows)

    def _adopt_part(self, other: Path, shard: dict, reader: list[CacheReader], same: set[str]) -> int:
        """The samples and taps of `shard` that this cache wants and holds none of, copied out of it (read and
        verified through its cache's reader, then written as an adopted shard of this cache): a shard that holds
        more samples or layers than this cache wants, such as a side-pipeline stage's before its range shrank."""
        ids = [sid for sid in shard["sample_ids"] if sid in same and sid in self._index]
        taps = [t for t in shard["taps"] if t in self._tap_pos]
        if not ids or not taps:
            return 0
        with dir_lock(self.cache_dir):
            cov = coverage(self._load(), self.spec, self._index)
        taken: set[str] = set()
        for block in self._contiguous_runs(taps):
            cols = [self._tap_pos[t] for t in block]
            free = [sid for sid in ids if not cov[self._index[sid], cols].any()]
            if not free:
                continue
            try:
                if not reader:
                    reader.append(CacheReader(other))
                batch = reader[0].load(free, taps=block)
            except CacheError:
                return len(taken)  # a damaged or changed cache there: this one computes those samples itself
            for i in range(0, len(free), self.shard_size):
                rows = slice(i, i + self.shard_size)
                parts = (batch["taps"][rows], batch["attention_mask"][rows], batch["labels"][rows])
                self._write_shard(free[rows], block, *parts, adopted=True)
            taken.update(free)
        return len(taken)

    def _contiguous_runs(self, taps: list[int]) -> list[tuple[int, ...]]:
        """`taps` (all of this cache's) as the runs that are contiguous in this cache's tap order."""
        positions = sorted(self._tap_pos[t] for t in taps)
        runs: list[list[int]] = []
        for j in positions:
            if runs and runs[-1][-1] == j - 1:
                runs[-1].append(j)
            else:
                runs.append([j])
        return [tuple(self.spec.taps[j] for j in run) for run in runs]

    def write(
        self,
        sample_ids: list[str],
        taps: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        tap_block: tuple[int, ...] | None = None,
    ) -> None:
        """Store the taps of ``sample_ids`` for ``tap_block`` (default: all taps of the spec).

        ``taps``: float [S, n_block_taps, T, d] with T <= spec.max_length; ``attention_mask``: [S, T] (0/1);
        ``labels``: int [S] (one label per sample) or [S, T] (per token). More than ``shard_size`` samples
        are split into several shards.
        """
        block = self._block(tap_block)
        ids = [str(s) for s in sample_ids]
        unknown = [s for s in ids if s not in self._index]
        if unknown:
            raise CacheError(f"sample ids {unknown[:3]} are not in this cache's sample list")
        if len(set(ids)) != len(ids):
            raise CacheError("write() got the same sample id twice")
        taps, mask, labels = self._check_tensors(ids, block, taps, attention_mask, labels)
        for rows, start, end in self._missing_parts(ids, block):
            part = torch.tensor(rows)
            for i in range(0, len(rows), self.shard_size):
                sl = part[i : i + self.shard_size]
                group = [ids[r] for r in sl.tolist()]
                self._write_shard(group, block[start:end], taps[sl, start:end], mask[sl], labels[sl])

    def _missing_parts(self, ids: list[str], block: tuple[int, ...]) -> list[tuple[list[int], int, int]]:
        """(rows of `ids`, taps block[start:end]) still to write: all of it, but where adopted shards (cut along
        another plan's stages) hold some of the block's taps already, only the runs of taps they lack. Taps this
        cache wrote itself are never written twice (CacheError)."""
        with dir_lock(self.cache_dir):
            m = self._load()
        rows = [self._index[i] for i in ids]
        cols = [self._tap_pos[t] for t in block]
        held = coverage(m, self.spec, self._index)[np.ix_(rows, cols)] > 0
        own = {**m, "shards": [s for s in m["shards"] if not s["file"].startswith(ADOPTED_PREFIX)]}
        if held.any() and coverage(own, self.spec, self._index)[np.ix_(rows, cols)].any():
            raise CacheError(
                f"some of these samples already have taps {block} in the cache at {self.cache_dir}: "
                "write only the groups returned by pending()"
            )
        by_pattern: dict[tuple[bool, ...], list[int]] = {}
        for row, pattern in enumerate(map(tuple, held.tolist())):
            by_pattern.setdefault(pattern, []).append(row)
        parts = []
        for pattern, members in by_pattern.items():
            start = None
            for j, have in enumerate((*pattern, True)):  # a sentinel closes the last run
                if not have and start is None:
                    start = j
                elif have and start is not None:
                    parts.append((members, start, j))
                    start = None
        return parts

    def _check_tensors(self, ids, block, taps, mask, labels):
        spec = self.spec
        taps = torch.as_tensor(taps)
        mask = torch.as_tensor(mask)
        labels = torch.as_tensor(labels)
        S = len(ids)
        if taps.dim() != 4 or tuple(taps.shape[:2]) != (S, len(block)) or taps.shape[3] != spec.hidden_size:
            raise CacheError(
                f"taps must be [S={S}, n_block_taps={len(block)}, T, d={spec.hidden_size}], got {tuple(taps.shape)}"
            )
        if not taps.is_floating_point():
            raise CacheError(f"taps must be a float tensor, got {taps.dtype}")
        T = taps.shape[2]
        if not 0 < T <= spec.max_length:
            raise CacheError(f"taps have {T} tokens, the cache spec allows 1..{spec.max_length}")
        if tuple(mask.shape) != (S, T):
            raise CacheError(f"attention_mask must be [S={S}, T={T}], got {tuple(mask.shape)}")
        if mask.numel() and (mask.min() < 0 or mask.max() > 1):
            raise CacheError("attention_mask must hold 0 and 1 only")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise CacheError(f"labels must be integers, got {labels.dtype}")
        if tuple(labels.shape) not in ((S,), (S, T)):
            raise CacheError(f"labels must be [S={S}] or [S={S}, T={T}], got {tuple(labels.shape)}")
        return taps.detach().cpu(), mask.detach().cpu().to(torch.uint8), labels.detach().cpu().to(torch.int64)

    def _encode_taps(self, taps: torch.Tensor, block: tuple[int, ...]) -> tuple[dict, dict]:
        dtype = self.spec.dtype
        per_tap_max = taps.detach().abs().amax(dim=(0, 2, 3)).float()
        if not bool(torch.isfinite(per_tap_max).all()):
            j = int((~torch.isfinite(per_tap_max)).nonzero()[0])
            raise CacheError(
                f"non-finite activations (inf/NaN) at tap {block[j]}: the backbone overflowed; run it in "
                "fp32 or bf16 and check the model files"
            )
        if dtype == "fp16":
            if float(per_tap_max.max()) > FP16_MAX:
                j = int(per_tap_max.argmax())
                raise CacheError(
                    f"activations reach |x| = {float(per_tap_max[j]):.4g} at tap {block[j]}, beyond the fp16 "
                    f"range ({FP16_MAX:.0f}): build the cache with --cache-dtype bf16 (or let pac choose: it "
                    "picks bf16 when it sees this range)"
                )
            return {TAPS_KEY: taps.to(torch.float16).contiguous()}, {}
        if dtype == "bf16":
            return {TAPS_KEY: taps.to(torch.bfloat16).contiguous()}, {}
        q = quantize(taps, DEFAULT_SCHEME, k=DEFAULT_OUTLIERS)
        return {f"{TAPS_KEY}.{k}": v.contiguous() for k, v in q.items()}, {"int8_scheme": DEFAULT_SCHEME}

    def _write_shard(self, ids, block, taps, mask, labels, adopted: bool = False) -> None:
        tensors, meta = self._encode_taps(taps, block)
        tensors["attention_mask"] = mask.contiguous()
        tensors["labels"] = labels.contiguous()
        meta = {
            "format": "pac-activation-cache-1",
            "sample_ids": json.dumps(ids),
            "taps": json.dumps(block),
            "dtype": self.spec.dtype,
            **meta,
        }
        data = st_save(tensors, metadata=meta)
        digest = hashlib.sha256(data).hexdigest()
        first = self._index[ids[0]]
        ids_hash = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:8]
        prefix = ADOPTED_PREFIX if adopted else ""
        fname = f"{prefix}taps{block[0]:03d}-{block[-1]:03d}_{first:07d}_{ids_hash}{SHARD_SUFFIX}"
        final = self.cache_dir / fname
        tmp = write_temp(final, data)  # the slow part, outside the lock
        kind = "sample" if labels.dim() == 1 else "token"
        try:
            with dir_lock(self.cache_dir):
                m = self._load()
                if m["label_kind"] not in (None, kind):
                    raise CacheError(
                        f"labels of shape {tuple(labels.shape)} are per {kind}, but this cache stores one "
                        f"label per {m['label_kind']}: pass labels of the same kind for every shard"
                    )
                cov = coverage(m, self.spec, self._index)
                rows = [self._index[i] for i in ids]
                cols = [self._tap_pos[t] for t in block]
                if cov[np.ix_(rows, cols)].any():
                    raise CacheError(
                        f"some of these samples already have taps {block} in the cache at {self.cache_dir}: "
                        "write only the groups returned by pending()"
                    )
                commit_temp(tmp, final)
                m["shards"].append(
                    {
                        "file": fname,
                        "sample_ids": ids,
                        "taps": list(block),
                        "seq_len": int(taps.shape[2]),
                        "sha256": digest,
                        "bytes": len(data),
                    }
                )
                m["label_kind"] = kind
                cov[np.ix_(rows, cols)] += 1
                m["complete"] = bool((cov > 0).all())
                write_manifest(self.cache_dir, m)
                st = final.stat()
                self._verified[fname] = (st.st_size, st.st_mtime_ns, digest)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()  # only still there if something failed before the rename

    def finalize(self) -> Path:
        """Mark the cache complete (every sample has every tap) and return its directory."""
        with dir_lock(self.cache_dir):
            m = self._load()
            cov = coverage(m, self.spec, self._index)
            missing = ~(cov > 0).all(axis=1)
            if missing.any():
                raise CacheError(
                    f"cannot finalize the cache at {self.cache_dir}: {int(missing.sum())} of {len(missing)} "
                    "samples still miss taps; write the groups returned by pending() (for every tap block) "
                    "first"
                )
            if not m["complete"]:
                m["complete"] = True
                write_manifest(self.cache_dir, m)
        return self.cache_dir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
