"""What a person sees of a collaborative run while it goes: the coordinator hands its views log lines as they
happen and a snapshot of the run (`Coordinator.snapshot`: state, ETA, one row per peer, the loss curves, the plan)
about twice a second. A view draws them: `PlainView` writes lines (output that is not a terminal: CI, files);
pac-launch adds a live table on a terminal and a page in the browser (launcher.live, launcher.dashboard).

A snapshot is plain JSON data, so the browser page reads the very dict the terminal table draws::

    {"state", "reason", "elapsed", "eta", "mode", "plan": [lines], "peers": [row, ...],
     "curves": {"steps": [[step, loss], ...], "total_steps", "epochs_planned", "epochs": [record, ...]}}

    row: {"name", "rank", "status", "layers", "done", "total", "unit", "rate", "rss", "sent", "heard"}
"""

from __future__ import annotations

import time
from typing import Any, TextIO

from pac.runtime.progress import format_seconds

PROGRESS_EVERY_S = 5.0  # a plain view's progress line: often enough to see it move, rarely enough to read a log


class RunView:
    """A view that shows nothing: the interface the coordinator talks to."""

    def line(self, text: str) -> None:
        """A log line (a state change, a peer that joined, the plan)."""

    def update(self, snapshot: dict[str, Any]) -> None:
        """The run as it is now."""

    def close(self) -> None:
        """The run is over: release what the view holds (a terminal, a port)."""


class PlainView(RunView):
    """Lines, never redrawn: each log line as it comes, and every PROGRESS_EVERY_S while peers work one line with
    each peer's progress."""

    def __init__(self, out: TextIO, every: float = PROGRESS_EVERY_S):
        self.out, self.every, self.shown = out, every, 0.0

    def line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def update(self, snapshot: dict[str, Any]) -> None:
        now = time.monotonic()
        working = [p for p in snapshot["peers"] if p["rank"] >= 0 or p["status"] == "arrived"]
        if now - self.shown < self.every or snapshot["state"] not in ("cache build", "training") or not working:
            return
        self.shown = now
        self.line("  " + " | ".join(f"{p['name']}: {describe_work(p)}" for p in working))


class Views(RunView):
    """Several views at once (a terminal and a browser)."""

    def __init__(self, views: list[RunView]):
        self.views = views

    def line(self, text: str) -> None:
        for view in self.views:
            view.line(text)

    def update(self, snapshot: dict[str, Any]) -> None:
        for view in self.views:
            view.update(snapshot)

    def close(self) -> None:
        for view in self.views:
            view.close()


def describe_work(row: dict[str, Any]) -> str:
    """A peer's work in words: "cache 12/40 samples (3.1/s)", "training, step 3/10 (0.5/s)", "finished"."""
    status, done, total, rate = row["status"], row["done"], row["total"], row["rate"]
    if status == "cache":
        return f"cache {done}/{total} samples ({rate:.1f}/s)"
    if status == "train" and not total:
        return "preparing to train"
    if status == "train":
        return f"training, step {done}/{total} ({rate:.1f}/s)"
    if status == "arrived":
        return "arrived, planned in at the next checkpoint"
    return status


def status_word(row: dict[str, Any]) -> str:
    """A peer's status in a word or two, for a table cell: cache build, preparing, training, finished, ..."""
    if row["status"] == "train" and not row["total"]:
        return "preparing"
    return {"cache": "cache build", "train": "training"}.get(row["status"], row["status"])


def size(num_bytes: float | None) -> str:
    """Bytes for people: 512 B, 3.2 MB, 1.4 GB ('—' where unknown)."""
    if num_bytes is None:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes:.0f} B"


def duration(seconds: float | None) -> str:
    """Seconds for people: 42 s, 3 min 05 s, 1 h 02 min ('—' where unknown)."""
    return "—" if seconds is None else format_seconds(seconds)
