"""LoRA and DoRA, the peft baselines: low-rank updates of every linear map, backward through the whole
model, every epoch through the whole backbone (the cost parallel adapters avoid). One flag apart from
parallel adapters on the same model, data and head (`--method lora`).

This module is the registration (light: no torch); the model is in `.model`, what a run does with it in `.run`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pac.argtypes import number
from pac.errors import PacError
from pac.methods.defaults import ALL_TASKS, LORA_LR, lr_for
from pac.methods.parallel_adapters import POOLING_HELP
from pac.methods.registry import (
    Method,
    data_parallel_only,
    lazy,
    lazy_attributes,
    method_option,
    register_method,
)

RANK_HELP = "LoRA / DoRA / boundary rank (default 8; 0 only for boundary: its top layers stay frozen)"


@dataclass
class LoraOptions:
    """`--method lora` / `--method dora` options."""

    r: int = method_option(8, RANK_HELP, flag="--lora-r", parse=number(int, minimum=0))
    dropout: float = method_option(
        0.05,
        "LoRA / DoRA on a language model: dropout on the input of each low-rank update, peft's lora_dropout "
        "(default 0.05)",
        flag="--lora-dropout",
        parse=number(float, minimum=0, below=1),
    )
    pooling: str = method_option("mean", POOLING_HELP, choices=["mean", "last"])
    depthwise: str = method_option(
        "frozen",
        "--task image-classify: LoRA on depthwise convolutions too (lora), at the rank peft allows there (a multiple "
        "of the channels: a pair larger than the layer), or leave them frozen (default)",
        choices=["frozen", "lora"],
    )


def resolve(options: LoraOptions, task: str) -> LoraOptions:
    if options.r == 0:
        raise PacError("--lora-r 0 trains nothing: it is for --method boundary (frozen top layers); use --lora-r 8")
    return options


RUN = f"{__name__}.run"
MODEL = "pac.methods.transformers_model"  # the base model whole, which peft wraps
for _name, _title, _summary in (
    ("lora", "LoRA", "low-rank updates of every linear map through peft, backward through the whole model"),
    ("dora", "DoRA", "LoRA with a learned magnitude per output channel, through peft"),
):
    register_method(
        Method(
            name=_name,
            title=_title,
            summary=_summary,
            options=LoraOptions,
            resolve=resolve,
            default_lr=lambda task: lr_for(task, LORA_LR),
            tasks=ALL_TASKS,
            build=lazy(f"{RUN}:build_{_name}"),
            save=lazy(f"{RUN}:save"),
            load=lazy(f"{RUN}:load"),
            lm_logits=lazy(f"{MODEL}:lm_logits"),
            generate=lazy(f"{MODEL}:generate"),
            merged=lazy(f"{RUN}:merged"),
            collaborative=data_parallel_only,  # `pac-launch --mode replicated`: LoRA data-parallel over the peers
            accelerates=_name == "lora",  # DoRA's magnitude step is not yet run on the stand-in device
        )
    )

# The model's names, imported on first use (they need torch; the registration does not).
__getattr__ = lazy_attributes(f"{__name__}.model", ("DEFAULT_TARGETS", "HEAD_FILE", "LoraModel", "LoraSettings"))
