"""`pac report`: the pure functions that turn a run's files into plot data, on small timelines written with
pac.runtime.timeline's own writer; then the real command on a real `pac train` run and a real two-peer
`pac-launch --local 2` run."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import train_argv

from launcher.main import main as launch
from pac.cli import main
from pac.errors import PacError
from pac.report import (
    Interval,
    bytes_by_phase,
    epoch_curves,
    load_run,
    phase_intervals,
    read_metrics,
    state_intervals,
    step_positions,
    time_by_state,
    usage_series,
    write_report,
)
from pac.runtime.timeline import TIMELINE, Timeline, read_timeline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _timeline(path: Path, script: list[tuple[float, str, dict]]) -> list[dict]:
    """Events written by the coordinator's Timeline, their clock set to `t0 + offset` of each script line."""
    timeline, t0 = Timeline(path), 1_000.0
    for _, event, fields in script:
        timeline.add(event, **fields)
    # Timeline stamps time.time(); rewrite the stamps so intervals are exact (the file is what a run leaves).
    events = read_timeline(path)
    for e, (offset, _, _) in zip(events, script, strict=True):
        e["t"] = t0 + offset
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return read_timeline(path)


SCRIPT = [
    (0.0, "state", {"state": "joining"}),
    (0.0, "peer", {"peer": "a", "status": "connecting"}),
    (0.0, "peer", {"peer": "b", "status": "connecting"}),
    (1.0, "peer", {"peer": "a", "status": "joined"}),
    (2.0, "peer", {"peer": "b", "status": "joined"}),
    (2.0, "state", {"state": "cache build"}),
    (2.0, "peer", {"peer": "a", "status": "cache"}),
    (2.0, "peer", {"peer": "b", "status": "cache"}),
    (2.5, "usage", {"peer": "a", "rss": 100 * 2**20, "sent": 0}),
    (3.0, "usage", {"peer": "a", "rss": 150 * 2**20, "sent": 2_000_000}),
    (3.0, "peer", {"peer": "a", "status": "train"}),
    (3.5, "state", {"state": "training"}),
    (4.0, "peer", {"peer": "b", "status": "train"}),
    (6.0, "peer", {"peer": "a", "status": "finished"}),
    (7.0, "peer", {"peer": "b", "status": "finished"}),
    (7.0, "state", {"state": "export"}),
    (7.5, "state", {"state": "done"}),
]


def test_phases_last_until_the_next_status_and_finished_peers_are_not_busy(tmp_path):
    events = _timeline(tmp_path / TIMELINE, SCRIPT)
    phases = phase_intervals(events)
    assert phases["a"] == [
        Interval(0.0, 1.0, "connecting"),
        Interval(1.0, 2.0, "joined"),
        Interval(2.0, 3.0, "cache"),
        Interval(3.0, 6.0, "train"),
    ]
    assert phases["b"][-1] == Interval(4.0, 7.0, "train")
    assert state_intervals(events) == [
        Interval(0.0, 2.0, "joining"),
        Interval(2.0, 3.5, "cache build"),
        Interval(3.5, 7.0, "training"),
        Interval(7.0, 7.5, "export"),
    ]
    assert usage_series(events, "rss") == {"a": ([2.5, 3.0], [100 * 2**20, 150 * 2**20])}
    assert usage_series(events, "sent")["a"][1] == [0, 2_000_000]


def test_a_failed_attempt_ends_its_phases_and_a_resumed_run_starts_afresh(tmp_path):
    """A run that failed and was resumed appends to the same timeline: the peer's `train` ends at the failure,
    not at its next status an hour later."""
    script = [
        (0.0, "state", {"state": "training"}),
        (0.0, "peer", {"peer": "a", "status": "train"}),
        (5.0, "state", {"state": "failed", "reason": "a peer was lost"}),
        (3600.0, "state", {"state": "joining"}),
        (3600.0, "peer", {"peer": "a", "status": "connecting"}),
        (3601.0, "peer", {"peer": "a", "status": "train"}),
        (3610.0, "state", {"state": "done"}),
    ]
    events = _timeline(tmp_path / TIMELINE, script)
    assert phase_intervals(events)["a"] == [
        Interval(0.0, 5.0, "train"),
        Interval(3600.0, 3601.0, "connecting"),
        Interval(3601.0, 3610.0, "train"),
    ]
    # The run's own states: the failure ends `training`; a state lasts until the next (the gap is `failed`'s,
    # which, like `done`, is an instant and not drawn).
    assert [i.phase for i in state_intervals(events)] == ["training", "joining"]


