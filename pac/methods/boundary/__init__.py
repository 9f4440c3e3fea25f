"""Boundary adapters (beyond the PAC paper): cache only the hidden state at layer k, then train LoRA on the
top L-k layers from it, optionally with a side network beside those layers or below the boundary
(`.model` says how and why).

This module is the registration (light: no torch); the model is in `.model`, what a run does with it in `.run`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pac.argtypes import number
from pac.methods.defaults import LORA_LR
from pac.methods.lora import RANK_HELP
from pac.methods.parallel_adapters import POOLING_HELP
from pac.methods.registry import Method, lazy, lazy_attributes, method_option, register_method


@dataclass
class BoundaryOptions:
    """`--method boundary` options."""

    r: int = method_option(8, RANK_HELP, flag="--lora-r", parse=number(int, minimum=0))
    boundary_layer: int | None = method_option(
        None,
        "cache only layer k's output and train LoRA on the layers above it (default 2L/3)",
        parse=number(int, minimum=1),
    )
    boundary_side: bool = method_option(
        False, "also run a side network (width d/--reduction) beside layers k..L, fed by their outputs"
    )
    boundary_side_below: bool = method_option(
        False,
        "a side network (width d/--reduction) over the cached layers 0..k whose output is added to h_k, so the "
        "top layers carry it; with --lora-r 0 the top layers stay frozen",
    )
    reduction: int | None = method_option(
        None, "width of a boundary side network = model width / r (default 8)", parse=number(int, minimum=1)
    )
    pooling: str = method_option("mean", POOLING_HELP, choices=["mean", "last"])


def boundary_layer(options: BoundaryOptions, num_layers: int) -> int:
    """k: the cached layer (default two thirds of the way up)."""
    return options.boundary_layer if options.boundary_layer is not None else 2 * num_layers // 3


def taps(options: BoundaryOptions, task: str, num_layers: int) -> list[int]:
    """h_k alone, or h_0..h_k for a side network below the boundary."""
    k = boundary_layer(options, num_layers)
    return list(range(k + 1)) if options.boundary_side_below else [k]


RUN = f"{__name__}.run"
METHOD = register_method(
    Method(
        name="boundary",
        title="boundary adapters",
        summary="one layer's output cached, LoRA on the layers above it",
        options=BoundaryOptions,
        taps=taps,
        default_lr=lambda task: LORA_LR,
        build=lazy(f"{RUN}:build"),
        save=lazy(f"{RUN}:save"),
        load=lazy(f"{RUN}:load"),
        lm_logits=lazy(f"{RUN}:lm_logits"),
        generates=False,
    )
)

# The model's names, imported on first use (they need torch; the registration does not).
__getattr__ = lazy_attributes(f"{__name__}.model", ("METHOD_TYPE", "SIDE_LR_RATIO", "BoundaryModel"))
