"""pac-launch on a terminal: one table of the peers, redrawn in place (rich), with the run's log lines printed
above it as they come. Output that is not a terminal gets pac.runtime.run_view.PlainView's lines instead."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pac.runtime.run_view import RunView, duration, size, status_word

STATUS_STYLE = {"finished": "green", "failed": "red", "lost": "red", "refused": "red", "connecting": "dim"}
HEARD_LATE_S = 3.0  # a peer silent longer than this (three heartbeats) shows its last-heard age in red


class LiveTable(RunView):
    """Started by the coordinator's first line: what pac-launch prints before (discovery's prompt) stays plain."""

    def __init__(self, console: Console | None = None):
        self.live = Live(Text("pac-launch: starting"), console=console or Console(), refresh_per_second=4)

    def line(self, text: str) -> None:
        self.live.start()  # once; later calls do nothing
        self.live.console.print(Text(text))  # above the table, which is redrawn under it

    def update(self, snapshot: dict[str, Any]) -> None:
        self.live.start()
        self.live.update(render(snapshot), refresh=True)  # each state is drawn, however short it is

    def close(self) -> None:
        self.live.stop()


def render(snapshot: dict[str, Any]) -> Group:
    """The snapshot as a table: a title with the run's state, time and ETA, a row per peer, the last epoch."""
    title = f"pac-launch: {snapshot['state']}, {duration(snapshot['elapsed'])}"
    if snapshot["eta"] is not None:
        title += f", about {duration(snapshot['eta'])} left"
    table = Table(title=title, title_justify="left", expand=False)
    for column in ("peer", "rank", "status", "layers", "progress", "throughput", "memory", "sent", "heard"):
        table.add_column(column, justify="right" if column in ("rank", "throughput", "memory", "sent") else "left")
    for row in snapshot["peers"]:
        rate = f"{row['rate']:.1f} {row['unit']}/s" if row["rate"] else ""
        progress = f"{row['done']}/{row['total']} {row['unit']}" if row["total"] else ""
        heard = row["heard"]
        table.add_row(
            row["name"],
            str(row["rank"]) if row["rank"] >= 0 else "",
            Text(status_word(row), style=STATUS_STYLE.get(row["status"], "")),
            row["layers"],
            progress,
            rate,
            size(row["rss"]),
            size(row["sent"]),
            Text(duration(heard) + " ago", style="red" if heard > HEARD_LATE_S else "") if heard is not None else "",
        )
    parts: list[Any] = [table]
    epochs = snapshot["curves"]["epochs"]
    if epochs:
        last = epochs[-1]
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k.endswith("loss") or k.endswith("accuracy"))
        parts.append(Text(f"epoch {last['epoch']:.0f}: {metrics}"))
    return Group(*parts)
