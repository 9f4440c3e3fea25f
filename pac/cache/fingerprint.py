"""Fingerprints of the inputs a cache depends on (model files, tokenizer, data, settings).

:func:`fingerprint_files` hashes file contents (sha256). Per-file digests are memoised in a small JSON
sidecar keyed by (absolute path, size, mtime_ns), so a 500 MB model is read once, not on every run. The
sidecar lives at ``$PAC_FINGERPRINT_CACHE`` or ``~/.cache/pac/fingerprints.json`` (or ``sidecar=``); it is
only a cache: if it is unreadable it is ignored and rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pac.cache.format import atomic_write_bytes, sha256_file
from pac.errors import CacheError

log = logging.getLogger(__name__)

MAX_ENTRIES = 2000


def default_sidecar() -> Path:
    env = os.environ.get("PAC_FINGERPRINT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pac" / "fingerprints.json"


def _load_sidecar(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable fingerprint memo %s (%s)", path, e)
        return {}


def _expand(paths: Iterable[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(name, file) pairs; a directory contributes its files recursively, named relative to it."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            out += [(f.relative_to(p).as_posix(), f) for f in files]
        elif p.is_file():
            out.append((p.name, p))
        else:
            raise CacheError(f"cannot fingerprint {p}: no such file or directory")
    return out


def file_digest(path: Path, memo: dict[str, Any]) -> tuple[str, bool]:
    """sha256 of one file, using/updating ``memo``; returns (digest, memo changed)."""
    ap = str(Path(path).resolve())
    st = os.stat(ap)
    hit = memo.get(ap)
    if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return str(hit["sha256"]), False
    digest = sha256_file(Path(ap))
    memo.pop(ap, None)  # re-insert last: the memo is trimmed oldest first
    memo[ap] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return digest, True


def fingerprint_files(paths: Iterable[str | os.PathLike], sidecar: Path | None = None) -> str:
    """sha256 over the contents of ``paths`` (files or directories), independent of where they live.

    Each file contributes its name (relative to a given directory, else its base name) and content digest;
    entries are sorted, so the order of ``paths`` does not matter.
    """
    files = _expand(paths)
    if not files:
        raise CacheError("cannot fingerprint an empty list of files")
    side = Path(sidecar) if sidecar is not None else default_sidecar()
    memo = _load_sidecar(side)
    changed = False
    entries = []
    for name, f in files:
        digest, ch = file_digest(f, memo)
        changed |= ch
        entries.append(f"{name}\0{digest}\n")
    if changed:
        while len(memo) > MAX_ENTRIES:
            memo.pop(next(iter(memo)))
        with contextlib.suppress(OSError):  # read-only home etc.: the memo is an optimisation only
            side.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(side, json.dumps(memo, indent=0).encode("utf-8"))
    h = hashlib.sha256()
    for e in sorted(entries):
        h.update(e.encode("utf-8"))
    return h.hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """The backbone's weights and config: what its activations, and so a cache, depend on."""
    return fingerprint_files(sorted(Path(model_dir).glob("*.safetensors")) + [Path(model_dir) / "config.json"])


def tokenizer_fingerprint(model_dir: Path) -> str:
    """The tokenizer's files: what a cache's token ids depend on."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.name.startswith(("tokenizer", "vocab", "merges")))
    return fingerprint_files(files)


def _json_default(o: Any) -> Any:
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"cannot fingerprint a {type(o).__name__}: pass JSON-like values")


def fingerprint_json(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no whitespace; tuples count as lists)."""
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default, allow_nan=False
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
