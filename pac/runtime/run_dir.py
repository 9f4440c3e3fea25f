"""Which run an output directory belongs to, so a checkpoint resumes only the run that wrote it.

A run is identified by what changes its result: the base model's weights, the data's content, the
method and every training option. `run.json` in `--out` records that identity (and a readable copy of
it); a later `pac train` into the same `--out` either continues that very run, or is refused with the
differences named, unless the user asks to overwrite it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pac.errors import PacError

RUN_FILE = "run.json"
# What pac writes into --out: a directory holding any of these is an earlier run's (pac may delete it on --overwrite).
RUN_MARKERS = ("run.json", "summary.json", "metrics.jsonl", "checkpoints", "adapter_model.safetensors")


def run_fingerprint(identity: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of a run's identity (model, data, method, options)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Readable differences between two identities: 'lr: 0.001 -> 0.003', 'data.train: other content'."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{name}.")
        elif a != b:
            digest = isinstance(a, str) and isinstance(b, str) and len(a) == len(b) == 64
            found.append(f"{name}: other content" if digest else f"{name}: {a!r} -> {b!r}")
    return found


@dataclass
class RunDirectory:
    """The state of --out for a run: fresh, or continuing the same run (maybe already finished)."""

    path: Path
    continuing: bool  # run.json names this very run: its checkpoints resume it
    finished: bool  # ... and it ran to the end (summary.json written)


def claim(path: Path, identity: dict[str, Any], overwrite: bool = False, require_resume: bool = False) -> RunDirectory:
    """Make `path` this run's directory, or refuse: another run's outputs are never resumed or mixed in."""
    path = Path(path)
    fingerprint = run_fingerprint(identity)
    record = _read_record(path)
    same = record is not None and record.get("fingerprint") == fingerprint
    if overwrite:
        _clear(path)
        same, record = False, None
    if require_resume and not same:
        raise PacError(
            f"--resume: {path} holds no checkpoint of this run to continue"
            + ("" if record is None else " (it holds another run's; drop --resume and pick a new --out)")
        )
    if not same and any((path / m).exists() for m in RUN_MARKERS):
        if record is None:
            what = f"{path} already holds outputs of an earlier pac run that cannot be matched to this one"
        else:
            changed = "; ".join(differences(record.get("identity", {}), identity)[:8])
            what = f"{path} holds another run (what differs: {changed})"
        raise PacError(
            f"{what}. To keep it, pass a new --out; to replace it, add --overwrite; to continue that run, "
            "run it again with the same model, data and options (add --resume to insist on continuing)."
        )
    path.mkdir(parents=True, exist_ok=True)
    if not same:
        (path / RUN_FILE).write_text(json.dumps({"fingerprint": fingerprint, "identity": identity}, indent=2) + "\n")
    return RunDirectory(path, continuing=same, finished=same and (path / "summary.json").exists())


def _read_record(path: Path) -> dict[str, Any] | None:
    file = path / RUN_FILE
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # unreadable: treated as another run's, so nothing is resumed from it


def _clear(path: Path) -> None:
    """--overwrite: remove an earlier run's directory, but never a directory pac did not write."""
    if not path.exists():
        return
    if not path.is_dir():
        raise PacError(f"--out {path} is a file; pass a directory")
    if any(path.iterdir()) and not any((path / m).exists() for m in RUN_MARKERS):
        raise PacError(f"--overwrite: {path} holds files pac did not write, so pac leaves it alone; pass a new --out")
    shutil.rmtree(path)
