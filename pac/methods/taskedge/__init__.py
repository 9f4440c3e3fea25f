"""TaskEdge: task-aware sparse fine-tuning of under 0.1% of the weights (`--method taskedge`).

A calibration pass over a few training batches scores every weight of the attention and MLP projections by
|W_ij| * ||X_j||_2 (Wanda's statistic: the weight and the task's own input activations); the budget, a fraction
of the backbone's parameters, is spread evenly over the model, the top entries of every output neuron; only
those entries ever change (pac.methods.taskedge.select). Options: an N:M pattern (2:4, what sparse tensor cores
run), other selections to compare at the same budget, and sparse LoRA (a low-rank update read only at the
selected entries). Backward runs through the whole model, so collaboratively it runs data-parallel, every peer
with the whole model, all-reducing only the packed sparse gradients.

This module is the registration (light: no torch); the model is in `.model`, what a run does with it in `.run`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pac.argtypes import number
from pac.errors import PacError
from pac.methods.defaults import TASKEDGE_LR
from pac.methods.parallel_adapters import POOLING_HELP
from pac.methods.registry import Method, data_parallel_only, lazy, lazy_attributes, method_option, register_method

SELECTION_HELP = (
    "which entries train: taskedge (|W|*||X|| per output neuron, default), global (the same scores, top-k over "
    "the whole model), magnitude (|W| per output neuron), random (per output neuron): the last three are "
    "comparisons at the same budget"
)


def nm_pattern(text: str) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): at most N entries in every block of M consecutive inputs; 'none' -> None."""
    if text.lower() == "none":
        return None
    n, sep, m = text.partition(":")
    if not (sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise argparse.ArgumentTypeError(f"must be N:M with 0 < N < M (2:4 for sparse tensor cores), not {text!r}")
    return int(n), int(m)


def names(text: str) -> list[str]:
    """'q_proj,v_proj' -> ['q_proj', 'v_proj']."""
    found = [t.strip() for t in text.split(",") if t.strip()]
    if not found:
        raise argparse.ArgumentTypeError("name at least one linear map, e.g. q_proj,v_proj")
    return found


@dataclass
class TaskEdgeOptions:
    """`--method taskedge` options."""

    budget_percent: float = method_option(
        0.1,
        "trained weights as a percentage of the backbone's parameters (default 0.1; the paper's range is 0.01-1)",
        parse=number(float, above=0, maximum=100),
    )
    selection: str = method_option("taskedge", SELECTION_HELP, choices=["taskedge", "global", "magnitude", "random"])
    nm: tuple[int, int] | None = method_option(
        None,
        "N:M structure: at most N trained entries in each block of M consecutive inputs of a row, e.g. 2:4 (what "
        "NVIDIA's sparse tensor cores run; on CUDA in half precision the update goes through torch's "
        "semi-structured kernels) (default none)",
        parse=nm_pattern,
        metavar="N:M",
    )
    target_modules: list[str] | None = method_option(
        None,
        "linear maps that take part, comma-separated last names (default: the attention and MLP projections, "
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)",
        parse=names,
        metavar="NAMES",
    )
    calibration_samples: int = method_option(
        64,
        "training samples whose activations score the weights (default 64; its time is in summary.json)",
        parse=number(int, minimum=1),
    )
    sparse_lora_r: int = method_option(
        0,
        "sparse LoRA: train a rank-r product B·A read only at the selected entries, instead of the entries "
        "themselves (default 0: the entries)",
        parse=number(int, minimum=0),
    )
    pooling: str = method_option("mean", POOLING_HELP, choices=["mean", "last"])


def resolve(options: TaskEdgeOptions, task: str) -> TaskEdgeOptions:
    if options.sparse_lora_r and options.nm is not None:
        raise PacError("--nm constrains the entries, and sparse LoRA (--sparse-lora-r) trains B·A: use one of the two")
    return options


RUN = f"{__name__}.run"
MODEL = "pac.methods.transformers_model"
METHOD = register_method(
    Method(
        name="taskedge",
        title="TaskEdge",
        summary="task-aware sparse fine-tuning: only the weights that matter most for the task change (0.1 percent)",
        options=TaskEdgeOptions,
        resolve=resolve,
        default_lr=lambda task: TASKEDGE_LR,
        build=lazy(f"{RUN}:build"),
        save=lazy(f"{RUN}:save"),
        load=lazy(f"{RUN}:load"),
        lm_logits=lazy(f"{MODEL}:lm_logits"),
        generate=lazy(f"{MODEL}:generate"),
        merged=lazy(f"{MODEL}:merged"),  # the changes are in the loaded weights
        collaborative=data_parallel_only,  # backward through the whole model: every peer holds all of it
    )
)

__getattr__ = lazy_attributes(f"{__name__}.model", ("TaskEdgeModel",))
