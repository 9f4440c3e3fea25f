"""Torch threads on a device whose CPU is capped by a quota (a phone-class share of a core, a container's
--cpus): phase 1's backbone forward, timed with each thread count, in a cgroup v1 `cpu` group of each quota
(issue "A planner for uneven home devices", point 6). torch starts one thread per visible core, so a process
held to a quarter of a core still runs two threads, which the quota then stops together every period.

    python benchmarks/threads_under_quota.py [--quotas 0.25 0.5 1.0] [--samples 16] [--max-length 64]
Writes benchmarks/results/threads_under_quota.{json,md}. Needs root (cgroup v1 cpu controller).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CGROUP = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000


def worker(threads: int, samples: int, max_length: int, repeats: int) -> None:
    """In the cgroup: the bundled model's forward over `samples` token sequences, the median of `repeats`."""
    import torch

    from pac.models.backbone import load_backbone
    from pac.models.loading import resolve_model

    torch.set_num_threads(threads)
    backbone = load_backbone(resolve_model(None))
    ids = torch.randint(
        0, backbone.config.vocab_size, (samples, max_length), generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones_like(ids)
    times = []
    with torch.inference_mode():
        backbone(ids[:2], mask[:2])  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            for start in range(0, samples, 8):  # phase 1's micro-batches
                backbone(ids[start : start + 8], mask[start : start + 8])
            times.append(time.perf_counter() - started)
    print(json.dumps({"seconds_per_sample": sorted(times)[len(times) // 2] / samples}))


def measure(quota: float, threads: int, args: argparse.Namespace) -> float:
    group = CGROUP / f"pac-threads-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(int(quota * PERIOD_US)))
        argv = [sys.executable, __file__, "--worker", str(threads), str(args.samples), str(args.max_length)]
        script = f'echo $$ > {group}/cgroup.procs && exec "$@"'
        out = subprocess.run(["sh", "-c", script, "sh", *argv], check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])["seconds_per_sample"]
    finally:
        group.rmdir()


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        threads, samples, max_length = (int(a) for a in sys.argv[2:5])
        worker(threads, samples, max_length, repeats=3)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quotas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    rows = []
    for quota in args.quotas:
        for threads in args.threads:
            seconds = measure(quota, threads, args)
            rows.append({"quota": quota, "threads": threads, "seconds_per_sample": seconds})
            print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "threads_under_quota.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        f"Phase 1's forward (SmolLM2-135M-Instruct, micro-batches of 8 x {args.max_length} tokens, "
        f"{args.samples} samples, median of 3) in a cgroup v1 cpu group of each quota, on this "
        f"{os.cpu_count()}-core machine. Regenerate: `python benchmarks/threads_under_quota.py` (root).",
        "",
        "| CPU quota (cores) | torch threads | ms per sample | against 1 thread |",
        "|---|---|---|---|",
    ]
    for row in rows:
        one = next(r for r in rows if r["quota"] == row["quota"] and r["threads"] == 1)["seconds_per_sample"]
        lines.append(
            f"| {row['quota']} | {row['threads']} | {row['seconds_per_sample'] * 1e3:.1f} "
            f"| {row['seconds_per_sample'] / one:.2f}x |"
        )
    (RESULTS / "threads_under_quota.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
