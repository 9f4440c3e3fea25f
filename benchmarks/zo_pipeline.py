"""Zeroth-order training pipelined over devices (issue 24, point 4): bytes per step, steps per second and memory
per device, against one device, on SmolLM2-135M-Instruct and BBC News classification.

    1 device    `pac train --method zo`
    N peers     `pac-launch --local N --method zo` (mode `pipeline`: each peer a layer range, forward only)
    @ RATE      the same with every peer in its own network namespace behind a RATE link and DELAY ms each way
                (deploy/home.py, root), as on a home network

From each run's summary: steps per second over the training epochs (evaluation excluded); the bytes the steps
put on the data plane (each stage but the last sends its hidden states, the last sends 2q losses; evaluation and
the final gathering of the adapter are not counted); against the hidden states' size, 2q x batch x tokens x
width x 4 bytes per stage boundary; every peer's peak RSS; and the largest difference between the adapter and one
device's (the same seed: they should agree to float rounding).

The peers share this machine's two cores (each process gets cores / N threads), so steps per second here shows
the pipeline's overhead, not a home's speed-up; the bytes are what a home's links would carry.

    python benchmarks/zo_pipeline.py [--network 100mbit --delay-ms 5] [--report]
Writes benchmarks/results/zo_pipeline.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".work" / "zo_pipeline"
sys.path.insert(0, str(HERE))
from collaborative import with_network  # noqa: E402

PEERS = [1, 2, 3]
HIDDEN = 576  # SmolLM2-135M's width


def common(args: argparse.Namespace) -> list[str]:
    options = ["--method", "zo", "--task", "classify", "--epochs", "1", "--batch-size", str(args.batch_size)]
    options += ["--train-size", str(args.train_size), "--val-size", str(args.val_size)]
    options += ["--perturbations", str(args.q), "--max-length", str(args.max_length), "--lr", "1e-3"]
    return options


def run(peers: int, args: argparse.Namespace) -> dict:
    key = f"{peers} peers" if peers > 1 else "1 device"
    if args.network and peers > 1:
        key += f" @ {args.network}, {args.delay_ms:g} ms"
    work = WORK / _slug(key)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = work / "out"
    where = ["--out", str(out), "--cache-dir", str(work / "cache")]
    started = time.perf_counter()
    if peers == 1:
        subprocess.run([sys.executable, "-m", "pac.cli", "train", *where, *common(args)], check=True)
    else:
        cmd = [sys.executable, "-m", "launcher.main", *where, *common(args)]
        if args.network:
            with_network(cmd, peers, args.network, work, delay_ms=args.delay_ms)
        else:
            subprocess.run([*cmd, "--local", str(peers)], check=True)
    wall = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    difference = adapter_difference(out, WORK / _slug("1 device") / "out") if peers > 1 else None
    return {"key": key, **measure(summary, out), "wall_seconds": wall, "adapter_max_difference": difference}


def measure(summary: dict, out: Path) -> dict:
    """The figures of one run from its summary.json (and, for one device, its metrics log)."""
    epochs = summary["epochs"]
    peers = sorted((p["summary"] for p in summary.get("peers", {}).values()), key=lambda p: p["rank"])
    if peers:
        steps = peers[0]["steps_taken"]
        per_rank = [p["step_bytes_sent"] / p["steps_taken"] for p in peers]
        rss = [p["peak_rss_mb"] for p in peers]
    else:
        steps = sum(1 for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line)
        per_rank, rss = [0.0], [summary["peak_rss_mb"]]
    return {
        "peers": len(peers) or 1,
        "plan": summary.get("plan"),
        "steps": steps,
        "steps_per_s": steps / sum(e["epoch_seconds"] for e in epochs),
        "bytes_per_step": sum(per_rank),
        "bytes_per_step_by_rank": per_rank,
        "peak_rss_mb_by_rank": rss,
        "val_accuracy": epochs[-1].get("val_accuracy"),
    }


def adapter_difference(out: Path, reference: Path) -> float | None:
    """The largest absolute difference between two runs' adapter tensors (None without the reference)."""
    from safetensors.torch import load_file

    if not (reference / "adapter_model.safetensors").exists():
        return None
    ours, theirs = (load_file(d / "adapter_model.safetensors") for d in (out, reference))
    return max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)


def report(rows: dict[str, dict], args: argparse.Namespace) -> str:
    copies = 2 * args.q
    lines = [
        f"Setting: SmolLM2-135M-Instruct, BBC News classification, {args.train_size} training samples, batch "
        f"{args.batch_size}, q = {args.q} ({copies} copies of each batch in one forward), at most {args.max_length} "
        "tokens, 1 epoch, 2 cores shared by every peer.",
        "",
        "| configuration | layers per rank | steps/s | MB sent per step (all ranks) | per rank (bytes) "
        "| tokens per row implied | peak RSS per rank | adapter vs one device |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        plan = ", ".join(f"{a}-{b - 1}" for a, b in r["plan"]) if r["plan"] else "all"
        by_rank = ", ".join(f"{b:,.0f}" for b in r["bytes_per_step_by_rank"])
        tokens = r["bytes_per_step_by_rank"][0] / (copies * args.batch_size * HIDDEN * 4) if r["peers"] > 1 else None
        rss = ", ".join(f"{m / 1024:.2f} GB" for m in r["peak_rss_mb_by_rank"])
        diff = r.get("adapter_max_difference")
        lines.append(
            f"| {name} | {plan} | {r['steps_per_s']:.3f} | {r['bytes_per_step'] / 1e6:.2f} | {by_rank} "
            f"| {'—' if tokens is None else f'{tokens:.1f}'} | {rss} | {'—' if diff is None else f'{diff:.1e}'} |"
        )
    lines += [
        "",
        f"Each stage but the last sends its hidden states: {copies} copies x {args.batch_size} rows x T tokens x "
        f"{HIDDEN} floats x 4 bytes per step (T: the batch's padded length, implied above from the bytes); the last "
        f"stage sends {copies} losses to each other stage. No gradient and no weight crosses the network during "
        "training; the adapter (A and B of every layer) goes to rank 0 once, at the end. A data-parallel run would "
        "all-reduce every trainable tensor's gradient each step instead.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    panels = [
        ("steps per second", [rows[n]["steps_per_s"] for n in names]),
        ("MB sent per step (all ranks)", [rows[n]["bytes_per_step"] / 1e6 for n in names]),
        ("largest peak RSS of a rank (GB)", [max(rows[n]["peak_rss_mb_by_rank"]) / 1024 for n in names]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.barh(names, values)
        ax.set_title(title)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle("Zeroth-order LoRA-FA pipelined over devices (SmolLM2-135M-Instruct)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=32)
    parser.add_argument("--val-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--q", type=int, default=2, help="perturbations per step")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--network", metavar="RATE", help="peers behind RATE links in namespaces, e.g. 100mbit")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="with --network: one-way delay per link")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "zo_pipeline.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    if not args.report:
        for peers in PEERS:
            if args.network and peers == 1 and "1 device" in rows:
                continue
            row = run(peers, args)
            rows[row.pop("key")] = row
            path.write_text(json.dumps(rows, indent=2) + "\n")
    table = report(rows, args)
    (RESULTS / "zo_pipeline.md").write_text(table)
    plot(rows, RESULTS / "zo_pipeline.png")
    print(table)


def _slug(key: str) -> str:
    return key.replace(" ", "").replace(",", "-").replace("@", "-")


if __name__ == "__main__":
    main()
