"""What a run does with boundary adapters: LoRA (and a side network) on the layers above the cached one, fed
h_k from the cache in training and from the layers below it when loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pac.errors import PacError
from pac.methods.base import load_adapter, save_adapter
from pac.methods.boundary import BoundaryOptions, boundary_layer
from pac.methods.boundary.model import METHOD_TYPE, BoundaryModel
from pac.methods.registry import METHOD_KEY, BuildContext, Loaded
from pac.models.backbone import load_backbone, load_config


def _model(model_dir: Path, k: int, task: str, labels: list[str] | None, pooling: str, r: int, side, below):
    num_layers = load_config(model_dir).num_hidden_layers
    if not 0 < k < num_layers:
        raise PacError(f"--boundary-layer must be between 1 and {num_layers - 1}, not {k}")
    upper = load_backbone(model_dir, k, num_layers, with_head=True)
    return BoundaryModel(upper, task, labels, pooling, r, side, below)


def _reductions(options: BoundaryOptions) -> tuple[int | None, int | None]:
    """The widths (d / r) of the side networks beside and below the boundary, where the options ask for one."""
    width = options.reduction or 8
    return (width if options.boundary_side else None), (width if options.boundary_side_below else None)


def build(options: BoundaryOptions, ctx: BuildContext) -> BoundaryModel:
    k = boundary_layer(options, load_config(ctx.model_dir).num_hidden_layers)
    side, below = _reductions(options)
    return _model(ctx.model_dir, k, ctx.task, ctx.label_names, options.pooling, options.r, side, below)


def save(options: BoundaryOptions, model: BoundaryModel, out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    side, below = _reductions(options)
    config = {
        "peft_type": METHOD_TYPE,
        "boundary_layer": model.upper.start,
        "r": options.r,
        "pooling": options.pooling,
        "side_reduction": side,
        "below_reduction": below,
        **meta,
        METHOD_KEY: "boundary",
    }
    save_adapter(out, config, model.trainable_state_dict())
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def load(adapter_dir: Path, raw: dict[str, Any], model_dir: Path, retrieval: bool) -> Loaded:
    k = raw["boundary_layer"]
    boundary = _model(
        model_dir,
        k,
        raw["task"],
        raw["label_names"],
        raw["pooling"],
        raw["r"],
        raw.get("side_reduction"),
        raw.get("below_reduction"),
    )
    missing, unexpected = boundary.load_state_dict(load_adapter(adapter_dir)[1], strict=False)
    if unexpected or any("lora_" in m or m.startswith(("head.", "side.", "below.")) for m in missing):
        raise PacError(f"{adapter_dir}: adapter weights do not match its config")
    lower = load_backbone(model_dir, 0, k)  # feeds h_k to the adapted top layers
    return Loaded(boundary.eval(), lower, raw["task"], raw["max_length"], raw["label_names"])


def lm_logits(loaded: Loaded, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    model = loaded.model
    out = loaded.backbone(ids, mask, taps=model.taps)
    return model.lm_logits({"taps": torch.stack([out.taps[t] for t in model.taps], 1), "attention_mask": mask})
