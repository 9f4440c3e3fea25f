"""This process's CPU as a cgroup quota sets it (a container's --cpus, a simulated device's share): light, so
that every `pac` command can size torch's threads before anything heavy is imported."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def cpu_share() -> float | None:
    """The cores this process may use under a cgroup CPU quota (v1 cpu.cfs_quota_us or v2 cpu.max), or None:
    two devices of one machine in different groups measure differently, so their profiles are kept apart."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            group = Path("/sys/fs/cgroup") / controllers.split(",")[0]
            # A Docker container on cgroup v1 sees its own group mounted at the root, while /proc/self/cgroup
            # still names the host's path (/docker/<id>), which does not exist inside.
            if (group / path.lstrip("/")).is_dir():
                group = group / path.lstrip("/")
            quota, period = (group / "cpu.cfs_quota_us"), (group / "cpu.cfs_period_us")
            if quota.exists() and int(quota.read_text()) > 0:
                return int(quota.read_text()) / int(period.read_text())
        elif controllers == "":  # cgroup v2: "max 100000" or "50000 100000"
            limit = Path("/sys/fs/cgroup") / path.lstrip("/") / "cpu.max"
            if limit.exists() and not limit.read_text().startswith("max"):
                quota_us, period_us = limit.read_text().split()
                return int(quota_us) / int(period_us)
    return None


def quota_threads() -> int | None:
    """Torch threads for this process under a CPU quota: one per core of the quota, rounded up, where that is
    fewer than torch would start (one per visible core); None otherwise. Threads beyond the quota are throttled
    together every period: a forward ran 21-33% slower with 2 threads than with 1 under quotas of 0.25-1.0
    cores (benchmarks/results/threads_under_quota.md)."""
    share = cpu_share()
    if share is None:
        return None
    wanted = max(1, math.ceil(share - 1e-6))
    return wanted if wanted < torch.get_num_threads() else None
