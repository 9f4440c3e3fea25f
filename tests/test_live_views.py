"""What a person sees of a pac-launch run while it goes: plain lines where the output is not a terminal, a rich
table redrawn in place on one (run under a real pseudo-terminal), the browser dashboard (loaded in a real headless
Chromium during a real run), and the run's timeline.jsonl. Every run here is a real `pac-launch --local 2`
process with real peer processes."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from pathlib import Path

import pytest

from launcher.dashboard import Dashboard, parse_address
from pac.errors import PacError
from pac.runtime.run_view import PlainView, describe_work, duration, size
from pac.runtime.timeline import TIMELINE, Timeline, read_timeline

LAUNCH = str(Path(sys.executable).parent / "pac-launch")
STATES = ["joining", "planning", "cache build", "training", "export", "done"]


def _argv(tiny_llama, topic_jsonl, out: Path, epochs: int = 2, *extra: str) -> list[str]:
    return [
        LAUNCH,
        "--local",
        "2",
        "--model",
        str(tiny_llama),
        "--data",
        str(topic_jsonl),
        "--out",
        str(out),
        "--cache-dir",
        str(out.parent / "cache"),
        "--epochs",
        str(epochs),
        "--val-size",
        "12",
        "--batch-size",
        "8",
        "--mode",
        "shuffle",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "140"}


# ----------------------------------------------------------------------------------------------- not a terminal
@pytest.fixture(scope="module")
def plain_run(tiny_llama, topic_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "out"
    proc = subprocess.run(
        _argv(tiny_llama, topic_jsonl, out), capture_output=True, text=True, env=_env(), timeout=600
    )  # fmt: skip
    return proc, out


# Every line pac-launch writes to a file or a pipe, each of one of these forms (and never redrawn).
PLAIN_LINES = [
    r"\[pac-launch\] .+",  # log lines: states, joins, the plan, where the adapter is
    r"  (\S+: (cache \d+/\d+ samples \(\d+\.\d/s\)|preparing to train|training, step \d+/\d+ \(\d+\.\d/s\)|"
    r"finished|joined|arrived, planned in at the next checkpoint))( \| .+)*",  # progress, every 5 s
    r"  [ \w()/,.:-]*",  # the plan's lines, indented
    r"epoch \d+/\d+: train loss \d+\.\d+ .*",  # the epochs, at the end
]


def test_plain_lines_where_the_output_is_not_a_terminal(plain_run):
    proc, _ = plain_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "\x1b" not in proc.stdout and "\r" not in proc.stdout  # no colours, no cursor moves, no redraws
    for line in proc.stdout.splitlines():
        assert any(re.fullmatch(form, line) for form in PLAIN_LINES), f"unexpected line {line!r} in\n{proc.stdout}"
    for state in STATES:
        assert f"[pac-launch] {state}" in proc.stdout


def test_the_timeline_records_states_phases_memory_and_losses(plain_run):
    proc, out = plain_run
    events = read_timeline(out / TIMELINE)
    assert [e["state"] for e in events if e["event"] == "state"] == STATES
    assert all(a["t"] <= b["t"] for a, b in zip(events, events[1:], strict=False))
    peers = {e["peer"] for e in events if e["event"] == "peer"}
    assert len(peers) == 2
    for peer in peers:  # each peer's phases in order, each once
        statuses = [e["status"] for e in events if e["event"] == "peer" and e["peer"] == peer]
        assert [s for s in statuses if s in ("joined", "cache", "train", "finished")] == [
            "joined",
            "cache",
            "train",
            "finished",
        ], statuses
        usage = [e for e in events if e["event"] == "usage" and e["peer"] == peer]
        assert usage and all(e["rss"] > 10e6 for e in usage)  # a peer process with torch holds tens of MB at least
    assert max(e["sent"] for e in events if e["event"] == "usage") > 0  # phase 1's taps crossed the data plane
    steps = [e for e in events if e["event"] == "step"]
    summary = json.loads((out / "summary.json").read_text())
    lead = next(name for name, p in summary["peers"].items() if p["rank"] == 0)
    lead_steps = [e for e in steps if e["peer"] == lead]
    assert [e["step"] for e in lead_steps] == list(range(1, lead_steps[-1]["total"] + 1))
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for logged, recorded in zip(epochs, summary["epochs"], strict=True):  # the same numbers as the run's own record
        assert logged["val_loss"] == pytest.approx(recorded["val_loss"])
        assert logged["train_loss"] == pytest.approx(recorded["train_loss"])


def test_a_timeline_cut_short_by_a_crash_reads_up_to_the_cut(tmp_path):
    timeline = Timeline()
    timeline.add("state", state="joining")
    timeline.attach(tmp_path / TIMELINE)  # events before the file existed go first
    timeline.add("peer", peer="laptop", status="cache")
    with (tmp_path / TIMELINE).open("a") as f:
        f.write('{"t": 1.0, "event": "us')
    assert [e["event"] for e in read_timeline(tmp_path / TIMELINE)] == ["state", "peer"]


def test_plain_view_writes_progress_lines_while_peers_work(tmp_path):
    written = tmp_path / "log.txt"
    row = {"name": "laptop", "rank": 0, "layers": "0-1", "unit": "samples", "rss": 2e8, "sent": 3e6, "heard": 0.4}
    with written.open("w") as f:
        view = PlainView(f, every=0.0)
        view.update({"state": "joining", "peers": [{**row, "status": "joined", "done": 0, "total": 0, "rate": 0}]})
        view.line("[pac-launch] cache build")
        view.update(
            {"state": "cache build", "peers": [{**row, "status": "cache", "done": 12, "total": 40, "rate": 3.14}]}
        )
    assert written.read_text() == "[pac-launch] cache build\n  laptop: cache 12/40 samples (3.1/s)\n"
    assert describe_work({**row, "status": "train", "done": 0, "total": 0, "rate": 0}) == "preparing to train"
    assert (size(3.2e6), size(512), size(None)) == ("3.2 MB", "512 B", "—")
    assert (duration(42), duration(185), duration(3720)) == ("42 s", "3 min 05 s", "1 h 02 min")


# ---------------------------------------------------------------------------------------------------- a terminal
def _run_in_terminal(argv: list[str], timeout: float = 600) -> tuple[int, str]:
    """`argv` with its stdout and stderr on a new pseudo-terminal (140 x 40); what it wrote there, and its code."""
    main, secondary = pty.openpty()
    os.set_blocking(main, False)
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    env = {**_env(), "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                try:
                    chunks.append(os.read(main, 65536))
                except OSError:  # the last writer closed the terminal
                    break
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
        os.close(main)
    return code, b"".join(chunks).decode(errors="replace")


def test_a_live_table_redrawn_in_place_on_a_terminal(tiny_llama, topic_jsonl, tmp_path):
    code, screen = _run_in_terminal(_argv(tiny_llama, topic_jsonl, tmp_path / "out", 20))  # a few s of training
    assert code == 0, screen[-3000:]
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    # rich redraws the table where it stands: it moves the cursor up over the last drawing and erases lines
    assert re.search(r"\x1b\[\d*A", screen) and "\x1b[2K" in screen
    for header in ("peer", "status", "layers", "progress", "throughput", "memory", "sent", "heard"):
        assert header in plain
    assert re.search(r"pac-launch: training, \d+ (s|min)", plain)  # the title: state and time
    assert re.search(r"\d+/\d+ steps", plain) and re.search(r"\d+\.\d (MB|GB)", plain)
    assert plain.count("finished") >= 2  # the last table: both peers finished
    assert "[pac-launch] done" in plain  # log lines are printed above the table, not lost


# ----------------------------------------------------------------------------------------------------- a browser
def test_dashboard_addresses():
    assert parse_address("8765") == ("127.0.0.1", 8765)
    assert parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_address("[::1]:0") == ("::1", 0)
    for bad in ("http", "host:99999", ""):
        with pytest.raises(PacError, match="give a port"):
            parse_address(bad)


def test_dashboard_serves_the_page_and_the_state(tmp_path):
    dashboard = Dashboard("127.0.0.1:0")
    try:
        dashboard.line("[pac-launch] joining: 2 peer(s)")
        dashboard.update({"state": "joining", "peers": []})
        page = urllib.request.urlopen(dashboard.url, timeout=10).read().decode()
        assert "<script>" in page and "src=" not in page and "href=" not in page  # nothing fetched from elsewhere
        state = json.loads(urllib.request.urlopen(dashboard.url + "state.json", timeout=10).read())
        assert state == {"state": "joining", "peers": [], "log": ["[pac-launch] joining: 2 peer(s)"]}
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(dashboard.url + "../etc/passwd", timeout=10)
        with pytest.raises(PacError, match="cannot listen"):
            Dashboard(dashboard.url.split("//")[1].rstrip("/"))  # the port is taken
    finally:
        dashboard.close()


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _chromium(browser: str, url: str, *args: str) -> str:
    """What a real headless Chromium makes of `url` after 4 s of the page's own timers (its serialised DOM)."""
    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"pac-chromium-{os.getpid()}"
    argv = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
    argv += ["--virtual-time-budget=4000", "--window-size=1280,1000", *args, url]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(_browser() is None, reason="no Chromium: apt-get install chromium (.ci/run installs it as root)")
