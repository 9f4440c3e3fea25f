"""What a run does with head + BatchNorm: pac.methods.vision_model's CNN with only those parts trainable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pac.methods import vision_model
from pac.methods.head_bn import HeadBnOptions
from pac.methods.registry import BuildContext, Loaded
from pac.methods.vision_model import VisionModel, VisionSettings


def build(options: HeadBnOptions, ctx: BuildContext) -> VisionModel:
    return vision_model.build(VisionSettings("head-bn"), ctx)


def save(options: HeadBnOptions, model: VisionModel, out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    return vision_model.save(model, out, meta)


def load(adapter_dir: Path, raw: dict[str, Any], model_dir: Path, retrieval: bool) -> Loaded:
    return vision_model.load(adapter_dir, raw)
