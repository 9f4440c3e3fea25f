"""What a run does with zeroth-order LoRA-FA: build the model, the step, and save the adapter as a peft LoRA
(lora_A, lora_B and the head), which pac's LoRA loader, peft and `pac export` read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pac.errors import PacError
from pac.methods.base import ADAPTER_CONFIG
from pac.methods.lora.model import LoraModel, LoraSettings
from pac.methods.registry import METHOD_KEY, BuildContext
from pac.methods.zo import ZerothOrderOptions
from pac.methods.zo.engine import ExecuTorchLosses
from pac.methods.zo.model import HEAD_BIAS, HEAD_WEIGHT, ZerothOrderModel
from pac.methods.zo.step import ZerothOrderStep
from pac.runtime.trainer import BatchSource, TrainConfig


def build(options: ZerothOrderOptions, ctx: BuildContext) -> ZerothOrderModel:
    start, end = ctx.stage or (0, None)
    model = ZerothOrderModel(
        ctx.model_dir,
        ctx.task,
        options.pooling,
        ctx.label_names,
        options.rank,
        ctx.seed,
        options.target_modules,
        start,
        end,
    )
    if options.engine == "executorch":
        if options.mode != "batched":
            raise PacError("--zo-engine executorch runs the batched forward: drop --zo-mode sequential")
        model.engine = ExecuTorchLosses(model)
    return model


def step(
    options: ZerothOrderOptions, model: ZerothOrderModel, task: str, source: BatchSource, config: TrainConfig
) -> ZerothOrderStep:
    batched = options.mode == "batched"
    return ZerothOrderStep(model, source, config, options.perturbations, options.eps, batched, model.engine)


def save(options: ZerothOrderOptions, model: ZerothOrderModel, out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """A peft LoRA with r = rank, alpha = 2r, no dropout, over the same linear maps, holding A and B (of every
    stage, on the rank that saves a pipelined run)."""
    tensors = model.adapter()
    keys = sorted(name.removesuffix(".lora_A") for name in tensors if name.endswith(".lora_A"))
    settings = LoraSettings(
        task=model.task,
        r=options.rank,
        alpha=2 * options.rank,
        dropout=0.0,
        pooling=options.pooling,
        label_names=meta["label_names"],
        target_modules=sorted({key.rpartition(".")[2] for key in keys}),
    )
    peft = LoraModel(model.model_dir, settings)
    with torch.no_grad():
        for key in keys:
            target = peft.peft.get_base_model().get_submodule(model.hf_name(key))
            target.lora_A["default"].weight.copy_(tensors[f"{key}.lora_A"])
            target.lora_B["default"].weight.copy_(tensors[f"{key}.lora_B"])
        if peft.head is not None:
            peft.head.proj.weight.copy_(tensors[HEAD_WEIGHT])
            peft.head.proj.bias.copy_(tensors[HEAD_BIAS])
    peft.save(out, meta["base_model_name_or_path"])
    config = {**meta, "pooling": options.pooling, "r": options.rank, METHOD_KEY: "zo"}
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    trained = sum(t.numel() for name, t in tensors.items() if not name.endswith(".lora_A"))
    summary = {
        "trainable_params": trained,
        "forward_passes_per_step": 1 if options.mode == "batched" else 2 * options.perturbations,
    }
    if model.engine is not None:
        summary["engine_lowering_seconds"] = model.engine.lowering_seconds
    return summary