def test_a_line_cut_short_in_the_timeline_is_skipped_but_one_in_metrics_is_refused(tmp_path):
    (tmp_path / TIMELINE).write_text('{"t": 1.0, "event": "state", "state": "joining"}\n{"t": 2.0, "ev')
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "epoch": 1, "loss": 2.0}\n{"epoch": 1, "train_lo')
    with pytest.raises(PacError, match=r"metrics.jsonl, line 2, is not a whole JSON record.*delete that line"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").unlink()
    assert [e["state"] for e in load_run(tmp_path).events] == ["joining"]


def test_what_is_not_a_run_or_has_nothing_to_report_is_named(tmp_path):
    with pytest.raises(PacError, match="not a directory"):
        load_run(tmp_path / "missing")
    with pytest.raises(PacError, match="not a run directory: it holds none of summary.json"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(PacError, match="nothing to report"):
        load_run(tmp_path)


def test_epoch_curves_steps_bytes_and_times_from_run_files(tmp_path):
    records = [
        {"step": 1, "epoch": 1, "loss": 3.0},
        {"step": 2, "epoch": 1, "loss": 2.0},
        {"epoch": 1, "train_loss": 2.5, "val_loss": 2.2, "val_accuracy": 0.5, "epoch_seconds": 3.0},
        {"step": 3, "epoch": 2, "loss": 1.0},
        {"epoch": 2, "train_loss": 9.0},  # superseded: a resumed run logs epoch 2 again
        {"epoch": 2, "train_loss": 1.0, "val_loss": 1.2, "val_accuracy": 0.75, "epoch_seconds": 2.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    steps, epochs = read_metrics(tmp_path / "metrics.jsonl")
    curves = epoch_curves(epochs)
    assert curves["train_loss"] == ([1, 2], [2.5, 1.0]) and curves["val_accuracy"] == ([1, 2], [0.5, 0.75])
    assert "epoch_seconds" not in curves
    assert step_positions(steps) == ([0.5, 1.0, 2.0], [3.0, 2.0, 1.0])
    summary = {
        "peers": {
            "a": {"rank": 0, "summary": {"phase1_bytes_sent": 10, "phase2_bytes_sent": 0}},
            "b": {"rank": 1, "summary": {"phase1_bytes_sent": 5, "phase2_bytes_sent": 2, "phase2_allreduce_bytes": 7}},
        }
    }
    assert bytes_by_phase(summary) == {
        "a": {"phase 1 (data plane)": 10, "phase 2 (data plane)": 0},
        "b": {"phase 1 (data plane)": 5, "phase 2 (data plane)": 2, "phase 2 all-reduce": 7},
    }
    assert time_by_state({"cache_build_seconds": {"train": 1.0, "val": 0.5}}, epochs) == {
        "cache build": 1.5,
        "training": 5.0,
    }
    assert time_by_state({"seconds_by_state": {"joining": 2.0}}, epochs) == {"joining": 2.0}


def test_a_run_that_failed_while_joining_is_reported_from_its_timeline(tmp_path):
    """pac-launch leaves launch.json, the peers' logs and the timeline of a run that never trained: the report
    draws who was waiting when and says why the run stopped and why there are no curves."""
    script = [
        (0.0, "state", {"state": "joining"}),
        (0.2, "peer", {"peer": "laptop", "status": "connecting"}),
        (90.0, "state", {"state": "failed", "reason": "no answer within 90 s from laptop"}),
    ]
    _timeline(tmp_path / TIMELINE, script)
    written = write_report(tmp_path)
    assert [p.name for p in written] == ["timeline.png", "report.md"]
    _pngs_are_real(written[:1])
    text = written[-1].read_text()
    assert "- outcome: failed: no answer within 90 s from laptop" in text
    assert "- curves.png: no training step or epoch was recorded in metrics.jsonl" in text
    assert "| laptop | — | — | — | — | connecting |" in text


def _pngs_are_real(paths: list[Path]) -> None:
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC, path
        assert path.stat().st_size > 10_000, path  # a drawn chart, not an empty canvas


@pytest.fixture(scope="module")
def single_run(tiny_llama, topic_jsonl, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("single")
    argv = train_argv(tiny_llama, topic_jsonl, root / "out", root / "cache", "--epochs", "1", "--train-size", "24")
    assert main(argv) == 0
    return root / "out"


def test_pac_report_on_a_run_on_one_device(single_run, capsys):
    capsys.readouterr()
    started = time.monotonic()
    assert main(["report", str(single_run)]) == 0
    assert time.monotonic() - started < 30
    printed = capsys.readouterr().out.split()
    report = single_run / "report"
    assert printed == [str(report / "curves.png"), str(report / "report.md")]
    _pngs_are_real([report / "curves.png"])
    text = (report / "report.md").read_text()
    final = json.loads((single_run / "summary.json").read_text())["epochs"][-1]
    assert f"val_accuracy {final['val_accuracy']:.4f}" in text and "pac train on one device" in text
    assert "![curves](curves.png)" in text
    assert "- timeline.png: a run on one device (`pac train`) has no peers and no timeline.jsonl" in text


@pytest.fixture(scope="module")
def launched_run(tiny_llama, topic_jsonl, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("launched")
    argv = ["--local", "2", "--model", str(tiny_llama), "--data", str(topic_jsonl), "--out", str(root / "out")]
    common = ["--epochs", "1", "--val-size", "12", "--reduction", "4", "--batch-size", "8"]
    assert launch([*argv, "--cache-dir", str(root / "cache"), "--join-timeout", "90", *common]) == 0
    return root / "out"


def test_pac_report_on_a_two_peer_run_draws_who_was_busy_when(launched_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["report", str(launched_run), "--out", str(tmp_path / "r")]) == 0
    names = [Path(p).name for p in capsys.readouterr().out.split()]
    assert names == ["curves.png", "timeline.png", "memory.png", "traffic.png", "report.md"]
    _pngs_are_real([tmp_path / "r" / n for n in names[:-1]])
    text = (tmp_path / "r" / "report.md").read_text()
    assert "pac-launch, 2 peers" in text and "- outcome: done" in text
    for peer in ("local-0", "local-1"):
        assert f"| {peer} | " in text
    assert "Not drawn" not in text
    # What the chart is drawn from: both peers trained, inside the run's training state.
    run = load_run(launched_run)
    training = next(i for i in state_intervals(run.events) if i.phase == "training")
    for peer, intervals in phase_intervals(run.events).items():
        train = [i for i in intervals if i.phase == "train"]
        assert train and train[0].start <= training.end, peer
    assert set(usage_series(run.events, "rss")) == {"local-0", "local-1"}


def test_a_two_peer_run_without_its_timeline_gets_bars_of_peaks_and_bytes(launched_run, tmp_path):
    """A run from before timeline.jsonl (or one whose file was deleted): memory and traffic from the peers'
    summaries, and the report says why there is no phase chart."""
    old = tmp_path / "old"
    shutil.copytree(launched_run, old, ignore=shutil.ignore_patterns(TIMELINE, "report"))
    written = [p.name for p in write_report(old)]
    assert written == ["curves.png", "memory.png", "traffic.png", "report.md"]
    _pngs_are_real([old / "report" / n for n in written[:-1]])
    assert "- timeline.png: no timeline.jsonl in the run" in (old / "report" / "report.md").read_text()
