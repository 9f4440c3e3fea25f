"""What this process's cgroups allow it: its CPU quota (a container's --cpus, a simulated device's share) and its
memory limit (--memory). Light, so that every `pac` command can size torch's threads before anything heavy is
imported."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def _groups() -> list[tuple[list[str], Path]]:
    """This process's cgroups: (controllers, directory) per line of /proc/self/cgroup; cgroup v2's line has no
    controllers."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    groups = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        names = [c for c in controllers.split(",") if c]
        root = Path("/sys/fs/cgroup") / names[0] if names else Path("/sys/fs/cgroup")
        # A Docker container on cgroup v1 sees its own group mounted at the root, while /proc/self/cgroup
        # still names the host's path (/docker/<id>), which does not exist inside.
        inside = root / path.lstrip("/")
        groups.append((names, inside if inside.is_dir() else root))
    return groups


def cpu_share() -> float | None:
    """The cores this process may use under a cgroup CPU quota (v1 cpu.cfs_quota_us or v2 cpu.max), or None:
    two devices of one machine in different groups measure differently, so their profiles are kept apart."""
    for controllers, group in _groups():
        if "cpu" in controllers:
            quota, period = (group / "cpu.cfs_quota_us"), (group / "cpu.cfs_period_us")
            if quota.exists() and int(quota.read_text()) > 0:
                return int(quota.read_text()) / int(period.read_text())
        elif not controllers:  # cgroup v2: "max 100000" or "50000 100000"
            limit = group / "cpu.max"
            if limit.exists() and not limit.read_text().startswith("max"):
                quota_us, period_us = limit.read_text().split()
                return int(quota_us) / int(period_us)
    return None


def memory_limit(physical: int) -> int | None:
    """Bytes this process's cgroup lets it use (v1 memory.limit_in_bytes, v2 memory.max), or None where that is
    no less than the machine's `physical` memory (v1 writes "no limit" as a number near 2**63)."""
    for controllers, group in _groups():
        name = "memory.limit_in_bytes" if "memory" in controllers else "memory.max" if not controllers else None
        if name is not None and (group / name).exists():
            text = (group / name).read_text().strip()
            if text != "max" and int(text) < physical:
                return int(text)
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
