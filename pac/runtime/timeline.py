"""A collaborative run's timeline: what the coordinator saw of it, as it saw it, in `timeline.jsonl` beside the
adapter. One JSON object per line, each with `t` (wall-clock seconds, time.time(): a
resumed run appends to the same file and its gap shows) and `event`::

    state   {state, reason?}                   the run's state machine: joining, planning, cache build, ...
    peer    {peer, status}                     a peer's status changed: joined, profiling, cache, train, finished,
                                               failed, lost, ... (its phases: who was busy when)
    usage   {peer, rss, sent}                  a peer's resident memory and the bytes its data plane has sent,
                                               about once a second while it works
    step    {peer, step, total, loss}          rank 0's training steps (every rank's loss is the global
                                               batch's): the loss curve as it grows
    epoch   {peer, epoch, train_loss, val_*}   rank 0's epoch records

The live views (the terminal table, the browser dashboard) read the events in memory; `pac report` draws its
phase chart, memory and traffic plots from the file. A line cut short by a crash is skipped when read.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

TIMELINE = "timeline.jsonl"


class Timeline:
    """Events in memory, appended to `path` as they happen (a line each, flushed: the file is whole up to a
    crash)."""

    def __init__(self, path: Path | None = None):
        self.path: Path | None = None
        self.events: list[dict[str, Any]] = []
        self.by_event: dict[str, list[dict[str, Any]]] = {}  # the same events by kind: views ask twice a second
        if path is not None:
            self.attach(path)

    def add(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"t": round(time.time(), 3), "event": event, **fields}
        self.events.append(record)
        self.by_event.setdefault(event, []).append(record)
        if self.path is not None:  # its folder made by attach
            with self.path.open("a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        return record

    def attach(self, path: Path) -> None:
        """From now on append to `path` (the events so far go first)."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.writelines(json.dumps(record, default=str) + "\n" for record in self.events)

    def of(self, event: str) -> list[dict[str, Any]]:
        return list(self.by_event.get(event, []))


def read_timeline(path: Path) -> list[dict[str, Any]]:
    """The events of a timeline file, in order; lines that are not whole JSON objects (a crash mid-write) are
    skipped."""
    events = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "t" in record and "event" in record:
            events.append(record)
    return events
