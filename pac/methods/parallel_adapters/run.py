"""What a run does with parallel adapters: build the side network beside the top of the backbone (phase 2
never loads the layers), train on shortlists where they save time, give a language-model adapter its memory
of the training tokens, and save or load the adapter directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from pac.methods.base import save_adapter
from pac.methods.parallel_adapters import ParallelAdapterOptions
from pac.methods.parallel_adapters.model import (
    ParallelAdapterConfig,
    ParallelAdapterModel,
    attach_memory,
    initialize_pruned,
)
from pac.methods.registry import METHOD_KEY, BuildContext, Loaded
from pac.models.backbone import load_backbone, load_config
from pac.models.retrieval import TokenMemory
from pac.runtime.sources import Shortlisted, with_shortlists

NAME = "parallel-adapters"


def adapter_config(options: ParallelAdapterOptions, ctx: BuildContext) -> ParallelAdapterConfig:
    """The adapter's config (saved beside its weights) from the options, resolved for the task."""
    num_layers = load_config(ctx.model_dir).num_hidden_layers
    return ParallelAdapterConfig(
        task=ctx.task,
        label_names=ctx.label_names,
        max_length=ctx.max_length,
        reduction=options.reduction,
        tap_every=options.tap_every,
        taps=sorted({0, num_layers, *options.taps}) if options.taps else None,
        gate_temperature=options.gate_temperature,
        pooling=options.pooling,
        readout=options.readout,
        side_init=options.side_init,
        tap_norm=options.tap_norm,
        dropout=options.dropout,
        train_final_norm=options.train_final_norm,
        vocab_bias=options.vocab_bias,
        side_heads=options.side_heads,
        readout_hidden=options.readout_hidden,
        side_network=options.side_network,
    )


def build(options: ParallelAdapterOptions, ctx: BuildContext) -> ParallelAdapterModel:
    """Phase 2's model: the side network beside only the final norm / LM head of the backbone. Seeded here, so
    every device of a collaborative run starts from the same weights."""
    num_layers = load_config(ctx.model_dir).num_hidden_layers
    top = load_backbone(ctx.model_dir, num_layers, num_layers, with_head=True)
    torch.manual_seed(ctx.seed)
    model = ParallelAdapterModel(top, adapter_config(options, ctx))
    # Channel statistics from a few cached samples; a peer without training rows of its own takes rank 0's
    # weights by broadcast (pac.runtime.collaborative).
    source = ctx.train_source
    if options.side_init == "pruned" and source is not None and len(source):
        initialize_pruned(model, ctx.model_dir, source.batch(list(range(min(16, len(source)))))["taps"])
    return model


def training_source(options: ParallelAdapterOptions, model: ParallelAdapterModel, source: Any) -> tuple[Any, dict]:
    """The cached taps with shortlists (language modelling with the plain side network; pac.models.shortlist),
    and what building them cost."""
    started = time.perf_counter()
    wrapped = with_shortlists(source, model, options.shortlist)
    if not isinstance(wrapped, Shortlisted):
        return wrapped, {}
    return wrapped, {
        "shortlist": {
            "size": options.shortlist,
            "mb": wrapped.nbytes() / 1e6,
            "built_files": wrapped.built,  # 0: an earlier run on this cache built them
            "seconds": time.perf_counter() - started,
        }
    }


def after_training(
    options: ParallelAdapterOptions, model: ParallelAdapterModel, ctx: BuildContext, out: Path, evaluate_val: Any
) -> dict[str, Any]:
    """Language modelling with --retrieval: the memory of the training tokens, fit and saved (retrieval.safetensors)."""
    if not options.retrieval:
        return {}
    started = time.perf_counter()
    fit_loss = attach_memory(model, ctx.train_source, seed=ctx.seed)
    model.config.retrieval = model.memory.settings()
    path = model.memory.save(out)
    scored = evaluate_val(model)
    return {
        "retrieval": {
            **model.config.retrieval,
            "tokens": len(model.memory.keys),
            "file_mb": path.stat().st_size / 1e6,
            "fit_loss": fit_loss,
            **{f"val_{k}": v for k, v in scored.items()},  # none without validation rows
            "seconds": time.perf_counter() - started,
        }
    }


def save(
    options: ParallelAdapterOptions, model: ParallelAdapterModel, out: Path, meta: dict[str, Any]
) -> dict[str, Any]:
    config = model.config
    config.taps = model.taps  # saved resolved: the adapter file says exactly which layers it reads
    save_adapter(out, {**config.to_dict(), **meta, METHOD_KEY: NAME}, model.trainable_state_dict())
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "gates": [round(g, 4) for g in model.side.gates().tolist()] if model.side is not None else [],
    }


def load(adapter_dir: Path, raw: dict[str, Any], model_dir: Path, retrieval: bool) -> Loaded:
    from pac.methods.base import load_adapter

    config = ParallelAdapterConfig.from_dict(raw)
    backbone = load_backbone(model_dir)
    adapter = ParallelAdapterModel(backbone, config)
    adapter.load_trainable(load_adapter(adapter_dir)[1])
    if config.retrieval and retrieval:
        adapter.memory = TokenMemory.load(adapter_dir, config.retrieval)
    return Loaded(adapter.eval(), backbone, config.task, config.max_length, config.label_names)


def lm_logits(loaded: Loaded, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A language-model adapter's next-token output (with its memory, when loaded); a classifier only reads
    the frozen backbone beside it, so its next-token output is the backbone's."""
    backbone, model = loaded.backbone, loaded.model
    if loaded.task == "classify":
        return backbone.logits(backbone.final_norm(backbone(ids, mask, taps=()).hidden))
    out = backbone(ids, mask, taps=model.taps)
    return model(torch.stack([out.taps[t] for t in model.taps], 1), mask)
