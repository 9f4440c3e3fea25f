"""`pac-launch --local N`: N `pac peer` processes on this machine, on loopback ports."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

from pac.errors import PacError
from pac.net.auth import TOKEN_ENV
from pac.net.hosts import PeerHost


def ephemeral_port_floor() -> int:
    """The lowest port the OS hands out to outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS and Windows start higher (49152)


def free_port() -> int:
    """A free loopback port below the ephemeral range.

    A port the OS gave out by bind(0) is an ephemeral one, and a connect to it before the peer binds it can
    pick the same port as its source and connect the socket to itself (TCP simultaneous open): the
    coordinator then fails a handshake with its own socket. A port below the range is never a source port.
    """
    floor = ephemeral_port_floor()
    for port in random.sample(range(max(1024, floor - 10000), floor), 64):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken
                continue
            return port
    raise PacError(f"no free loopback port below {floor}: stop some local servers, or list peers in --peers")


class LocalPeers:
    """Start, and always stop, N peer agents sharing this machine's cores."""

    def __init__(
        self,
        count: int,
        token: str,
        log_dir: Path,
        threads: int | None = None,
        coordinator_timeout: float = 60.0,
        once: bool = True,
    ):
        """`once`: each peer serves one run and exits (`pac peer --once`); otherwise they are agents that start
        afresh after every run, which a run that re-plans around a lost peer needs (stop() ends them)."""
        if count < 1:
            raise ValueError("--local needs at least one peer")
        self.count, self.token, self.log_dir, self.once = count, token, Path(log_dir), once
        self.threads = threads or max(1, (os.cpu_count() or 1) // count)
        self.coordinator_timeout = coordinator_timeout
        self.procs: list[subprocess.Popen] = []

    def start(self) -> list[PeerHost]:
        hosts = [PeerHost("127.0.0.1", free_port(), f"local-{i}", threads=self.threads) for i in range(self.count)]
        for host in hosts:
            self.launch(host)
        return hosts

    def launch(self, host: PeerHost) -> subprocess.Popen:
        """Start the agent of `host` (a loopback port and a name; its work directory under log_dir), or start it
        again after it was killed; stop() ends it with the others."""
        work = self.log_dir / host.name
        work.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pac.cli",
            "peer",
            "--listen",
            host.endpoint,
            "--name",
            host.name,
            "--threads",
            str(self.threads),
            "--work-dir",
            str(work),
            "--coordinator-timeout",
            str(self.coordinator_timeout),
            *(["--once"] if self.once else []),
            "--no-advertise",  # this launch's own peers: nobody else should find them
        ]
        env = {**os.environ, TOKEN_ENV: self.token, "TQDM_DISABLE": "1"}
        with (work / "stdout.log").open("w") as log:
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        return self.procs[-1]

    def stop(self, grace: float = 15.0) -> list[int]:
        """Wait up to `grace` seconds in all for the peers to exit after the coordinator's shutdown (agents, which
        would wait for the next run, are told to stop at once); kill what is left. Returns exit codes."""
        if not self.once:
            for proc in self.procs:
                proc.terminate()
        deadline = time.monotonic() + grace
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes
