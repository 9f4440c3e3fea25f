"""`pac report RUN_DIR`: a finished (or failed, or still running) run's files drawn as pictures and a page.

A run directory (`pac train --out`, `pac-launch --out`) holds summary.json, metrics.jsonl (per-step records
{step, epoch, loss, ...} and per-epoch records {epoch, train_loss, val_loss, val_*...}) and, for a
collaborative run, timeline.jsonl (pac.runtime.timeline). The report writes beside them, in RUN_DIR/report/:

    curves.png     training and validation loss per epoch (accuracy where the task has it), per-step loss faintly
    timeline.png   who was busy when: one row per peer coloured by phase, the run's states as a band on top
    memory.png     resident memory per peer over time (bars of each peer's peak where there is no timeline)
    traffic.png    bytes each peer sent: over time, and by phase
    report.md      method, task, data, peers, time per state, final metrics, the pictures; what is absent and why

The pure functions (`load_run`, `epoch_curves`, `phase_intervals`, ...) turn files into plot data; the drawing
functions turn that into PNGs. The benchmarks draw with the same helpers (`pyplot`, `save`, `lines`, `bars`), so
their charts and a run's look alike. matplotlib is imported on first draw, on the Agg backend (files, no
display): `pac --help` never loads it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pac.errors import PacError
from pac.runtime.run_view import duration, size, status_word
from pac.runtime.timeline import TIMELINE, read_timeline

SUMMARY, METRICS = "summary.json", "metrics.jsonl"
RUN_ENDS = ("done", "failed")  # the coordinator's final states (RunState): a peer's phase ends with its run
NOT_BUSY = ("finished",)  # a peer's status that ends its bar: done with this run, waiting for nothing
# One colour per phase, the same for a peer's status and the run's state of that name.
COLOURS = {
    "connecting": "#d9d9d9",
    "joining": "#d9d9d9",
    "joined": "#bdbdbd",
    "planning": "#bdbdbd",
    "arrived": "#bdbdbd",
    "profiling": "#9467bd",
    "cache": "#1f77b4",
    "cache build": "#1f77b4",
    "train": "#2ca02c",
    "training": "#2ca02c",
    "export": "#ff7f0e",
    "done": "#8c564b",
    "failed": "#d62728",
    "lost": "#d62728",
    "refused": "#7f7f7f",
    "left out": "#7f7f7f",
}
BYTES_BY_PHASE = {  # a peer summary's counter -> what it counts
    "phase1_bytes_sent": "phase 1 (data plane)",
    "phase2_bytes_sent": "phase 2 (data plane)",
    "phase2_allreduce_bytes": "phase 2 all-reduce",
}


@dataclass
class Run:
    """What a run directory holds, read and checked."""

    path: Path
    summary: dict[str, Any]
    steps: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def collaborative(self) -> bool:
        return bool(self.events) or "peers" in self.summary


@dataclass(frozen=True)
class Interval:
    """A stretch of a run, in seconds from its first event."""

    start: float
    end: float
    phase: str


# ---- reading ----


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """metrics.jsonl's per-step and per-epoch records. A resumed run logs an epoch again: the last record wins."""
    steps, epochs = [], {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PacError(
                f"{path}, line {number}, is not a whole JSON record ({exc.msg}): the run was probably cut off while "
                "writing it; delete that line (the rest of the run is intact) and run `pac report` again"
            ) from None
        if not isinstance(record, dict) or "epoch" not in record:
            raise PacError(f"{path}, line {number}: a metrics record names its epoch; this is {line[:80]!r}")
        if "step" in record:
            steps.append(record)
        else:
            epochs[record["epoch"]] = record
    return steps, [epochs[e] for e in sorted(epochs)]


def load_run(run_dir: Path | str) -> Run:
    """The run in `run_dir`: its summary, metrics and timeline, each optional, but not all absent or empty."""
    path = Path(run_dir)
    if not path.is_dir():
        raise PacError(f"{path} is not a directory: pass the --out of a `pac train` or `pac-launch` run")
    names = (SUMMARY, METRICS, TIMELINE)
    if not any((path / name).exists() for name in names):
        raise PacError(
            f"{path} is not a run directory: it holds none of {', '.join(names)}; pass the directory given as "
            "--out to `pac train` or `pac-launch`"
        )
    summary: dict[str, Any] = {}
    if (path / SUMMARY).exists():
        try:
            summary = json.loads((path / SUMMARY).read_text())
        except json.JSONDecodeError as exc:
            raise PacError(f"{path / SUMMARY} is not valid JSON ({exc}): the run did not finish writing it") from None
    steps, epochs = read_metrics(path / METRICS) if (path / METRICS).exists() else ([], [])
    epochs = epochs or summary.get("epochs", [])
    events = read_timeline(path / TIMELINE) if (path / TIMELINE).exists() else []
    if not (steps or epochs or events):
        raise PacError(
            f"nothing to report in {path}: no training step, no finished epoch, no timeline event; the run stopped "
            "before it trained (its log says why: peers/*/peer.log for pac-launch), or it has not started yet"
        )
    return Run(path, summary, steps, epochs, events)


# ---- plot data ----


def epoch_curves(epochs: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Per-epoch series by metric (train_loss, val_loss, val_accuracy, ...): epochs and values, where recorded."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for record in epochs:
        for key, value in record.items():
            if (key == "train_loss" or key.startswith("val_")) and isinstance(value, int | float):
                xs, ys = curves.setdefault(key, ([], []))
                xs.append(record["epoch"])
                ys.append(value)
    return curves


def step_positions(steps: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """Each step's loss at its place on the epoch axis: epoch e's steps spread evenly over (e-1, e], so they sit
    under the epoch's mean, drawn at e."""
    per_epoch: dict[int, list[float]] = {}
    for record in steps:
        if isinstance(record.get("loss"), int | float):
            per_epoch.setdefault(int(record["epoch"]), []).append(record["loss"])
    xs, ys = [], []
    for epoch, losses in sorted(per_epoch.items()):
        xs += [epoch - 1 + (i + 1) / len(losses) for i in range(len(losses))]
        ys += losses
    return xs, ys


def _intervals(changes: Sequence[tuple[float, str]], ends: Sequence[float], last: float) -> list[Interval]:
    """Each change lasts until the next, or the first run end after it (a resumed run starts afresh), or `last`."""
    out = []
    for i, (start, phase) in enumerate(changes):
        stop = min([t for t in ends if t > start] + ([changes[i + 1][0]] if i + 1 < len(changes) else []) + [last])
        out.append(Interval(start, max(stop, start), phase))
    return out


def _start(events: Sequence[Mapping[str, Any]]) -> float:
    return events[0]["t"] if events else 0.0


def state_intervals(events: Sequence[Mapping[str, Any]]) -> list[Interval]:
    """The run's states over time (seconds from the first event); the final ones (done, failed) are instants."""
    t0, last = _start(events), (events[-1]["t"] if events else 0.0)
    changes = [(e["t"] - t0, e["state"]) for e in events if e["event"] == "state"]
    return [i for i in _intervals(changes, [], last - t0) if i.phase not in RUN_ENDS]


def phase_intervals(events: Sequence[Mapping[str, Any]]) -> dict[str, list[Interval]]:
    """Each peer's phases from its status changes: a phase lasts until the peer's next status or its run's end;
    `finished` is left out (not busy)."""
    t0, last = _start(events), (events[-1]["t"] if events else 0.0)
    ends = [e["t"] - t0 for e in events if e["event"] == "state" and e["state"] in RUN_ENDS]
    changes: dict[str, list[tuple[float, str]]] = {}
    for e in events:
        if e["event"] == "peer":
            changes.setdefault(e["peer"], []).append((e["t"] - t0, e["status"]))
    return {peer: [i for i in _intervals(c, ends, last - t0) if i.phase not in NOT_BUSY] for peer, c in changes.items()}


def usage_series(events: Sequence[Mapping[str, Any]], key: str) -> dict[str, tuple[list[float], list[float]]]:
    """A `usage` field (rss: resident bytes; sent: bytes the data plane has sent so far) per peer over time."""
    t0 = _start(events)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for e in events:
        if e["event"] == "usage" and isinstance(e.get(key), int | float):
            xs, ys = series.setdefault(e["peer"], ([], []))
            xs.append(e["t"] - t0)
            ys.append(e[key])
    return series


def peer_summaries(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each peer's own summary (pac-launch), by name; empty for a run on one device."""
    return {name: p.get("summary") or {} for name, p in summary.get("peers", {}).items()}


def bytes_by_phase(summary: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Bytes each peer sent, by what sent them (BYTES_BY_PHASE); counters a peer did not report are left out."""
    return {
        name: {label: s[key] for key, label in BYTES_BY_PHASE.items() if isinstance(s.get(key), int | float)}
        for name, s in peer_summaries(summary).items()
    }


def time_by_state(summary: Mapping[str, Any], epochs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Seconds the run spent per state: the coordinator's count for pac-launch; on one device, the cache build,
    the epochs' training and their evaluations."""
    if "seconds_by_state" in summary:
        return dict(summary["seconds_by_state"])
    times = {
        "cache build": sum(summary.get("cache_build_seconds", {}).values()),
        "training": sum(e.get("epoch_seconds", 0.0) for e in epochs),
        "evaluation": sum(e.get("eval_seconds", 0.0) for e in epochs),
    }
    return {state: seconds for state, seconds in times.items() if seconds}


# ---- shared drawing (the report and benchmarks/) ----


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files, no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Lay the figure out, write it as a PNG and free it (a long benchmark draws many)."""
    if fig.get_layout_engine() is None:  # a figure made with layout="constrained" lays itself out
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)


def lines(
    ax: Any,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    errors: Mapping[str, Sequence[float]] | None = None,
    *,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    **style: Any,
) -> None:
    """One line with markers per series (with error bars where `errors` has them), labelled and gridded."""
    for name, (xs, ys) in series.items():
        ax.errorbar(xs, ys, yerr=(errors or {}).get(name), marker="o", capsize=3, label=name, **style)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def bars(
    ax: Any,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    ylabel: str,
    stacked: bool = False,
    colors: Mapping[str, str] | None = None,
) -> None:
    """A bar per group for each series: side by side, or stacked (parts of one total)."""
    width = 0.8 if stacked else 0.8 / max(len(series), 1)
    bottom = [0.0] * len(groups)
    for i, (name, values) in enumerate(series.items()):
        offset = 0.0 if stacked else (i - (len(series) - 1) / 2) * width
        xs = [x + offset for x in range(len(groups))]
        ax.bar(xs, values, width, bottom=bottom if stacked else None, label=name, color=(colors or {}).get(name))
        if stacked:
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    rotate = max((len(g) for g in groups), default=0) > 10
    ax.set_xticks(range(len(groups)), groups, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)


# ---- the report's pictures ----


def draw_curves(run: Run, png: Path) -> Path | None:
    """curves.png: loss per epoch (training, validation) over the per-step loss; accuracy beside it if recorded."""
    curves = epoch_curves(run.epochs)
    step_x, step_y = step_positions(run.steps)
    if not curves and not step_x:
        return None
    losses = {name.replace("_", " "): curves[name] for name in ("train_loss", "val_loss") if name in curves}
    others = {name.replace("_", " "): c for name, c in curves.items() if name not in ("train_loss", "val_loss")}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(11 if others else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    if step_x:
        ax.plot(step_x, step_y, color="grey", alpha=0.35, linewidth=1, label="step loss")
    lines(ax, losses, xlabel="epoch", ylabel="loss")
    ax.legend(fontsize=8)
    ax.set_title(f"{run.summary.get('method', 'run')}: loss")
    if others:
        lines(axes[0][1], others, xlabel="epoch", ylabel=next(iter(others)) if len(others) == 1 else "validation")
        axes[0][1].set_title("validation")
    for a in axes[0]:
        a.xaxis.get_major_locator().set_params(integer=True)
        a.set_xlim(left=0)
    return save(fig, png)


def _colour(phase: str, seen: dict[str, str]) -> str:
    """A phase's colour: its own, else the next of matplotlib's cycle (a status this module does not know)."""
    if phase not in COLOURS and phase not in seen:
        seen[phase] = f"C{len(seen) % 10}"
    return COLOURS.get(phase) or seen[phase]


def _label(phase: str) -> str:
    return status_word({"status": phase, "total": 1})  # the live table's word: cache -> cache build, ...


def draw_timeline(run: Run, png: Path) -> Path | None:
    """timeline.png: a Gantt chart, the run's states on top and a row per peer, coloured by phase."""
    states, phases = state_intervals(run.events), phase_intervals(run.events)
    if not states and not phases:
        return None
    rows = [("run", states)] + sorted(phases.items())
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.5 * len(rows)), layout="constrained")
    unknown: dict[str, str] = {}
    legend: dict[str, tuple[Any, list[str]]] = {}  # colour -> (a bar, the phases drawn in it)
    sliver = 0.002 * run_seconds(run.events)  # an instant (seen to start and end at once) is still visible
    for y, (_, intervals) in enumerate(rows):
        for i in intervals:
            colour = _colour(i.phase, unknown)
            bar = ax.barh(y, max(i.end - i.start, sliver), left=i.start, color=colour, height=0.6)
            names = legend.setdefault(colour, (bar, []))[1]
            if _label(i.phase) not in names:
                names.append(_label(i.phase))
    for e in run.events:  # a failure is an instant, not a phase: a line across every row, where the run stopped
        if e["event"] == "state" and e["state"] == "failed":
            line = ax.axvline(e["t"] - _start(run.events), color=COLOURS["failed"], linewidth=2)
            legend.setdefault(COLOURS["failed"], (line, ["run failed"]))
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.invert_yaxis()  # the run on top, peers below in name order
    ax.axhline(0.5, color="black", linewidth=0.6)
    _time_axis(ax, run.events)
    ax.grid(axis="x", alpha=0.3)
    handles = [bar for bar, _ in legend.values()]
    fig.legend(handles, [" / ".join(n) for _, n in legend.values()], loc="outside right upper", fontsize=8)
    ax.set_title("who was busy when")
    return save(fig, png)


def run_seconds(events: Sequence[Mapping[str, Any]]) -> float:
    """From the timeline's first event to its last (1 where there is none, a scale that divides)."""
    return (events[-1]["t"] - events[0]["t"] if events else 0.0) or 1.0


def _time_axis(ax: Any, events: Sequence[Mapping[str, Any]]) -> None:
    """The whole run on the x axis, the same in every picture of it, so they line up when compared."""
    ax.set_xlim(0, run_seconds(events) * 1.02)  # a margin: the last instant (done, failed) stays in view
    ax.set_xlabel("seconds from the first event")


def draw_memory(run: Run, png: Path) -> Path | None:
    """memory.png: each peer's resident memory over time from the timeline; else bars of its peak."""
    rss = usage_series(run.events, "rss")
    peaks = {n: s["peak_rss_mb"] for n, s in peer_summaries(run.summary).items() if "peak_rss_mb" in s}
    if not rss and not peaks:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if rss:
        _per_peer_over_time(ax, rss, 2**20, "resident memory (MB)", run.events)
    else:
        bars(ax, list(peaks), {"peak": list(peaks.values())}, ylabel="peak resident memory (MB)")
    ax.set_title("memory per peer")
    return save(fig, png)


def _per_peer_over_time(
    ax: Any,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    unit: float,
    ylabel: str,
    events: Sequence[Mapping[str, Any]],
) -> None:
    """A `usage` series per peer (in units of `unit` bytes) as steps over the run's time, its states behind."""
    for peer, (xs, ys) in sorted(series.items()):
        ax.step(xs, [y / unit for y in ys], where="post", label=peer)
    _shade_states(ax, events)
    _time_axis(ax, events)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _shade_states(ax: Any, events: Sequence[Mapping[str, Any]]) -> None:
    """The run's working states as faint bands behind a time series, so a jump lines up with its cause."""
    labelled = set()
    for i in state_intervals(events):
        if i.phase in ("cache build", "training"):
            label = None if i.phase in labelled else f"run: {i.phase}"  # one legend entry per state
            ax.axvspan(i.start, i.end, color=COLOURS[i.phase], alpha=0.08, linewidth=0, label=label)
            labelled.add(i.phase)


def draw_traffic(run: Run, png: Path) -> Path | None:
    """traffic.png: bytes each peer's data plane sent over time (timeline), and each peer's bytes by phase."""
    sent = usage_series(run.events, "sent")
    by_phase = bytes_by_phase(run.summary)
    if not sent and not any(by_phase.values()):
        return None
    panels = [p for p in (sent, by_phase) if p and any(p.values())]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    axes = list(axes[0])
    if sent:
        ax = axes.pop(0)
        _per_peer_over_time(ax, sent, 1e6, "MB sent so far (data plane)", run.events)
        ax.set_title("bytes on the wire over time")
    if axes:
        peers = sorted(by_phase)
        labels = [label for label in BYTES_BY_PHASE.values() if any(by_phase[p].get(label) for p in peers)]
        series = {label: [by_phase[p].get(label, 0) / 1e6 for p in peers] for label in labels}
        bars(axes[0], peers, series, ylabel="MB sent", stacked=True)
        axes[0].set_title("bytes sent per peer, by phase")
    return save(fig, png)


# ---- the page ----


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else duration(seconds)  # a tiny run's states take tenths


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def final_metrics(run: Run) -> dict[str, Any]:
    """The last epoch's record (the kept one where early stopping chose another)."""
    if not run.epochs:
        return {}
    kept = run.summary.get("best_epoch")
    chosen = [e for e in run.epochs if e["epoch"] == kept] or run.epochs[-1:]
    return dict(chosen[0])


def _outcome(run: Run) -> str:
    states = [e for e in run.events if e["event"] == "state"]
    if states and states[-1]["state"] == "failed":
        return f"failed: {states[-1].get('reason', 'no reason recorded')}"
    if states:
        return states[-1]["state"]
    return "finished" if run.summary else "unfinished (no summary.json yet: still running, or stopped)"


def markdown(run: Run, pictures: Mapping[str, Path | None]) -> str:
    """report.md: what ran, on what, how long, how well; the pictures drawn and why any are absent."""
    s, opts = run.summary, run.summary.get("options", {})
    data = opts.get("data", {}) if isinstance(opts.get("data"), dict) else {}
    peers = sorted(set(peer_summaries(s)) | set(phase_intervals(run.events)))
    where = (
        f"pac-launch, {len(peers)} peer{'s' * (len(peers) != 1)}" if run.collaborative else "pac train on one device"
    )
    if s.get("mode"):
        where += f", placement {s['mode']}"
    train = s.get("train_samples", s.get("split_sizes", {}).get("train"))
    val = s.get("val_samples", s.get("split_sizes", {}).get("val"))
    out = [
        f"# Run report: {run.path.name}",
        "",
        f"- method: {s.get('method', 'unknown (no summary.json)')}, task: {s.get('task', 'unknown')}",
        f"- where: {where}",
        f"- data: {(data.get('data') or 'the bundled corpus') if data else 'unknown'}"
        + (f", {train} training and {val} validation samples" if train is not None else ""),
        f"- outcome: {_outcome(run)}",
    ]
    if "peak_rss_mb" in s and not peers:
        out.append(f"- peak memory: {s['peak_rss_mb']:.0f} MB")
    final = final_metrics(run)
    if final:
        shown = {k: v for k, v in final.items() if k == "train_loss" or k.startswith("val_")}
        which = "kept epoch" if "best_epoch" in s else "epoch"  # early stopping keeps its best, not its last
        out.append(f"- final ({which} {final['epoch']}): " + ", ".join(f"{k} {_number(v)}" for k, v in shown.items()))
    times = time_by_state(s, run.epochs)
    if times:
        out += ["", "## Time by state", "", "| state | time |", "|---|---|"]
        out += [f"| {state} | {_seconds(seconds)} |" for state, seconds in times.items()]
    if peers:
        summaries, info, sent_by_phase = peer_summaries(s), s.get("peers", {}), bytes_by_phase(s)
        out += ["", "## Peers", "", "| peer | rank | cores | peak memory | sent | last status |", "|---" * 6 + "|"]
        last = {e["peer"]: e["status"] for e in run.events if e["event"] == "peer"}
        for p in peers:
            ps, profile = summaries.get(p, {}), info.get(p, {}).get("profile", {})
            peak = f"{ps['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in ps else "—"
            sent = sum(sent_by_phase.get(p, {}).values())
            out.append(
                f"| {p} | {info.get(p, {}).get('rank', '—')} | {profile.get('cores', '—')} | {peak} "
                f"| {size(sent) if sent else '—'} | {last.get(p, '—')} |"
            )
    out += ["", "## Pictures", ""]
    absent = []
    for name, path in pictures.items():
        if path is not None:
            out.append(f"![{name}]({path.name})")
        else:
            absent.append(f"- {name}.png: {_why_absent(name, run)}")
    if absent:
        out += ["", "Not drawn:", "", *absent]
    return "\n".join(out) + "\n"


def _why_absent(name: str, run: Run) -> str:
    if name == "curves":
        return "no training step or epoch was recorded in metrics.jsonl"
    if not run.collaborative:
        return "a run on one device (`pac train`) has no peers and no timeline.jsonl; `pac-launch` writes them"
    if not run.events:
        return "no timeline.jsonl in the run (a pac-launch older than the timeline, or it was deleted)"
    return "the timeline and summary.json hold no events or counters for it"


DRAWINGS = {"curves": draw_curves, "timeline": draw_timeline, "memory": draw_memory, "traffic": draw_traffic}


def write_report(run_dir: Path | str, out: Path | str | None = None) -> list[Path]:
    """Draw the run in `run_dir` into `out` (default RUN_DIR/report): the PNGs that apply, then report.md."""
    run = load_run(run_dir)
    target = Path(out) if out is not None else run.path / "report"
    target.mkdir(parents=True, exist_ok=True)
    pictures = {name: draw(run, target / f"{name}.png") for name, draw in DRAWINGS.items()}
    (target / "report.md").write_text(markdown(run, pictures))
    return [p for p in pictures.values() if p is not None] + [target / "report.md"]
