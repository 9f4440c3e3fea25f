"""`launch.json` in a collaborative run's --out: enough to continue the run after anything stopped it.

`pac-launch` writes it before the first peer is asked and the coordinator rewrites it at every change of state
(joining, planning, cache build, training, export, done or failed), with the plan and the peers it chose. The
file is versioned and replaced atomically (written beside, then renamed), so a crash at any moment leaves the
previous version whole. `pac-launch --resume RUN_DIR` reads it back: the same command line (the join token is
never on it), and what the user should be told about how the run ended. Finished work is found where it lies:
each peer's cache shards by their fingerprints and its checkpoints by the run's identity
(pac.runtime.collaborative.run_directory).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pac.errors import PacError

LAUNCH_FILE = "launch.json"
VERSION = 1


class LaunchRecord:
    """The record of one launch; `update` merges fields and rewrites the file atomically."""

    def __init__(self, run_dir: Path, argv: list[str], earlier: dict[str, Any] | None = None):
        """`earlier`: the record of the attempt this one resumes (its start and resumptions are kept)."""
        self.path = Path(run_dir) / LAUNCH_FILE
        now = time.time()
        self.fields: dict[str, Any] = {"version": VERSION, "argv": list(argv), "started_at": now, "resumed_at": []}
        if earlier is not None:
            self.fields.update(started_at=earlier["started_at"], resumed_at=[*earlier.get("resumed_at", []), now])
        self.update(state="starting")

    def update(self, **fields: Any) -> None:
        self.fields.update(fields, updated_at=time.time())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{LAUNCH_FILE}.{os.getpid()}")
        partial.write_text(json.dumps(self.fields, indent=2, default=str) + "\n")
        os.replace(partial, self.path)


def read_launch_record(run_dir: Path) -> dict[str, Any]:
    """The record in `run_dir`, checked; a clear error where there is none or it cannot be read."""
    path = Path(run_dir) / LAUNCH_FILE
    if not path.exists():
        raise PacError(
            f"--resume {run_dir}: there is no {LAUNCH_FILE} there, so it is not the --out of a pac-launch run "
            "(give the directory the run wrote its adapter and logs to)"
        )
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PacError(f"--resume {run_dir}: {path} cannot be read ({exc}); start the run again instead") from None
    if not isinstance(record, dict) or record.get("version") != VERSION or not isinstance(record.get("argv"), list):
        raise PacError(
            f"--resume {run_dir}: {path} is not a launch record this pac understands (version "
            f"{record.get('version') if isinstance(record, dict) else '?'}, this pac reads {VERSION})"
        )
    return record


def how_it_ended(record: dict[str, Any]) -> str:
    """One line for the user: where the recorded run stopped, and why as far as the record knows."""
    state, when = record.get("state", "?"), time.strftime("%Y-%m-%d %H:%M", time.localtime(record["started_at"]))
    if state == "done":
        return f"the run started {when} finished"
    if state == "failed":
        return f"the run started {when} failed: {record.get('reason', 'no reason recorded')}"
    return (
        f"the run started {when} stopped during '{state}' without a word from its coordinator (killed, crashed or "
        "its machine went down)"
    )
