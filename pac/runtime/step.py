"""The training step: how one batch changes the weights, apart from the loop that feeds it batches.

The loop (pac.runtime.trainer.Trainer) decides *which* samples and *when*: epochs, the sample order,
checkpoints and exact resume, evaluation, logs, early stopping, the progress clock. Once per batch it calls
a `TrainStep` with the batch's sample positions and the number of steps done, and gets back a `StepResult`
(the batch's mean loss, and metrics to log beside it). Everything else belongs to the step: the loss,
whether gradients exist at all, the optimizer, the schedule, any randomness of its own. Its
`state_dict()` rides in the loop's checkpoints (state.pt), so a resumed run takes exactly the updates
an uninterrupted one would have taken.

`BackpropStep` is the default: backward, clipping, AdamW and a warm-up + decay schedule. The collaborative
trainers keep its update and change only how a batch's gradients are made (`BackpropStep.gradients`):
summed over ranks (pac.runtime.distributed) or pipelined over stages (pac.runtime.side_pipeline). Other
steps (zeroth-order, masked) plug into the same loop; tests/test_step.py has two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from pac.methods.base import MethodModel
from pac.runtime.device import autocast_device, device_of, device_rng_state, set_device_rng_state, settle

if TYPE_CHECKING:  # the loop's module imports this one
    from pac.methods.registry import Method
    from pac.runtime.trainer import BatchSource, TrainConfig

PRECISIONS = ("fp32", "bf16")

# Fills p.grad with one batch's gradients, clipped: (the batch's mean loss, grad norm before clipping).
GradientFn = Callable[[list[int], int], tuple[float, float]]
# Makes the optimizer from the model's parameter groups and the run's settings (default: AdamW); e.g. GaLore's.
OptimizerFn = Callable[[list[dict[str, Any]], "TrainConfig"], torch.optim.Optimizer]


@dataclass
class StepResult:
    loss: float  # the batch's mean loss: the loop logs it and weighs it by the batch size in the epoch's loss
    metrics: dict[str, float] = field(default_factory=dict)  # logged beside the loss (e.g. grad_norm)


class TrainStep(Protocol):
    """One update of the trainable weights from one batch, and the state to resume it exactly."""

    def __call__(self, indices: list[int], step: int) -> StepResult:
        """Update on the samples at `indices` of the training source; `step` updates were done before."""
        ...

    @property
    def lr(self) -> float:
        """The learning rate of the next update (logged after each step)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def autocast(precision: str, device: torch.device | None = None) -> torch.autocast:
    """The mixed-precision context of a training step on `device` (default: the CPU); a no-op for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    device_type = autocast_device(device or torch.device("cpu"), precision)
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown LR schedule {schedule!r}: use cosine, linear or constant")


class BackpropStep:
    """Backward through the model's loss, clipping at max_grad_norm, AdamW over the model's parameter groups,
    and the learning rate warmed up then decayed (cosine, linear or constant) over the whole run.

    How a batch's gradients are made can change without touching the update: a subclass overrides
    `gradients`, or passes `gradients` (a pipeline that runs the batch across stages); a method with an optimizer
    of its own (GaLore) passes `optimizer`."""

    def __init__(
        self,
        model: MethodModel,
        task: str,
        source: BatchSource,
        config: TrainConfig,
        gradients: GradientFn | None = None,
        optimizer: OptimizerFn | None = None,
    ):
        self.model, self.task, self.source, self.config = model, task, source, config
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = device_of(model)  # where the model was moved before the step was made (pac.runtime.device)
        groups = model.param_groups(config.lr)
        if optimizer is None:
            self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = optimizer(groups, config)
        total = steps_per_epoch(len(source), config.batch_size) * config.epochs
        warmup = int(config.warmup_ratio * total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warmup, config.schedule)
        )
        self._gradients = gradients or self.gradients

    def __call__(self, indices: list[int], step: int) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        loss, grad_norm = self._gradients(indices, step)
        self.optimizer.step()
        self.scheduler.step()
        settle(self.device)
        return StepResult(loss, {"grad_norm": grad_norm})

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(self.config.precision, self.device):
            return self.model.loss_batch(batch)

    def gradients(self, indices: list[int], step: int) -> tuple[float, float]:
        """The batch's gradients, clipped, ready for the optimizer: (loss, grad norm before clipping)."""
        loss = self.loss(self.source.batch(indices))
        loss.backward()
        return loss.item(), self.clip()

    def clip(self) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        # The global RNG draws the dropout masks of the forward passes; on a GPU, the GPU's generator does.
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "device_rng": device_rng_state(self.device),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        set_device_rng_state(self.device, state.get("device_rng"))  # absent in checkpoints of CPU-only pac


def method_step(
    method: Method, options: Any, model: MethodModel, task: str, source: BatchSource, config: TrainConfig
) -> TrainStep:
    """The training step of `method` (its `Method.step`), or backprop + AdamW where it has none."""
    if method.step is not None:
        return method.step(options, model, task, source, config)
    return BackpropStep(model, task, source, config)
