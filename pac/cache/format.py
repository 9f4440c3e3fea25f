"""On-disk format of the activation cache: spec, cache key, manifest.

A cache lives in ``<root>/<key[:16]>/`` where ``key`` is the sha256 of the canonical JSON of its
:class:`CacheSpec`; any change of model, tokenizer, data, length, taps, width or dtype gives another
directory, so a cache is never reused for a different spec. The directory holds ``manifest.json`` and safetensors
shards. Manifest (version 1)::

    {"version": 1, "spec": {...all CacheSpec fields...}, "sample_ids": [...], "num_samples": N,
     "label_kind": null | "sample" | "token",
     "shards": [{"file", "sample_ids", "taps", "seq_len", "sha256", "bytes"}, ...],
     "complete": bool, "created": iso8601, "updated": iso8601}

A shard holds up to ``shard_size`` samples times a contiguous block of ``spec.taps``; a sample's taps can be
spread over several shards (one per tap block, e.g. one per pipeline stage). Shard tensors:

* fp16/bf16: ``taps`` [S, n_block_taps, T, d];
* int8: ``taps.q`` [S, n_block_taps, T, d] int8 plus the scheme's scale tensors ``taps.<name>``
  (see :mod:`pac.cache.quant`);
* ``attention_mask`` [S, T] uint8; ``labels`` [S] or [S, T] int64.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pac.errors import CacheError

try:  # POSIX advisory locks; on other platforms concurrent writers are simply not protected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FORMAT_VERSION = 1
DTYPES = ("fp16", "bf16", "int8")
MANIFEST = "manifest.json"
LOCK = ".lock"
SHARD_SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"
KEY_LEN = 16


@dataclass(frozen=True)
class CacheSpec:
    """Everything the cached activations depend on; equal specs <=> interchangeable caches."""

    model_fingerprint: str
    tokenizer_fingerprint: str
    data_fingerprint: str
    max_length: int
    taps: tuple[int, ...]  # 0 = embedding output h_0, i = output of backbone layer i
    hidden_size: int
    dtype: str = "fp16"  # "fp16", "bf16" or "int8"

    def __post_init__(self) -> None:
        object.__setattr__(self, "taps", tuple(int(t) for t in self.taps))
        if self.dtype not in DTYPES:
            raise CacheError(f"unknown cache dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if not self.taps:
            raise CacheError("a cache spec needs at least one tap")
        if list(self.taps) != sorted(set(self.taps)) or self.taps[0] < 0:
            raise CacheError(f"cache taps must be distinct, ascending and >= 0, got {self.taps}")
        if int(self.max_length) <= 0 or int(self.hidden_size) <= 0:
            raise CacheError(
                f"max_length and hidden_size must be positive, got {self.max_length} and {self.hidden_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["taps"] = list(self.taps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) != names:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise CacheError(f"cache spec has fields {got}, expected {sorted(names)}")
        return cls(**{**d, "taps": tuple(d["taps"])})

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def key(self) -> str:
        """sha256 hex of the canonical JSON; the cache directory is ``key()[:16]``."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def dir_name(self) -> str:
        return self.key()[:KEY_LEN]

    def diff(self, other: CacheSpec) -> list[str]:
        """Names of the fields that differ."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


_FIELD_HINT = {
    "model_fingerprint": "the backbone model files changed",
    "tokenizer_fingerprint": "the tokenizer changed",
    "data_fingerprint": "the training data changed",
    "max_length": "the maximum sequence length changed",
    "taps": "the tapped layers changed",
    "hidden_size": "the model width changed",
    "dtype": "the cache dtype changed",
}


def _short(v: Any) -> Any:
    return v[:12] + "..." if isinstance(v, str) and len(v) > 16 else v


def describe_mismatch(cached: CacheSpec, wanted: CacheSpec) -> str:
    """One line per differing field: ``name: cache has X, this run has Y (what that means)``."""
    parts = []
    for name in cached.diff(wanted):
        a, b = _short(getattr(cached, name)), _short(getattr(wanted, name))
        parts.append(f"{name}: cache has {a!r}, this run has {b!r} ({_FIELD_HINT.get(name, 'changed')})")
    return "; ".join(parts)


def cache_dir_for(root: Path, spec: CacheSpec) -> Path:
    return Path(root) / spec.dir_name()


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. some network file systems)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_temp(path: Path, data: bytes) -> Path:
    """Write ``data`` to a fsynced temp file next to ``path`` (named ``.<name>.<pid>.<rand>.tmp``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def commit_temp(tmp: Path, path: Path) -> None:
    """Atomically move a temp file from :func:`write_temp` into place and persist the rename."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file, never a torn one."""
    tmp = write_temp(path, data)
    try:
        commit_temp(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def temp_owner_pid(name: str) -> int | None:
    """pid embedded in a temp file name from :func:`write_temp`, None if ``name`` is not one."""
    parts = name.split(".")
    if not name.startswith(".") or not name.endswith(TMP_SUFFIX) or len(parts) < 5:
        return None
    try:
        return int(parts[-3])
    except ValueError:
        return None


def new_manifest(spec: CacheSpec, sample_ids: list[str], sample_digests: list[str] | None = None) -> dict[str, Any]:
    t = now_iso()
    return {
        "version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "sample_ids": list(sample_ids),
        # What each sample was (TokenizedSet.sample_digests): another cache adopts a sample only if it agrees.
        "sample_digests": None if sample_digests is None else list(sample_digests),
        "num_samples": len(sample_ids),
        "label_kind": None,
        "shards": [],
        "complete": False,
        "created": t,
        "updated": t,
    }


def _bad_manifest(path: Path, why: str) -> CacheError:
    return CacheError(
        f"cache manifest {path} is unreadable ({why}); the cache directory is damaged: "
        f"delete {path.parent} and run the build again"
    )


_SHARD_FIELDS = (("file", str), ("sample_ids", list), ("taps", list), ("seq_len", int), ("sha256", str), ("bytes", int))


def read_manifest(cache_dir: Path) -> dict[str, Any]:
    """Load and structurally check ``cache_dir/manifest.json``; CacheError if missing or damaged."""
    path = Path(cache_dir) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CacheError(
            f"no activation cache at {cache_dir} (missing {MANIFEST}); build it first "
            "(pac builds the cache automatically before training)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise _bad_manifest(path, str(e)) from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad_manifest(path, f"not valid JSON: {e}") from None
    if not isinstance(m, dict):
        raise _bad_manifest(path, "not a JSON object")
    if m.get("version") != FORMAT_VERSION:
        raise CacheError(
            f"cache manifest {path} has format version {m.get('version')!r}, this pac reads version "
            f"{FORMAT_VERSION}: delete {cache_dir} and run the build again"
        )
    try:
        spec = CacheSpec.from_dict(m["spec"])
        ids = m["sample_ids"]
        shards = m["shards"]
        if not isinstance(ids, list) or not all(isinstance(s, str) for s in ids):
            raise ValueError("sample_ids is not a list of strings")
        if m["num_samples"] != len(ids) or len(set(ids)) != len(ids):
            raise ValueError("sample_ids has duplicates or does not match num_samples")
        if not isinstance(shards, list):
            raise ValueError("shards is not a list")
        for s in shards:
            for k, typ in _SHARD_FIELDS:
                if not isinstance(s.get(k), typ):
                    raise ValueError(f"shard entry without a valid {k!r}")
            if Path(s["file"]).name != s["file"]:
                raise ValueError(f"shard file name {s['file']!r} is not a plain file name")
        digests = m.setdefault("sample_digests", None)
        if digests is not None and (not isinstance(digests, list) or len(digests) != len(ids)):
            raise ValueError("sample_digests is not one digest per sample")
        m.setdefault("label_kind", None)
        m["complete"] = bool(m.get("complete", False))
    except (KeyError, TypeError, ValueError, CacheError) as e:
        raise _bad_manifest(path, f"bad structure: {e}") from None
    m["_spec"] = spec
    return m


def write_manifest(cache_dir: Path, manifest: dict[str, Any]) -> None:
    manifest = {k: v for k, v in manifest.items() if not k.startswith("_")}
    manifest["updated"] = now_iso()
    atomic_write_bytes(Path(cache_dir) / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))


@contextlib.contextmanager
def dir_lock(cache_dir: Path) -> Iterator[None]:
    """Exclusive advisory lock of a cache directory: serialises manifest updates between writers."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(Path(cache_dir) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
