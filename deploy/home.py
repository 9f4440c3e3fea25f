"""A simulated home on one Linux machine, described in one file (deploy/home.toml). Needs root.

    python deploy/home.py deploy/home.toml                       # up; `pac peer` on every device; Ctrl-C: down
    python deploy/home.py deploy/home.toml -- pac-launch --peers {hosts} --epochs 1   # up, run it, down

Each device is a network namespace whose network card is a TAP device; a relay (deploy/tap_relay.py) joins it
to a TAP port of the home's bridge, holding each frame `delay_ms` (tc netem, the usual tool, is missing from
this kernel), and tc tbf limits both directions to `rate`. Its processes run in a cgroup v1 `cpu` group with a
quota of `cpus` cores and a `memory` group capped at `memory`. The coordinator stays in this namespace, on the
bridge. With a command, `{hosts}` in it becomes the path of a hosts file listing the devices' peers, and the
peers share $PAC_JOIN_TOKEN (made up when unset). Everything the home creates — namespaces, interfaces,
relays, cgroups, processes — is removed on exit, on failure and on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib

from pac.errors import PacError
from pac.net.hosts import parse_size

HERE = Path(__file__).resolve().parent
PREFIX = "10.78.0"
CGROUPS = Path("/sys/fs/cgroup")
PEER_PORT = 29600
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Device:
    name: str
    cpus: float | None = None  # cores; None: no quota
    memory: int | None = None  # bytes; None: no cap
    rate: str = "1gbit"
    delay_ms: float = 0.0


def read_home(path: str | os.PathLike[str]) -> list[Device]:
    """The devices of a home file; a bad entry is an error naming it and saying what is expected."""
    try:
        spec = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PacError(f"cannot read the home file {path}: {exc}") from None
    entries = spec.get("device")
    if not isinstance(entries, list) or not entries:
        raise PacError(f"{path}: no [[device]] tables; see deploy/home.toml for the form")
    devices = []
    for i, entry in enumerate(entries, 1):
        unknown = set(entry) - {"name", "cpus", "memory", "rate", "delay_ms"}
        name = entry.get("name")
        if unknown or not isinstance(name, str) or not name.isidentifier():
            raise PacError(
                f"{path}: device {i}: needs a name (letters, digits, _) and only name, cpus, memory, rate, delay_ms"
                + (f"; unknown {sorted(unknown)}" if unknown else "")
            )
        try:
            cpus = None if entry.get("cpus") is None else float(entry["cpus"])
            memory = None if entry.get("memory") is None else parse_size(str(entry["memory"]))
            delay = float(entry.get("delay_ms", 0.0))
        except (ValueError, PacError) as exc:
            raise PacError(f"{path}: device {name}: {exc}") from None
        if (cpus is not None and cpus <= 0) or delay < 0:
            raise PacError(f"{path}: device {name}: cpus must be above 0 and delay_ms at least 0")
        devices.append(Device(name, cpus, memory, str(entry.get("rate", "1gbit")), delay))
    if len({d.name for d in devices}) != len(devices):
        raise PacError(f"{path}: two devices share a name")
    return devices


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise PacError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


class SimulatedHome:
    def __init__(self, devices: list[Device], tag: str | None = None):
        self.devices = devices
        self.tag = tag or f"ph{os.getpid() % 100000}"  # interface names stay under 16 characters
        self.bridge = f"{self.tag}br"
        self.procs: list[subprocess.Popen] = []
        self.relays: list[subprocess.Popen] = []
        self.cgroups: list[Path] = []
        self.forwarding = False  # whether our FORWARD rule is in iptables (removed on exit)

    @property
    def _forward_rule(self) -> list[str]:
        return ["-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]

    @property
    def coordinator_address(self) -> str:
        return f"{PREFIX}.1"

    def address(self, device: int) -> str:
        return f"{PREFIX}.{11 + device}"

    def namespace(self, device: int) -> str:
        return f"{self.tag}-{self.devices[device].name}"

    def cgroup(self, controller: str, device: int) -> Path:
        return CGROUPS / controller / f"{self.tag}-{self.devices[device].name}"

    # ------------------------------------------------------------------ up and down
    def __enter__(self) -> SimulatedHome:
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{self.coordinator_address}/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            if shutil.which("iptables"):
                # Docker sets the FORWARD policy to DROP and makes bridges filter through it (br_netfilter): let
                # the home's devices reach each other across the bridge, as Docker does for its own.
                _run("iptables", "-I", "FORWARD", *self._forward_rule)
                self.forwarding = True
            for d in range(len(self.devices)):
                self._device_up(d)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _device_up(self, d: int) -> None:
        device, ns = self.devices[d], self.namespace(d)
        host_tap, dev_tap = f"{self.tag}h{d}", f"{self.tag}d{d}"
        _run("ip", "netns", "add", ns)
        for tap in (host_tap, dev_tap):
            _run("ip", "tuntap", "add", "mode", "tap", "name", tap)
        _run("ip", "link", "set", dev_tap, "netns", ns)
        _run("ip", "link", "set", host_tap, "master", self.bridge)
        _run("ip", "link", "set", host_tap, "up")
        _run("ip", "-n", ns, "addr", "add", f"{self.address(d)}/24", "dev", dev_tap)
        _run("ip", "-n", ns, "link", "set", dev_tap, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        relay = subprocess.Popen(
            [sys.executable, str(HERE / "tap_relay.py"), host_tap, ns, dev_tap, str(device.delay_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.relays.append(relay)
        if relay.stdout.readline().strip() != "ready":
            raise PacError(f"the link relay of {device.name} did not start: {relay.stderr.read().strip()}")
        # Both directions: the device's uplink (its card, in its namespace) and its downlink (the bridge port).
        for where, tap in ((["ip", "netns", "exec", ns], dev_tap), ([], host_tap)):
            _run(*where, "tc", "qdisc", "replace", "dev", tap, "root", "tbf", "rate", device.rate,
                 "burst", "64kb", "latency", "100ms")  # fmt: skip
        if device.cpus is not None:
            group = self._make_cgroup("cpu", d)
            (group / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(int(device.cpus * CPU_PERIOD_US)))
        if device.memory is not None:
            (self._make_cgroup("memory", d) / "memory.limit_in_bytes").write_text(str(device.memory))

    def _make_cgroup(self, controller: str, d: int) -> Path:
        group = self.cgroup(controller, d)
        group.mkdir()
        self.cgroups.append(group)
        return group

    def __exit__(self, *exc: object) -> None:
        for proc in [*self.procs, *self.relays]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.procs, *self.relays]:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for group in reversed(self.cgroups):
            for _ in range(50):  # a killed process leaves its cgroup a moment after it is reaped
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        for d in range(len(self.devices)):
            subprocess.run(["ip", "netns", "del", self.namespace(d)], capture_output=True)
            subprocess.run(["ip", "link", "del", f"{self.tag}h{d}"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        if self.forwarding:
            subprocess.run(["iptables", "-D", "FORWARD", *self._forward_rule], capture_output=True)
            self.forwarding = False

    # ------------------------------------------------------------------ processes
    def run(self, device: int, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a process on a device: in its namespace and cgroups (joined before it starts; stopped on exit)."""
        groups = [str(self.cgroup(c, device) / "cgroup.procs") for c in ("cpu", "memory")]
        joins = " && ".join(f'echo $$ > "{g}"' for g in groups if Path(g).parent.exists()) or "true"
        # nsenter enters the network namespace alone; `ip netns exec` would also remount /sys, hiding the cgroup
        # files a process reads its CPU quota from (pac.runtime.profiler.cpu_share).
        netns = f"--net=/var/run/netns/{self.namespace(device)}"
        wrapped = ["sh", "-c", f'{joins} && exec "$@"', "sh", "nsenter", netns, *argv]
        with log.open("w") as out:
            proc = subprocess.Popen(wrapped, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        return proc

    def start_peers(self, work: Path, env: dict[str, str]) -> Path:
        """`pac peer` on every device; returns a hosts file that lists them. Each peer reads its memory cap from its
        cgroup, as one in a container does (pac.runtime.cgroup.memory_limit)."""
        work.mkdir(parents=True, exist_ok=True)
        lines = []
        for d, device in enumerate(self.devices):
            agent = [
                sys.executable,
                "-m",
                "pac.cli",
                "peer",
                "--listen",
                f"tcp://{self.address(d)}:{PEER_PORT}",
                "--name",
                device.name,
            ]
            agent += ["--work-dir", str(work / device.name)]
            self.run(d, agent, work / f"{device.name}.log", env)
            lines.append(f"{self.address(d)}:{PEER_PORT} name={device.name}")
        hosts = work / "hosts.txt"
        hosts.write_text("\n".join(lines) + "\n")
        return hosts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("home", help="the home file (see deploy/home.toml)")
    parser.add_argument("--work", help="where the peers' logs and outputs go (default: a temporary folder)")
    args = parser.parse_args(own)
    if os.geteuid() != 0:
        print("home: needs root (network namespaces, tc, cgroups)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        devices = read_home(args.home)
        work = Path(args.work or tempfile.mkdtemp(prefix="pac-home-"))
        work.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PAC_JOIN_TOKEN": os.environ.get("PAC_JOIN_TOKEN") or secrets.token_hex(16)}
        with SimulatedHome(devices) as home:
            hosts = home.start_peers(work, env)
            print(f"home up: {', '.join(d.name for d in devices)}; hosts file {hosts}; logs in {work}", flush=True)
            if command:
                return subprocess.run([part.replace("{hosts}", str(hosts)) for part in command], env=env).returncode
            while True:
                time.sleep(3600)
    except PacError as exc:
        print(f"home: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        print("home down", flush=True)


if __name__ == "__main__":
    sys.exit(main())
