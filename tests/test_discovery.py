"""Discovery over mDNS with real zeroconf instances on loopback: `pac peer` advertises itself (never its token),
`pac-launch --discover` lists what answers, checks each peer's encrypted handshake, lists the others as refused,
lets the user take some or all, and writes the hosts file it used."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from launcher.local import free_port
from launcher.main import _discovered_hosts
from launcher.main import main as launch
from pac.errors import PacError
from pac.net.discovery import Advertisement, discover
from pac.net.hosts import read_hosts


def test_an_advertisement_is_found_with_its_port_and_summary_and_gone_once_closed():
    name = f"laptop-{uuid.uuid4().hex[:6]}"
    advert = Advertisement(name, "127.0.0.1", 29611, {"pac": "9.9", "cores": "8", "memory_gb": "15.5"})
    try:
        found = {f.name: f for f in discover(2.0)}
        assert found[name].host == "127.0.0.1" and found[name].port == 29611
        assert found[name].summary() == f"{name} at 127.0.0.1:29611 (pac 9.9, 8 cores, 15.5 GB)"
        assert found[name].hosts_line() == f"127.0.0.1:29611 name={name}"
    finally:
        advert.close()
    assert name not in {f.name for f in discover(1.0)}


@pytest.fixture
def peers(tmp_path):
    """Real `pac peer` agents on loopback: two with this run's token (one of them phase-1-only), one with another,
    one unadvertised."""
    suffix = uuid.uuid4().hex[:6]
    token = f"token-{suffix}"
    spec = {f"laptop-{suffix}": (token, []), f"desk-{suffix}": (token, ["--phase1-only", "--max-mem", "3g"])}
    spec |= {f"neighbour-{suffix}": ("another-token", []), f"hidden-{suffix}": (token, ["--no-advertise"])}
    procs, ports = [], {}
    for name, (its_token, extra) in spec.items():
        ports[name] = free_port()
        cmd = [sys.executable, "-m", "pac.cli", "peer", "--listen", f"tcp://127.0.0.1:{ports[name]}", "--name", name]
        cmd += ["--work-dir", str(tmp_path / name), "--once", *extra]
        env = {**os.environ, "PAC_JOIN_TOKEN": its_token}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:  # each prints its endpoint once it listens (and advertises)
        assert "listening on" in proc.stdout.readline()
    time.sleep(0.5)
    yield token, suffix, ports
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=20)


def _args(tmp_path, take=None, write=True) -> argparse.Namespace:
    hosts = str(tmp_path / "hosts.txt") if write else None
    return argparse.Namespace(wait=3.0, take=take, write_hosts=hosts, ssh=False)


def test_discover_lists_the_peers_with_the_token_refuses_the_others_and_writes_the_hosts_file(peers, tmp_path, capsys):
    token, suffix, ports = peers
    ours = {f"laptop-{suffix}", f"desk-{suffix}"}
    text = _discovered_hosts(_args(tmp_path), token)
    shown = capsys.readouterr().out
    assert f"refused: neighbour-{suffix} at 127.0.0.1:{ports[f'neighbour-{suffix}']}" in shown
    assert "no answer to the encrypted handshake: another PAC_JOIN_TOKEN" in shown
    assert f"hidden-{suffix}" not in shown and token not in shown
    assert re.search(rf"desk-{suffix} at 127\.0\.0\.1:\d+ \(pac [^)]*, 3\.0 GB, cpu, phase 1 only\)", shown)
    advertised = [f for f in discover(2.0) if f.name.endswith(suffix)]
    assert advertised and not any(token in value for f in advertised for value in f.properties.values())
    written = {h.name: h for h in read_hosts(tmp_path / "hosts.txt") if h.name.endswith(suffix)}
    assert set(written) == ours and all(written[n].port == ports[n] for n in ours)
    assert all(f"name={n}" in text for n in ours)

    only = _discovered_hosts(_args(tmp_path, take=f"desk-{suffix}", write=False), token)
    assert only.strip() == f"127.0.0.1:{ports[f'desk-{suffix}']} name=desk-{suffix}"
    numbered = [line.split(". ", 1)[1].split(" ")[0] for line in shown.splitlines() if line.startswith("  1. ")]
    by_number = _discovered_hosts(_args(tmp_path, take="1", write=False), token)
    assert by_number.strip().endswith(f"name={numbered[0]}")  # the numbers of the list shown
    with pytest.raises(PacError, match=f"no discovered peer is neighbour-{suffix}: choose among"):
        _discovered_hosts(_args(tmp_path, take=f"neighbour-{suffix}", write=False), token)


def test_pac_launch_discover_without_a_peer_of_its_token_says_what_to_do(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PAC_JOIN_TOKEN", f"nobody-has-{uuid.uuid4().hex}")
    assert launch(["--discover", "--wait", "1", "--out", str(tmp_path / "out")]) == 2
    assert "no peer answered with this join token: start `pac peer` on each device" in capsys.readouterr().err


def test_on_a_terminal_the_user_picks_the_peers_by_number_or_takes_all_with_enter():
    """`_choose` asks only on a terminal: a real pseudo-terminal types the answer."""
    import pty

    script = (
        "from launcher.main import _choose\n"
        "from pac.net.discovery import Found\n"
        "peers = [Found('laptop', '10.0.0.2', 29600), Found('desk', '10.0.0.3', 29600)]\n"
        "print('CHOSEN', [p.name for p in _choose(peers, None)])\n"
    )
    for answer, expected in ((b"2\n", "['desk']"), (b"\n", "['laptop', 'desk']")):
        controller, terminal = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-c", script], stdin=terminal, stdout=terminal, stderr=terminal)
        os.close(terminal)
        seen = b""
        while b"Enter: all" not in seen:
            seen += os.read(controller, 1024)
        os.write(controller, answer)
        while b"CHOSEN" not in seen or not seen.rstrip().endswith(b"]"):
            seen += os.read(controller, 1024)
        assert proc.wait(timeout=30) == 0 and f"CHOSEN {expected}" in seen.decode()
        os.close(controller)
