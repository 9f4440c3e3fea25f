"""Full fine-tuning, the baseline the other methods' memory and time are measured against: every weight of the
base model and the task head trains, plain backprop and AdamW, no peft (`--method full`). It holds the most
memory of any method: a gradient and AdamW's two moments for every weight, besides every layer's activations.

This module is the registration (light: no torch); the model is pac.methods.transformers_model's, what a run
does with it in `.run`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pac.methods.defaults import ALL_TASKS, FULL_LR, lr_for
from pac.methods.parallel_adapters import POOLING_HELP
from pac.methods.registry import Method, data_parallel_only, lazy, method_option, register_method


@dataclass
class FullOptions:
    """`--method full` options."""

    pooling: str = method_option("mean", POOLING_HELP, choices=["mean", "last"])


RUN = f"{__name__}.run"
MODEL = "pac.methods.transformers_model"
METHOD = register_method(
    Method(
        name="full",
        title="full fine-tuning",
        summary="every weight of the model and the head trains, by backprop and AdamW without peft: the baseline",
        options=FullOptions,
        default_lr=lambda task: lr_for(task, FULL_LR),
        tasks=ALL_TASKS,
        build=lazy(f"{RUN}:build"),
        save=lazy(f"{RUN}:save"),
        load=lazy(f"{RUN}:load"),
        lm_logits=lazy(f"{MODEL}:lm_logits"),
        generate=lazy(f"{MODEL}:generate"),
        merged=lazy(f"{MODEL}:merged"),
        collaborative=data_parallel_only,  # the whole model on each peer's own samples: no stage to pipeline
        accelerates=True,
    )
)
