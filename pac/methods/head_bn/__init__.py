"""Head + BatchNorm: a CNN's classifier and its BatchNorm layers (scale, shift and running statistics) train, every
convolution stays frozen (`--method head-bn`): the cheapest reference for adapting an edge CNN, and often enough for
a distribution shift, which moves the statistics BatchNorm keeps.

This module is the registration (light: no torch); the model is pac.methods.vision_model's.
"""

from __future__ import annotations

from dataclasses import dataclass

from pac.methods.defaults import IMAGE_LR, IMAGE_TASK
from pac.methods.registry import Method, data_parallel_only, lazy, register_method


@dataclass
class HeadBnOptions:
    """`--method head-bn` has no options of its own."""


RUN = f"{__name__}.run"
METHOD = register_method(
    Method(
        name="head-bn",
        title="head + BatchNorm",
        summary="image tasks: the classifier and the BatchNorm layers train, every convolution stays frozen",
        options=HeadBnOptions,
        default_lr=lambda task: IMAGE_LR,
        build=lazy(f"{RUN}:build"),
        save=lazy(f"{RUN}:save"),
        load=lazy(f"{RUN}:load"),
        generates=False,
        collaborative=data_parallel_only,
        tasks=(IMAGE_TASK,),
    )
)
