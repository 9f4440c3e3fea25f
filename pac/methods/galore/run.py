"""What a run does with GaLore: full fine-tuning's model (a language model whole, or a CNN), trained by backprop
with galore-torch's AdamW, saved and loaded as full fine-tuning's (every weight)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pac.data.tasks import IMAGE_TASK
from pac.methods.full import FullOptions
from pac.methods.full import run as full_run
from pac.methods.galore import GaloreOptions
from pac.methods.galore.optimizer import galore_optimizer, projected_weights
from pac.methods.registry import BuildContext
from pac.methods.transformers_model import TransformersModel
from pac.methods.vision_model import VisionModel, VisionSettings
from pac.methods.vision_model import build as build_vision
from pac.runtime.step import BackpropStep


def build(options: GaloreOptions, ctx: BuildContext) -> TransformersModel | VisionModel:
    if ctx.task == IMAGE_TASK:
        return build_vision(VisionSettings("galore"), ctx)
    return full_run.build(FullOptions(options.pooling), ctx)


def step(
    options: GaloreOptions, model: TransformersModel | VisionModel, task: str, batches: Any, config: Any
) -> BackpropStep:
    head = model.network.head if isinstance(model, VisionModel) else model.head
    projected = projected_weights(model, head)
    return BackpropStep(
        model,
        task,
        batches,
        config,
        optimizer=lambda groups, cfg: galore_optimizer(
            groups, projected, options.rank, options.update_gap, options.scale, cfg.weight_decay
        ),
    )


def save(
    options: GaloreOptions, model: TransformersModel | VisionModel, out: Path, meta: dict[str, Any]
) -> dict[str, Any]:
    return full_run.save(FullOptions(options.pooling), model, out, meta, name="galore")
