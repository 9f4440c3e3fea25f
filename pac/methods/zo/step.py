"""The zeroth-order step: P-RGE's estimate from 2q perturbed copies, and the update, with no backward.

Each step's perturbations come from seeds derived from (run seed, step, direction), so nothing about them is
stored between steps (the state is empty: a resumed run draws the same z) and any process that knows the step
can draw the same z_i; each z_i is drawn again, tensor by tensor in a fixed order, where it is needed.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from pac.methods.zo.model import ZerothOrderModel
from pac.runtime.step import StepResult, lr_factor, steps_per_epoch
from pac.runtime.trainer import BatchSource, TrainConfig


def direction_seed(run_seed: int, step: int, direction: int) -> int:
    digest = hashlib.blake2b(f"{run_seed}:{step}:{direction}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def direction(tensors: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """z: one standard normal draw per tensor, in order, from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in tensors]


class ZerothOrderStep:
    """theta <- theta - lr * ((1/q) sum_i g_i z_i + weight_decay * theta), g_i = (L(+eps z_i) - L(-eps z_i)) / 2eps,
    the 2q losses from one forward over the tiled batch (`batched`) or from 2q forwards."""

    def __init__(
        self,
        model: ZerothOrderModel,
        source: BatchSource,
        config: TrainConfig,
        perturbations: int,
        eps: float,
        batched: bool = True,
    ):
        self.model, self.source, self.config = model, source, config
        self.q, self.eps, self.batched = perturbations, eps, batched
        self.total = steps_per_epoch(len(source), config.batch_size) * config.epochs
        self.warmup = int(config.warmup_ratio * self.total)
        self._lr = config.lr * lr_factor(0, self.total, self.warmup, config.schedule)

    @property
    def lr(self) -> float:
        return self._lr

    def losses(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """[L(theta + eps z_0), L(theta - eps z_0), L(theta + eps z_1), ...] for this step's directions."""
        trained = self.model.trained()
        copies: list[list[torch.Tensor]] = [[] for _ in trained]
        for i in range(self.q):
            z = direction(trained, direction_seed(self.config.seed, step, i))
            for k, (theta, z_k) in enumerate(zip(trained, z, strict=True)):
                copies[k] += [theta + self.eps * z_k, theta - self.eps * z_k]
        if self.batched:
            return self.model.copy_losses(batch, [torch.stack(c) for c in copies])
        return torch.cat(
            [self.model.copy_losses(batch, [c[j].unsqueeze(0) for c in copies]) for j in range(2 * self.q)]
        )

    @torch.no_grad()
    def __call__(self, indices: list[int], step: int) -> StepResult:
        self.model.eval()  # no dropout: every copy must see the same function but for its perturbation
        losses = self.losses(self.source.batch(indices), step)
        projected = (losses[0::2] - losses[1::2]) / (2 * self.eps)  # one projected gradient per direction
        lr = self.config.lr * lr_factor(step, self.total, self.warmup, self.config.schedule)
        trained = self.model.trained()
        if self.config.weight_decay:
            for theta in trained:
                theta.mul_(1 - lr * self.config.weight_decay)
        for i in range(self.q):
            for theta, z_k in zip(trained, direction(trained, direction_seed(self.config.seed, step, i)), strict=True):
                theta.add_(z_k, alpha=-lr * float(projected[i]) / self.q)
        self._lr = self.config.lr * lr_factor(step + 1, self.total, self.warmup, self.config.schedule)
        return StepResult(float(losses.mean()), {"projected_grad": float(projected.abs().mean())})

    def state_dict(self) -> dict[str, Any]:
        return {}  # the directions come from (seed, step); the weights ride in the model's checkpoint

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
