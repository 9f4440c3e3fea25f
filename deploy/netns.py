"""A simulated home network on one Linux machine: one network namespace per device, a bridge for the
"Wi-Fi", and a token-bucket rate limit (tc tbf) on every device's link. Needs root.

    with HomeNetwork(3, rate="100mbit") as net:          # devices 10.77.0.11 .. 10.77.0.13
        net.run(0, ["pac", "peer", ...])                   # a process inside device 0's namespace
        ...                                                # the coordinator stays in this namespace (10.77.0.1)

Everything the network creates (namespaces, links, processes it started) is removed on exit, even
when the body fails. (tc netem, which would add delay, is missing from this machine's kernel; a rate
limit is what the traffic figures need.)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

PREFIX = "10.77.0"
BRIDGE = "pacbr0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class HomeNetwork:
    def __init__(self, devices: int, rate: str = "100mbit", tag: str | None = None):
        self.devices, self.rate = devices, rate
        self.tag = tag or f"pac{os.getpid() % 10000}"
        self.procs: list[subprocess.Popen] = []

    @property
    def coordinator_address(self) -> str:
        return f"{PREFIX}.1"

    def address(self, device: int) -> str:
        return f"{PREFIX}.{11 + device}"

    def namespace(self, device: int) -> str:
        return f"{self.tag}-dev{device}"

    def __enter__(self) -> HomeNetwork:
        try:
            _ip("link", "add", BRIDGE, "type", "bridge")
            _ip("addr", "add", f"{self.coordinator_address}/24", "dev", BRIDGE)
            _ip("link", "set", BRIDGE, "up")
            for d in range(self.devices):
                ns, host_end, dev_end = self.namespace(d), f"{self.tag}h{d}", f"{self.tag}d{d}"
                _ip("netns", "add", ns)
                _ip("link", "add", host_end, "type", "veth", "peer", "name", dev_end)
                _ip("link", "set", dev_end, "netns", ns)
                _ip("link", "set", host_end, "master", BRIDGE)
                _ip("link", "set", host_end, "up")
                _ip("-n", ns, "addr", "add", f"{self.address(d)}/24", "dev", dev_end)
                _ip("-n", ns, "link", "set", dev_end, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                # Both directions of the device's link: its uplink (inside the namespace) and its
                # downlink (the bridge side).
                for where, dev in ((["ip", "netns", "exec", ns], dev_end), ([], host_end)):
                    tbf = ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", self.rate]
                    subprocess.run([*where, *tbf, "burst", "64kb", "latency", "50ms"], check=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def run(self, device: int, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a process inside a device's namespace (stopped on exit)."""
        with log.open("w") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace(device), *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.procs.append(proc)
        return proc

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for d in range(self.devices):
            subprocess.run(["ip", "netns", "del", self.namespace(d)], capture_output=True)
            subprocess.run(["ip", "link", "del", f"{self.tag}h{d}"], capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
