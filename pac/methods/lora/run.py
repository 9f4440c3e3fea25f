"""What a run does with LoRA / DoRA: the peft model on the whole backbone, saved as peft saves it (plus pac's
config and the classification head), loaded back through peft; it decodes as pac.methods.transformers_model
says (peft's `generate`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pac.data.tasks import IMAGE_TASK
from pac.methods import vision_model
from pac.methods.base import ADAPTER_CONFIG
from pac.methods.lora import LoraOptions
from pac.methods.lora.model import LoraModel, LoraSettings
from pac.methods.registry import METHOD_KEY, BuildContext, Loaded
from pac.methods.vision_model import VisionModel, VisionSettings


def _settings(options: LoraOptions, task: str, label_names: list[str] | None, use_dora: bool) -> LoraSettings:
    return LoraSettings(
        task=task,
        r=options.r,
        alpha=2 * options.r,
        dropout=options.dropout,
        use_dora=use_dora,
        pooling=options.pooling,
        label_names=label_names,
    )


def _build(options: LoraOptions, ctx: BuildContext, use_dora: bool) -> LoraModel | VisionModel:
    if ctx.task == IMAGE_TASK:
        settings = VisionSettings("dora" if use_dora else "lora", options.r, options.depthwise)
        return vision_model.build(settings, ctx)
    return LoraModel(ctx.model_dir, _settings(options, ctx.task, ctx.label_names, use_dora=use_dora))


def build_lora(options: LoraOptions, ctx: BuildContext) -> LoraModel | VisionModel:
    return _build(options, ctx, use_dora=False)


def build_dora(options: LoraOptions, ctx: BuildContext) -> LoraModel | VisionModel:
    return _build(options, ctx, use_dora=True)


def save(options: LoraOptions, model: LoraModel | VisionModel, out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """peft's own files (adapter_config.json names the base model as the user gave it), the head, and pac's
    config beside them; a CNN's adapter as pac.methods.vision_model saves it."""
    if isinstance(model, VisionModel):
        return vision_model.save(model, out, meta)
    model.save(out, meta["base_model_name_or_path"])
    method = "dora" if model.settings.use_dora else "lora"
    config = {**meta, "pooling": options.pooling, "r": options.r, METHOD_KEY: method}
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def load(adapter_dir: Path, raw: dict[str, Any], model_dir: Path, retrieval: bool) -> Loaded:
    if raw["task"] == IMAGE_TASK:
        return vision_model.load(adapter_dir, raw)
    settings = LoraSettings(task=raw["task"], pooling=raw["pooling"], label_names=raw["label_names"])
    lora = LoraModel(model_dir, settings, adapter_dir=adapter_dir)
    lora.load_head(adapter_dir)
    return Loaded(lora.eval(), None, raw["task"], raw["max_length"], raw["label_names"])


def merged(loaded: Loaded) -> Any:
    """`Method.merged`: peft folds B·A into the base weights and unwraps the model."""
    return loaded.model.peft.merge_and_unload()
