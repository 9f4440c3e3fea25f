"""What a crash costs a collaborative run, and what `pac-launch --resume` saves (issue "A home cluster that
survives its devices"): 3 local peers, SmolLM2-135M-Instruct on BBC News, shuffle mode (phase 1 pipelined).

Scenarios, each from an empty cache and run directory:

  undisturbed          the run alone
  peer-phase1          one peer SIGKILLed during the cache build: the run re-plans over the two others
  peer-phase2          one peer SIGKILLed during training: the same
  coordinator-phase2   pac-launch itself SIGKILLed during training (its peers train on); then `--resume`

For each: time to detect (a lost peer: the kill to the coordinator's re-planning line, with the silence it
reported; a lost coordinator is noticed by its user, who resumes at once here), time to recover (from there to
the saved adapter: the re-planned attempt, or the resume's wall time), work redone (samples the last attempt
forwarded through the model, per stage; steps trained twice per the metrics log), and end to end against
undisturbed.

    python benchmarks/reliability.py [--train-size 48] [--val-size 16] [--max-length 64] [--epochs 3]
Writes benchmarks/results/reliability.{json,md,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".work" / "reliability"
SCENARIOS = ("undisturbed", "peer-phase1", "peer-phase2", "coordinator-phase2")
KILL_DELAY_S = 3.0  # after the state's line: well inside the phase


def launch_argv(args: argparse.Namespace, out: Path) -> list[str]:
    return [
        "--local", "3", "--mode", "shuffle", "--task", "classify", "--out", str(out),
        "--cache-dir", str(out.parent / "cache"), "--train-size", str(args.train_size),
        "--val-size", str(args.val_size), "--max-length", str(args.max_length), "--epochs", str(args.epochs),
    ]  # fmt: skip


def pac_launch(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launcher.main", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its local peers are in its process group: cleaned up as one
    )


def run_scenario(name: str, args: argparse.Namespace) -> dict:
    root = WORK / name
    shutil.rmtree(root, ignore_errors=True)
    out = root / "out"
    started = time.monotonic()
    first = pac_launch(launch_argv(args, out))
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(first.stderr), daemon=True).start()
    row: dict = {"scenario": name}
    try:
        if name == "undisturbed":
            first.stdout.read()
            first.wait()
            row["end_to_end_s"] = time.monotonic() - started
            return {**row, **work_done(out)}
        phase = "cache build" if name == "peer-phase1" else "training"
        for line in first.stdout:
            if line.startswith(f"[pac-launch] {phase}"):
                break
        time.sleep(KILL_DELAY_S)
        killed = time.monotonic()
        if name.startswith("peer"):
            victim = next(p for p in psutil.Process(first.pid).children() if "local-1" in p.cmdline())
            victim.kill()
            for line in first.stdout:
                if "Re-planning over" in line:
                    row["detect_s"] = time.monotonic() - killed
                    silence = re.search(r"silent for ([0-9.]+) s", line)
                    row["reported_silence_s"] = float(silence.group(1)) if silence else None
                    break
            detected = time.monotonic()
            first.stdout.read()
            if first.wait() != 0:
                raise RuntimeError(f"{name}: the run did not finish after re-planning:\n{''.join(errors)}")
            row["recover_s"] = time.monotonic() - detected
            row["end_to_end_s"] = time.monotonic() - started
            return {**row, **work_done(out)}
        first.kill()  # noticed by whoever runs it; its peers notice after their --coordinator-timeout
        first.stdout.read()
        first.wait()
        resumed = time.monotonic()
        again = pac_launch(["--resume", str(out)])
        said, complaint = again.communicate()
        if again.returncode != 0:
            raise RuntimeError(f"{name}: the resume failed:\n{said}\n{complaint}")
        row["recover_s"] = time.monotonic() - resumed
        row["end_to_end_s"] = time.monotonic() - started
        return {**row, **work_done(out)}
    finally:
        with_group_gone(first.pid)


def with_group_gone(pgid: int) -> None:
    """The first attempt's peers (a vanished coordinator's wait for its timeout): stopped, by process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def work_done(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    forwarded = [p["summary"]["phase1_forwarded_samples"] for p in summary["peers"].values()]
    return {
        "forwarded_by_last_attempt": max(forwarded),
        "steps_trained": len(steps),
        "steps_trained_twice": len(steps) - len(set(steps)),
        "val_accuracy": summary["epochs"][-1].get("val_accuracy"),
    }


def write(rows: dict[str, dict], args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reliability.json").write_text(json.dumps(rows, indent=2) + "\n")
    base = rows["undisturbed"]["end_to_end_s"]
    lines = [
        f"3 local peers on this {os.cpu_count()}-core machine (loopback), shuffle mode, SmolLM2-135M-Instruct on "
        f"BBC News, {args.train_size} + {args.val_size} articles x {args.max_length} tokens, {args.epochs} epochs "
        f"(classification); each kill {KILL_DELAY_S:.0f} s into its phase. A lost peer is re-planned around by the "
        "run itself; a lost coordinator is followed by `pac-launch --resume`. Samples forwarded: by the last "
        "attempt, per stage. Regenerate: `python benchmarks/reliability.py`.",
        "",
        "| scenario | detect (s) | coordinator's silence (s) | recover (s) | samples forwarded | steps trained "
        "(twice) | end to end (s) | vs undisturbed | val accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():

        def fmt(key: str, r: dict = r) -> str:
            return "-" if r.get(key) is None else f"{r[key]:.1f}"

        lines.append(
            f"| {name} | {fmt('detect_s')} | {fmt('reported_silence_s')} | {fmt('recover_s')} "
            f"| {r['forwarded_by_last_attempt']} | {r['steps_trained']} ({r['steps_trained_twice']}) "
            f"| {r['end_to_end_s']:.1f} | {r['end_to_end_s'] / base:.2f}x | {r['val_accuracy']:.3f} |"
        )
    (RESULTS / "reliability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows)


def plot(rows: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    first = [rows[n]["end_to_end_s"] - rows[n].get("recover_s", 0.0) for n in names]
    recover = [rows[n].get("recover_s", 0.0) for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(names, first, label="until the loss is detected")
    ax.barh(names, recover, left=first, label="re-planned attempt, or pac-launch --resume")
    ax.set_xlabel("seconds, end to end")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "reliability.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=48)
    parser.add_argument("--val-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plot from the JSON")
    args = parser.parse_args()
    if args.report:
        write(json.loads((RESULTS / "reliability.json").read_text()), args)
        return
    rows = {}
    for name in args.scenarios:
        rows[name] = run_scenario(name, args)
        print(json.dumps(rows[name]), flush=True)
    write(rows, args)


if __name__ == "__main__":
    main()
