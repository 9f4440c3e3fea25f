"""`pac-launch --local N`: N `pac peer` processes on this machine, on loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from pac.net.auth import TOKEN_ENV
from pac.net.hosts import PeerHost


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPeers:
    """Start, and always stop, N peer agents sharing this machine's cores."""

    def __init__(
        self, count: int, token: str, log_dir: Path, threads: int | None = None, coordinator_timeout: float = 60.0
    ):
        if count < 1:
            raise ValueError("--local needs at least one peer")
        self.count, self.token, self.log_dir = count, token, Path(log_dir)
        self.threads = threads or max(1, (os.cpu_count() or 1) // count)
        self.coordinator_timeout = coordinator_timeout
        self.procs: list[subprocess.Popen] = []

    def start(self) -> list[PeerHost]:
        hosts = []
        env = {**os.environ, TOKEN_ENV: self.token, "TQDM_DISABLE": "1"}
        for i in range(self.count):
            name, port = f"local-{i}", free_port()
            work = self.log_dir / name
            work.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "pac.cli",
                "peer",
                "--listen",
                f"tcp://127.0.0.1:{port}",
                "--name",
                name,
                "--threads",
                str(self.threads),
                "--work-dir",
                str(work),
                "--coordinator-timeout",
                str(self.coordinator_timeout),
            ]
            with (work / "stdout.log").open("w") as log:
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            hosts.append(PeerHost("127.0.0.1", port, name, threads=self.threads))
        return hosts

    def stop(self, grace: float = 15.0) -> list[int]:
        """Wait for the peers to exit after the coordinator's shutdown; kill what is left. Returns exit codes."""
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=grace))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes
