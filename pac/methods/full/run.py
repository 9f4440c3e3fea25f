"""What a run does with full fine-tuning: the base model whole (pac.methods.transformers_model), every weight
saved to the adapter file, loaded back over the base model it was trained from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pac.data.tasks import IMAGE_TASK
from pac.errors import PacError
from pac.methods import vision_model
from pac.methods.base import load_adapter, save_adapter
from pac.methods.full import FullOptions
from pac.methods.registry import METHOD_KEY, BuildContext, Loaded
from pac.methods.transformers_model import TransformersModel
from pac.methods.vision_model import VisionModel, VisionSettings


def build(options: FullOptions, ctx: BuildContext) -> TransformersModel | VisionModel:
    if ctx.task == IMAGE_TASK:
        return vision_model.build(VisionSettings("full"), ctx)
    return TransformersModel(ctx.model_dir, ctx.task, options.pooling, ctx.label_names)


def _weights(model: TransformersModel) -> dict[str, torch.Tensor]:
    # named_parameters lists a tied weight (the LM head sharing the embeddings) once: safetensors refuses aliases.
    return {name: p.detach() for name, p in model.named_parameters()}


def save(
    options: FullOptions, model: TransformersModel | VisionModel, out: Path, meta: dict[str, Any], name: str = "full"
) -> dict[str, Any]:
    """Every weight (a CNN's whole state dict, as pac.methods.vision_model saves it); `name`: the method saving."""
    if isinstance(model, VisionModel):
        return vision_model.save(model, out, meta)
    weights = _weights(model)
    save_adapter(out, {**meta, "pooling": options.pooling, METHOD_KEY: name}, weights)
    return {"trainable_params": sum(w.numel() for w in weights.values())}


def load(adapter_dir: Path, raw: dict[str, Any], model_dir: Path, retrieval: bool) -> Loaded:
    if raw["task"] == IMAGE_TASK:
        return vision_model.load(adapter_dir, raw)
    model = TransformersModel(model_dir, raw["task"], raw["pooling"], raw["label_names"])
    saved = load_adapter(adapter_dir)[1]
    expected = _weights(model)
    if saved.keys() != expected.keys() or any(saved[n].shape != w.shape for n, w in expected.items()):
        raise PacError(
            f"{adapter_dir}: its weights do not fit {model_dir}'s model: pass the base model it was trained on "
            "with --model"
        )
    model.load_state_dict(saved, strict=False)  # strict would also ask for a tied weight's second name
    return Loaded(model.eval(), None, raw["task"], raw["max_length"], raw["label_names"])
