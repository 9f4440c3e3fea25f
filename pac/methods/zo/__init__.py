"""Zeroth-order fine-tuning as P-RGE runs it: forward passes only (`--method zo`).

LoRA-FA adapters on the attention and MLP projections (A frozen at its random start, B trained from zero) and,
for classification, the head; each step estimates the gradient from loss differences under q random
perturbations, g = (1/q) sum_i [(L(theta + eps z_i) - L(theta - eps z_i)) / 2 eps] z_i, with every z_i drawn again
from the step's seed instead of stored. The 2q perturbed copies run in one batched forward: the batch is tiled
once per copy and each copy reads its own B (`--zo-mode sequential`: 2q separate forwards, the same estimate).
No backward pass, no gradient and no autograd graph ever exist. The adapter saves as a peft LoRA (A and B).
Across devices (`pac-launch --method zo`) the model itself is pipelined over the peers' layer ranges, forward
only: per step just hidden states and 2q losses cross the network (pac.runtime.zo_pipeline).

This module is the registration (light: no torch); the model is in `.model`, the step in `.step`, what a run
does with them in `.run`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pac.argtypes import number
from pac.errors import PacError
from pac.methods.defaults import ZO_LR
from pac.methods.parallel_adapters import POOLING_HELP
from pac.methods.registry import Method, lazy, method_option, register_method
from pac.methods.taskedge import names
from pac.plan.placement import PIPELINE


@dataclass
class ZerothOrderOptions:
    """`--method zo` options (P-RGE's settings on TinyLlama by default: r=16, alpha=32, eps=1e-2)."""

    rank: int = method_option(
        16, "LoRA-FA rank r (alpha = 2r) (default 16)", flag="--zo-rank", parse=number(int, minimum=1)
    )
    perturbations: int = method_option(
        4,
        "q: random directions per step, each evaluated at +eps and -eps (2q copies of the batch in one forward) "
        "(default 4)",
        parse=number(int, minimum=1, maximum=64),
    )
    eps: float = method_option(
        1e-2, "perturbation size eps (default 1e-2)", flag="--zo-eps", parse=number(float, above=0)
    )
    mode: str = method_option(
        "batched",
        "batched: the 2q copies in one forward over the tiled batch (default); sequential: 2q forwards, one per "
        "copy (the same estimate, for comparison)",
        flag="--zo-mode",
        choices=["batched", "sequential"],
    )
    engine: str = method_option(
        "eager",
        "what runs the perturbed forward: eager (PyTorch, default) or executorch (exported once per batch shape, "
        "lowered to XNNPACK where it applies, run by ExecuTorch's runtime: `pip install executorch`)",
        flag="--zo-engine",
        choices=["eager", "executorch"],
    )
    target_modules: list[str] | None = method_option(
        None,
        "linear maps that take part, comma-separated last names (default: the attention and MLP projections)",
        parse=names,
        metavar="NAMES",
    )
    pooling: str = method_option("mean", POOLING_HELP, choices=["mean", "last"])


def collaborative(options: ZerothOrderOptions, task: str, mode: str) -> ZerothOrderOptions:
    """Across devices the model runs as a forward-only pipeline over the peers (`pipeline` mode)."""
    if mode != PIPELINE:
        raise PacError(
            f"--method zo runs across devices as a forward-only pipeline of the model over the peers: use --mode "
            f"{PIPELINE} (the default), not {mode}"
        )
    if options.mode == "sequential" or options.engine != "eager":
        raise PacError(
            "--zo-mode sequential and --zo-engine executorch run on one device: drop them (a pipeline's stages run "
            "batched, in PyTorch)"
        )
    return options


RUN = f"{__name__}.run"
LORA_RUN = "pac.methods.lora.run"  # saved as a peft LoRA: loaded, decoded and merged as one
MODEL = "pac.methods.transformers_model"
METHOD = register_method(
    Method(
        name="zo",
        title="zeroth-order LoRA-FA (P-RGE)",
        summary="forward passes only: loss differences under batched random perturbations of LoRA-FA adapters",
        options=ZerothOrderOptions,
        default_lr=lambda task: ZO_LR,
        build=lazy(f"{RUN}:build"),
        step=lazy(f"{RUN}:step"),
        save=lazy(f"{RUN}:save"),
        load=lazy(f"{LORA_RUN}:load"),
        lm_logits=lazy(f"{MODEL}:lm_logits"),
        generate=lazy(f"{MODEL}:generate"),
        merged=lazy(f"{LORA_RUN}:merged"),
        collaborative=collaborative,
    )
)
