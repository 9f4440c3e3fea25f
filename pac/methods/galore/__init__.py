"""GaLore: every weight trains, as in full fine-tuning, but Adam's moments live in a rank-r projection of each
weight's gradient (refreshed by an SVD every few hundred steps), so the optimizer state shrinks from 2x to about
2r/n of the weights (`--method galore`). On a language model or on an edge CNN (a convolution's gradient is
projected as a matrix, pac.methods.galore.optimizer).

This module is the registration (light: no torch); what a run does is in `.run`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pac.argtypes import number
from pac.methods.defaults import ALL_TASKS, GALORE_LR, lr_for
from pac.methods.parallel_adapters import POOLING_HELP
from pac.methods.registry import Method, data_parallel_only, lazy, method_option, register_method


@dataclass
class GaloreOptions:
    """`--method galore` options (the GaLore paper's defaults: rank 128 on LLaMA, scale 0.25, refresh every 200)."""

    rank: int = method_option(
        8, "GaLore projection rank (default 8)", flag="--galore-rank", parse=number(int, minimum=1)
    )
    update_gap: int = method_option(
        200,
        "steps between SVD refreshes of the projection (default 200)",
        flag="--galore-gap",
        parse=number(int, minimum=1),
    )
    scale: float = method_option(
        0.25,
        "GaLore's scale of the projected update (default 0.25)",
        flag="--galore-scale",
        parse=number(float, above=0),
    )
    pooling: str = method_option("mean", POOLING_HELP, choices=["mean", "last"])


RUN = f"{__name__}.run"
MODEL = "pac.methods.transformers_model"
METHOD = register_method(
    Method(
        name="galore",
        title="GaLore",
        summary="every weight trains, with Adam's moments in a low-rank projection of the gradients (galore-torch)",
        options=GaloreOptions,
        default_lr=lambda task: lr_for(task, GALORE_LR),
        build=lazy(f"{RUN}:build"),
        step=lazy(f"{RUN}:step"),
        save=lazy(f"{RUN}:save"),
        load=lazy("pac.methods.full.run:load"),
        lm_logits=lazy(f"{MODEL}:lm_logits"),
        generate=lazy(f"{MODEL}:generate"),
        merged=lazy(f"{MODEL}:merged"),
        collaborative=data_parallel_only,
        tasks=ALL_TASKS,
    )
)
