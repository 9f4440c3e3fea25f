"""The zeroth-order step: P-RGE's estimate from 2q perturbed copies, and the update, with no backward.

Each step's perturbations come from seeds derived from (run seed, step, direction), and each tensor's part of a
direction from that seed and the tensor's name, so nothing about them is stored between steps (a resumed run draws
the same z) and any process that knows the step draws the same z_i for the tensors it holds: a pipeline stage
updates its own B with the z one device would use (pac.runtime.zo_pipeline). Each z_i is drawn again where it is
needed, never kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pac.methods.base import loss_count
from pac.methods.zo.model import Copies, ZerothOrderModel, derived_seed, seeded
from pac.runtime.step import StepResult, lr_factor, steps_per_epoch
from pac.runtime.trainer import BatchSource, TrainConfig


def direction_seeds(run_seed: int, step: int, q: int) -> list[int]:
    """The seeds of a step's q directions."""
    return [derived_seed(run_seed, step, i) for i in range(q)]


def direction(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """z: a standard normal draw for each tensor, from `seed` and the tensor's name."""
    return {name: torch.randn(t.shape, generator=seeded(seed, name), dtype=t.dtype) for name, t in tensors.items()}


def perturbed_copies(trained: dict[str, torch.Tensor], seeds: list[int], eps: float) -> Copies:
    """theta + eps z_0, theta - eps z_0, theta + eps z_1, ... stacked per tensor: (2q, *shape)."""
    copies: dict[str, list[torch.Tensor]] = {name: [] for name in trained}
    for seed in seeds:
        for name, z in direction(trained, seed).items():
            copies[name] += [trained[name] + eps * z, trained[name] - eps * z]
    return {name: torch.stack(c) for name, c in copies.items()}


def projected_gradients(losses: torch.Tensor, eps: float) -> torch.Tensor:
    """(L(theta + eps z_i) - L(theta - eps z_i)) / 2eps, one per direction, from the 2q losses in copy order."""
    return (losses[0::2] - losses[1::2]) / (2 * eps)


class ZerothOrderUpdate:
    """theta <- theta - lr * ((1/q) sum_i g_i z_i + weight_decay * theta), under the run's learning-rate schedule:
    one device's step and every pipeline stage's make it on the tensors they hold."""

    def __init__(self, config: TrainConfig, num_samples: int):
        self.config = config
        self.total = steps_per_epoch(num_samples, config.batch_size) * config.epochs
        self.warmup = int(config.warmup_ratio * self.total)
        self.lr = self.rate(0)

    def rate(self, step: int) -> float:
        return self.config.lr * lr_factor(step, self.total, self.warmup, self.config.schedule)

    @torch.no_grad()
    def apply(self, trained: dict[str, torch.Tensor], projected: torch.Tensor, seeds: list[int], step: int) -> None:
        lr = self.rate(step)
        if self.config.weight_decay:
            for theta in trained.values():
                theta.mul_(1 - lr * self.config.weight_decay)
        for g, seed in zip(projected.tolist(), seeds, strict=True):
            for name, z in direction(trained, seed).items():
                trained[name].add_(z, alpha=-lr * g / len(seeds))
        self.lr = self.rate(step + 1)


class ZerothOrderStep:
    """One device's step: the 2q losses from one forward over the tiled batch (`batched`) or from 2q forwards, then
    the update. A pipeline stage's step (pac.runtime.zo_pipeline) finds its losses otherwise (`step_losses`)."""

    def __init__(
        self,
        model: ZerothOrderModel,
        source: BatchSource,
        config: TrainConfig,
        perturbations: int,
        eps: float,
        batched: bool = True,
        engine: Callable[[dict[str, torch.Tensor], Copies], torch.Tensor] | None = None,
    ):
        """`engine`: what computes each copy's summed loss (pac.methods.zo.engine); None: the model, eagerly."""
        self.model, self.source, self.config = model, source, config
        self.q, self.eps, self.batched = perturbations, eps, batched
        self.loss_sums = engine or model.copy_loss_sums
        self.update = ZerothOrderUpdate(config, len(source))

    @property
    def lr(self) -> float:
        return self.update.lr

    def losses(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """[L(theta + eps z_0), L(theta - eps z_0), L(theta + eps z_1), ...] for this step's directions."""
        copies = perturbed_copies(self.model.trained(), direction_seeds(self.config.seed, step, self.q), self.eps)
        count = loss_count(self.model.task, batch["labels"])
        if self.batched:
            return self.loss_sums(batch, copies) / count
        singles = [{name: c[j : j + 1] for name, c in copies.items()} for j in range(2 * self.q)]
        return torch.cat([self.loss_sums(batch, one) for one in singles]) / count

    def step_losses(self, indices: list[int], step: int) -> torch.Tensor:
        """The 2q losses of the step's batch."""
        return self.losses(self.source.batch(indices), step)

    @torch.no_grad()
    def __call__(self, indices: list[int], step: int) -> StepResult:
        self.model.eval()  # no dropout: every copy must see the same function but for its perturbation
        losses = self.step_losses(indices, step)
        projected = projected_gradients(losses, self.eps)
        self.update.apply(self.model.trained(), projected, direction_seeds(self.config.seed, step, self.q), step)
        return StepResult(float(losses.mean()), {"projected_grad": float(projected.abs().mean())})

    def state_dict(self) -> dict[str, Any]:
        return {}  # the directions come from (seed, step); the weights ride in the model's (or stage's) checkpoint

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
