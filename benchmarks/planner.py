"""How well the planner predicts: a planned `pac-launch` on a simulated home of uneven devices, each phase's
predicted time against the measured one (issue "A planner for uneven home devices").

The home is deploy/home.toml (or --home): every device a network namespace with its CPU share, memory cap,
link rate and delay (deploy/home.py). The run is SmolLM2-135M-Instruct on BBC News, planned (no --mode), with
every peer measuring itself afresh (--refresh-profiles). Each row keeps what the coordinator predicted and
measured (summary.json, "planned"), the plan it chose and the other modes' predictions. Needs root.

    python benchmarks/planner.py [--task classify] [--train-size 64] [--val-size 32] [--max-length 64] [--epochs 2]
    python benchmarks/planner.py --report
Writes benchmarks/results/planner.{json,md}; finished rows are kept, so a run can be repeated or extended.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".work" / "planner"


def run(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(HERE.parent / "deploy"))
    from home import SimulatedHome, read_home

    devices = read_home(args.home)
    work = WORK / f"{args.task}-{args.train_size}-{args.epochs}"
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "PAC_JOIN_TOKEN": secrets.token_hex(16), "TQDM_DISABLE": "1"}
    launch = Path(sys.executable).with_name("pac-launch")
    cmd = [str(launch), "--out", str(work / "out"), "--task", args.task, "--epochs", str(args.epochs)]
    cmd += ["--train-size", str(args.train_size), "--val-size", str(args.val_size)]
    cmd += ["--max-length", str(args.max_length), "--refresh-profiles", "--join-timeout", "300"]
    cmd += [*(["--model", args.model] if args.model else []), *(["--data", args.data] if args.data else [])]
    with SimulatedHome(devices) as home:
        hosts = home.start_peers(work / "peers", env)
        started = time.perf_counter()
        print("$", " ".join(cmd), flush=True)
        subprocess.run([*cmd, "--peers", str(hosts)], check=True, env=env)
        wall = time.perf_counter() - started
    summary = json.loads((work / "out" / "summary.json").read_text())
    planned = summary["planned"]
    return {
        "devices": [vars(d) for d in devices],
        "mode": summary["mode"],
        "plan": summary["plan"],
        "peers": {name: p["rank"] for name, p in summary["peers"].items()},
        "planned": planned,
        "wall_seconds": wall,
        "final": summary["epochs"][-1],
    }


def report(rows: dict) -> str:
    lines = [
        "| run | plan | phase 1 predicted / measured | phase 2 predicted / measured | other modes predicted |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        p = row["planned"]
        peers = ", ".join(f"{n} {row['plan'][r]}" for n, r in sorted(row["peers"].items(), key=lambda kv: kv[1]))
        others = ", ".join(f"{m} {s:.0f} s" for m, s in p["other_modes_seconds"].items())
        phases = []
        for phase in ("phase1", "phase2"):
            predicted, measured = p[f"predicted_{phase}_seconds"], p[f"measured_{phase}_seconds"]
            phases.append(f"{predicted:.0f} s / {measured:.0f} s ({measured / predicted:.2f}x)")
        left = f"; left out: {', '.join(p['left_out'])}" if p["left_out"] else ""
        lines.append(f"| {name} | {row['mode']}: {peers}{left} | {phases[0]} | {phases[1]} | {others} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=str(HERE.parent / "deploy" / "home.toml"))
    parser.add_argument("--model", help="model (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--data", help="data (default: the bundled BBC News)")
    parser.add_argument("--task", choices=["classify", "lm"], default="classify")
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--val-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only rebuild the table")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "planner.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    if not args.report:
        shape = f"{args.train_size}+{args.val_size} x {args.max_length} tokens"
        name = f"{Path(args.home).stem}, {args.task}, {shape}, {args.epochs} epochs"
        rows[name] = run(args)
        path.write_text(json.dumps(rows, indent=2) + "\n")
    table = report(rows)
    note = (
        "Predicted (the planner, from the peers' profiles and the timed links) against measured (the coordinator's "
        "clock) time of each phase of a planned `pac-launch` on a simulated home (deploy/home.py), all devices "
        "sharing this 2-core machine. Regenerate: `python benchmarks/planner.py` (root).\n\n"
    )
    (RESULTS / "planner.md").write_text(note + table)
    print(table)


if __name__ == "__main__":
    main()
