"""The simulated home (deploy/home.py): a described file of devices brought up as namespaces, TAP links with a
delay relay and tc tbf, and cgroup v1 CPU and memory limits; a small real run on it; everything gone after."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
from home import CGROUPS, Device, SimulatedHome, read_home  # noqa: E402

from launcher.main import main as launch  # noqa: E402
from pac.errors import PacError  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ECHO = """
import socket
server = socket.create_server(("0.0.0.0", 7777))
while True:
    conn, _ = server.accept()
    while data := conn.recv(1 << 16):
        conn.sendall(data)
"""
SPIN = """
import os, time
end = time.monotonic() + 2
while time.monotonic() < end:
    pass
print(os.times().user + os.times().system)
"""


def _can_build_a_home() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("ip") or not shutil.which("tc") or not Path("/dev/net/tun").exists():
        return "needs ip, tc and /dev/net/tun"
    if not (CGROUPS / "cpu" / "cgroup.procs").exists() or not (CGROUPS / "memory" / "cgroup.procs").exists():
        return "needs cgroup v1 cpu and memory controllers"
    return None


def test_the_bundled_home_file_reads_and_bad_ones_say_what_is_wrong(tmp_path):
    devices = read_home(DEPLOY / "home.toml")
    assert [d.name for d in devices] == ["desktop", "laptop", "phone"]
    assert devices[2] == Device("phone", cpus=0.25, memory=2 * 2**30, rate="20mbit", delay_ms=20)
    bad = tmp_path / "bad.toml"
    for text, complaint in [
        ("", "no \\[\\[device\\]\\] tables"),
        ('[[device]]\nname = "a"\nspeed = 2\n', "unknown \\['speed'\\]"),
        ('[[device]]\nname = "a"\nmemory = "lots"\n', "device a:"),
        ('[[device]]\nname = "a"\ncpus = 0\n', "cpus must be above 0"),
        ('[[device]]\nname = "a"\n[[device]]\nname = "a"\n', "two devices share a name"),
        ("[[device]\n", "cannot read the home file"),
    ]:
        bad.write_text(text)
        with pytest.raises(PacError, match=complaint):
            read_home(bad)


def _round_trip(address: str) -> float:
    with socket.create_connection((address, 7777), timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            conn.sendall(b"x")
            conn.recv(1)
            times.append(time.perf_counter() - started)
    return min(times)


@pytest.mark.skipif(_can_build_a_home() is not None, reason=str(_can_build_a_home()))
def test_a_home_delays_limits_and_cleans_up_and_a_small_run_trains_on_it(tiny_llama, topic_jsonl, tmp_path, capsys):
    devices = [
        Device("desktop", cpus=1.0, memory=3 * 2**30, rate="100mbit", delay_ms=0),
        Device("phone", cpus=0.5, memory=2 * 2**30, rate="20mbit", delay_ms=10),
    ]
    tag = f"th{os.getpid() % 10000}"
    profiles = tmp_path / "profiles"
    env = {**os.environ, "PAC_JOIN_TOKEN": "t" * 32, "PAC_PROFILES": str(profiles), "TQDM_DISABLE": "1"}
    with SimulatedHome(devices, tag=tag) as home:
        for d in range(2):
            home.run(d, [sys.executable, "-c", ECHO], tmp_path / f"echo{d}.log")
        time.sleep(1.0)
        desk, phone = _round_trip(home.address(0)), _round_trip(home.address(1))
        assert desk < 0.005 and 0.020 <= phone < 0.060  # 10 ms each way through the phone's relay
        spin = home.run(1, [sys.executable, "-c", SPIN], tmp_path / "spin.log")
        spin.wait(timeout=30)
        assert 0.7 <= float((tmp_path / "spin.log").read_text()) <= 1.3  # 2 s of wall time at half a core
        assert (home.cgroup("memory", 1) / "memory.limit_in_bytes").read_text().strip() == str(2 * 2**30)
        hosts = home.start_peers(tmp_path / "peers", env)
        os.environ["PAC_JOIN_TOKEN"] = env["PAC_JOIN_TOKEN"]
        try:
            argv = ["--peers", str(hosts), "--model", str(tiny_llama), "--data", str(topic_jsonl), "--epochs", "1"]
            argv += ["--out", str(tmp_path / "out"), "--val-size", "12", "--reduction", "4", "--join-timeout", "90"]
            assert launch(argv) == 0
        finally:
            del os.environ["PAC_JOIN_TOKEN"]
        shown = capsys.readouterr().out
        assert "phone: " in shown and "[pac-launch] done" in shown
        # Its cgroups' quota and memory limit, not the host's cores and memory.
        assert re.search(
            r"phone joined: \d+ cores \(0\.5 by its CPU quota\), 2\.0 GiB \(2\.0 by its memory limit\)", shown
        )
        assert (tmp_path / "out" / "adapter_model.safetensors").exists()
        # One machine, two CPU quotas: each device keeps its own profile.
        assert len(list(profiles.glob("*.json"))) == 2
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert tag not in names and tag not in links
    if shutil.which("iptables"):  # the rule that lets devices through a firewall's FORWARD chain (Docker's) is gone
        assert tag not in subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
    assert not list((CGROUPS / "cpu").glob(f"{tag}-*")) and not list((CGROUPS / "memory").glob(f"{tag}-*"))


@pytest.mark.skipif(_can_build_a_home() is not None, reason=str(_can_build_a_home()))
def test_the_home_command_runs_a_command_on_the_home_and_takes_it_down(tmp_path):
    home_file = tmp_path / "home.toml"
    home_file.write_text('[[device]]\nname = "solo"\ncpus = 0.5\nrate = "50mbit"\ndelay_ms = 2\n')
    done = subprocess.run(
        [
            sys.executable,
            str(DEPLOY / "home.py"),
            str(home_file),
            "--work",
            str(tmp_path / "w"),
            "--",
            "cat",
            "{hosts}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "name=solo" in done.stdout and "home up: solo" in done.stdout and "home down" in done.stdout
    assert not list((CGROUPS / "cpu").glob("ph*-solo"))