def test_dashboard_in_a_real_browser_during_a_run(tiny_llama, topic_jsonl, tmp_path):
    out = tmp_path / "out"
    argv = _argv(tiny_llama, topic_jsonl, out, 40, "--dashboard", "127.0.0.1:0")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        first = proc.stdout.readline()
        url = re.fullmatch(r"\[pac-launch\] dashboard: (http://\S+)\n", first).group(1)
        deadline, state = time.monotonic() + 300, {}
        while time.monotonic() < deadline:  # until training has logged an epoch: curves to draw
            state = json.loads(urllib.request.urlopen(url + "state.json", timeout=10).read())
            if state.get("state") == "training" and state["curves"]["epochs"]:
                break
            assert proc.poll() is None, "the run ended before the page was loaded"
            time.sleep(1)
        assert state.get("state") == "training", state
        dom = _chromium(_browser(), url, "--dump-dom")
        shot = tmp_path / "dashboard.png"
        _chromium(_browser(), url, f"--screenshot={shot}")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    names = [p["name"] for p in state["peers"]]
    for name in names:  # the page drew the table from /state.json
        assert re.search(rf'<tr data-peer="{name}"><td>{name}</td><td class="num">\d</td><td class="train">', dom), dom
    assert 'class="state training"' in dom
    assert re.search(r'<path d="M[\d.,LM ]+" fill="none" stroke="#90cdf4"', dom)  # the step losses' curve
    assert 'class="val_loss-point"' in dom  # and an epoch's validation loss
    assert "rank 0" in dom  # the plan
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("PAC_DASHBOARD_SCREENSHOT"):  # benchmarks/results/dashboard.png is made so (README)
        shutil.copy(shot, os.environ["PAC_DASHBOARD_SCREENSHOT"])
