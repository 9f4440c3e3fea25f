"""What a run does with TaskEdge: calibrate and select on the training data, wrap the chosen linear maps, save
the indices and changes (safetensors), and load them back merged into the base model's weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pac.errors import PacError
from pac.methods.base import load_adapter, save_adapter
from pac.methods.registry import METHOD_KEY, BuildContext, Loaded
from pac.methods.taskedge import TaskEdgeOptions
from pac.methods.taskedge.model import SparseSettings, TaskEdgeModel
from pac.methods.transformers_model import TransformersModel

CALIBRATION_BATCH = 8
HEAD_PREFIX = "head."


def _settings(options: TaskEdgeOptions, task: str, label_names: list[str] | None) -> SparseSettings:
    return SparseSettings(
        task=task,
        budget_fraction=options.budget_percent / 100,
        selection=options.selection,
        nm=options.nm,
        targets=options.target_modules,
        sparse_lora_r=options.sparse_lora_r,
        pooling=options.pooling,
        label_names=label_names,
    )


def calibration_batches(source: Any, samples: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`samples` training samples drawn by `seed` from the whole training set, in batches."""
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:samples].tolist()
    return [source.batch(order[i : i + CALIBRATION_BATCH]) for i in range(0, len(order), CALIBRATION_BATCH)]


def build(options: TaskEdgeOptions, ctx: BuildContext) -> TaskEdgeModel:
    model = TaskEdgeModel(ctx.model_dir, _settings(options, ctx.task, ctx.label_names))
    # Every peer of a data-parallel run calibrates on the same samples of the whole training set, so all choose
    # the same entries as one device would.
    source = ctx.whole_train if ctx.whole_train is not None else ctx.train_source
    batches = calibration_batches(source, options.calibration_samples, ctx.seed)
    chosen, model.calibration_seconds = model.choose(batches, ctx.seed)
    model.install(chosen)
    return model


def _tensors(model: TaskEdgeModel) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, (index, delta) in model.merged_deltas().items():
        tensors[f"{name}.index"] = index.to(torch.int32 if index.numel() == 0 or index.max() < 2**31 else torch.int64)
        tensors[f"{name}.delta"] = delta
    if model.head is not None:
        tensors.update({HEAD_PREFIX + k: v for k, v in model.head.state_dict().items()})
    return tensors


def save(options: TaskEdgeOptions, model: TaskEdgeModel, out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    config = {
        **meta,
        "pooling": options.pooling,
        "budget_percent": options.budget_percent,
        "selection": options.selection,
        "nm": list(options.nm) if options.nm else None,
        "sparse_lora_r": options.sparse_lora_r,
        METHOD_KEY: "taskedge",
    }
    save_adapter(out, config, _tensors(model))
    selected = sum(d.index.numel() for d in model.deltas.values())
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "selected_weights": selected,
        "selected_share_of_backbone": selected / model.backbone_params,
        "calibration_seconds": model.calibration_seconds,
    }


def merge_into(network: torch.nn.Module, saved: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    """Add each saved change at its entries of the base weights (the same sum the training forward made)."""
    for key in saved:
        if not key.endswith(".index"):
            continue
        name = key.removesuffix(".index")
        try:
            weight = network.get_submodule(name).weight
        except AttributeError:
            weight = None
        index, delta = saved[key].to(torch.int64), saved.get(f"{name}.delta")
        fits = weight is not None and delta is not None and delta.shape == index.shape
        if not fits or (index.numel() and index.max() >= weight.numel()):
            raise PacError(
                f"{adapter_dir}: its entries for {name} do not fit {type(network).__name__}'s weights: pass the "
                "base model it was trained on with --model"
            )
        with torch.no_grad():
            weight.view(-1).index_add_(0, index, delta.to(weight.dtype))


def load(adapter_dir: Path, raw: dict[str, Any], model_dir: Path, retrieval: bool) -> Loaded:
    model = TransformersModel(model_dir, raw["task"], raw["pooling"], raw["label_names"])
    saved = load_adapter(adapter_dir)[1]
    merge_into(model.network, saved, adapter_dir)
    if model.head is not None:
        head = {k.removeprefix(HEAD_PREFIX): v for k, v in saved.items() if k.startswith(HEAD_PREFIX)}
        model.head.load_state_dict(head)
    return Loaded(model.eval(), None, raw["task"], raw["max_length"], raw["label_names"])
