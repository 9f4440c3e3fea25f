"""The collaborative runtime's figures: `pac-launch --local N` on SmolLM2-135M-Instruct and BBC News.

For 1, 2 and 3 local peers (shuffle mode) and for 3 peers in each placement mode, measured from the
run's own summary (every peer reports its phase-1 time and the bytes its data plane sent):
- phase-1 throughput: samples (train + validation) / the slowest peer's phase-1 time;
- bytes sent per sample on the data plane in phase 1 (hidden states between stages and taps to their
  owners) and in phase 2 (side-network activations and their gradients, side-pipeline only; the
  gloo all-reduce of gradients is counted separately, from the number of trainable parameters);
- phase-2 time per epoch;
- each peer's peak resident memory, and with `--shares 1,0,1` the same three peers where the middle one runs
  phase 1 only (share 0: its layers, then it leaves; a phone's role, `pac peer --phase1-only`).

Every run gets a fresh cache directory, so phase 1 really runs. The peers share this machine's cores
(each gets cores/N threads): on one machine more peers cannot be faster, so these figures show the
runtime's overhead, not a home cluster's speed-up. With `--network 100mbit` (root) every peer runs
in its own network namespace behind a 100 Mbit link (deploy/home.py), as on a home Wi-Fi.

    python benchmarks/collaborative.py [--train-size 64] [--val-size 16] [--epochs 2] [--network 100mbit]
Writes benchmarks/results/collaborative.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".work" / "collaborative"
# (name, peers, mode, other pac-launch options)
CONFIGS = [
    ("1 peer", 1, "shuffle", []),
    ("2 peers, shuffle", 2, "shuffle", []),
    ("3 peers, shuffle", 3, "shuffle", []),
    ("3 peers, shuffle, rank 1 phase 1 only", 3, "shuffle", ["--shares", "1,0,1"]),
    ("3 peers, side-pipeline", 3, "side-pipeline", []),
    ("3 peers, replicated", 3, "replicated", []),
]


def run(name: str, peers: int, mode: str, extra: list[str], args: argparse.Namespace) -> dict:
    slug = name.replace(" ", "").replace(",", "-").replace("@", "-")
    out, cache = WORK / slug / "out", WORK / slug / "cache"
    shutil.rmtree(WORK / slug, ignore_errors=True)
    (WORK / slug).mkdir(parents=True)
    cmd = [sys.executable, "-m", "launcher.main", "--mode", mode, "--out", str(out), "--cache-dir", str(cache)]
    cmd += ["--epochs", str(args.epochs), "--train-size", str(args.train_size), "--val-size", str(args.val_size)]
    cmd += ["--model", args.model] if args.model else []
    cmd += extra
    started = time.perf_counter()
    if args.network:
        with_network(cmd, peers, args.network, WORK / slug)
    else:
        cmd += ["--local", str(peers)]
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
    wall = time.perf_counter() - started
    return measure(json.loads((out / "summary.json").read_text()), wall)


def with_network(cmd: list[str], peers: int, rate: str, work: Path, delay_ms: float = 0.0) -> None:
    """The run with every peer in its own network namespace, behind a `rate` link with `delay_ms` each way
    (deploy/home.py)."""
    sys.path.insert(0, str(HERE.parent / "deploy"))
    from home import Device, SimulatedHome

    from pac.net.auth import TOKEN_ENV, new_token

    env = {**os.environ, TOKEN_ENV: new_token(), "TQDM_DISABLE": "1"}
    threads = max(1, (os.cpu_count() or 1) // peers)
    with SimulatedHome([Device(f"device_{d}", rate=rate, delay_ms=delay_ms) for d in range(peers)]) as net:
        lines = []
        for d in range(peers):
            name = net.devices[d].name
            agent = [sys.executable, "-m", "pac.cli", "peer", "--listen", f"tcp://{net.address(d)}:29600"]
            agent += ["--name", name, "--threads", str(threads), "--work-dir", str(work / name)]
            net.run(d, agent, work / f"{name}.log", env=env)
            lines.append(f"{net.address(d)}:29600 name={name}")
        (work / "hosts.txt").write_text("\n".join(lines) + "\n")
        cmd = [*cmd, "--peers", str(work / "hosts.txt")]
        print("$", " ".join(cmd[2:]), f"(each peer behind {rate}, {delay_ms:g} ms)", flush=True)
        subprocess.run(cmd, check=True, env=env)


def measure(summary: dict, wall_seconds: float) -> dict:
    """The figures of one run from its summary.json."""
    peers = [p["summary"] for p in sorted(summary["peers"].values(), key=lambda p: p["rank"])]
    samples = sum(summary["peers"][next(iter(summary["peers"]))]["summary"]["split_sizes"].values())
    phase1 = max(p["phase1_seconds"] for p in peers)
    epochs = summary["epochs"]
    return {
        "peers": len(peers),
        "mode": summary["mode"],
        "plan": summary["plan"],
        "samples": samples,
        "phase1_seconds": phase1,
        "phase1_samples_per_s": samples / phase1,
        "phase1_bytes_per_sample": sum(p["phase1_bytes_sent"] for p in peers) / samples,
        "phase2_bytes_per_epoch": sum(p.get("phase2_bytes_sent", 0) for p in peers) / max(len(epochs), 1),
        "epoch_seconds": sorted(e["epoch_seconds"] for e in epochs)[len(epochs) // 2],
        "trainable_params": summary["trainable_params"],
        "final_metrics": {k: v for k, v in epochs[-1].items() if k.startswith("val_")},
        "wall_seconds": wall_seconds,
        "peak_rss_mb": [p["peak_rss_mb"] for p in peers],  # by rank
        "phase1_only": [bool(p.get("phase1_only")) for p in peers],
    }


def report(rows: dict[str, dict]) -> str:
    lines = [
        "| configuration | plan (layers per rank) | phase 1 samples/s | phase-1 MB sent per sample "
        "| phase-2 MB sent per epoch (data plane) | phase-2 s/epoch | peak RSS per rank (GB) | validation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        plan = ", ".join(f"{a}-{b - 1}" for a, b in r["plan"])
        metrics = ", ".join(f"{k[4:]} {v:.4f}" for k, v in r["final_metrics"].items())
        only = r.get("phase1_only") or [False] * len(r["plan"])
        peaks = ", ".join(
            f"{mb / 1024:.2f}" + (" (phase 1 only)" if alone else "")
            for mb, alone in zip(r.get("peak_rss_mb", []), only, strict=False)  # older rows have no peaks
        )
        lines.append(
            f"| {name} | {plan} | {r['phase1_samples_per_s']:.2f} | {r['phase1_bytes_per_sample'] / 1e6:.2f} "
            f"| {r['phase2_bytes_per_epoch'] / 1e6:.1f} | {r['epoch_seconds']:.1f} | {peaks or '—'} | {metrics} |"
        )
    first = next(iter(rows.values()))
    grads = first["trainable_params"] * 4
    lines += [
        "",
        f"Gradient all-reduce in shuffle and replicated mode (gloo, not counted above): {grads / 1e6:.1f} MB of "
        "fp32 gradients per step; a ring all-reduce sends 2(N-1)/N times that from every peer.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in zip(
        axes,
        ("phase1_samples_per_s", "phase1_bytes_per_sample", "epoch_seconds"),
        ("phase 1 throughput (samples/s)", "phase-1 bytes sent per sample", "phase-2 time per epoch (s)"),
        strict=True,
    ):
        ax.barh(names, [rows[n][key] / (1e6 if "bytes" in key else 1) for n in names])
        ax.set_title(title + (" [MB]" if "bytes" in key else ""))
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--val-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--configs", nargs="+", help=f"subset of: {'; '.join(c[0] for c in CONFIGS)}")
    parser.add_argument(
        "--network",
        metavar="RATE",
        help="run the multi-peer configurations with every peer in its own network namespace behind a RATE "
        "link, e.g. 100mbit (root; deploy/home.py)",
    )
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "collaborative.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    if not args.report:
        for name, peers, mode, extra in CONFIGS:
            if args.configs and name not in args.configs or (args.network and peers == 1):
                continue
            key = f"{name} @ {args.network}" if args.network else name
            rows[key] = run(key, peers, mode, extra, args)
            path.write_text(json.dumps(rows, indent=2) + "\n")
    ordered = {}  # each configuration, then its runs on a shaped network
    for name, *_ in CONFIGS:
        for key in (name, *sorted(r for r in rows if r.startswith(f"{name} @"))):
            if key in rows:
                ordered[key] = rows[key]
    setting = f"SmolLM2-135M-Instruct, BBC News, {args.train_size} + {args.val_size} samples, 128 tokens, 2 cores"
    table = report(ordered)
    (RESULTS / "collaborative.md").write_text(f"Setting: {setting}.\n\n{table}")
    plot(ordered, RESULTS / "collaborative.png")
    print(table)


if __name__ == "__main__":
    main()
