"""Phase 2 in `side-pipeline` mode: the side network itself runs as a pipeline over the peers.

In this mode phase 1 leaves every layer's taps on the peer that computed them (no cache traffic).
Stage k holds the taps of its layers for *all* samples, so it runs the side blocks of those layers:

    stage 0:    s = Down_0(h_0), then its blocks      -> sends s (width d/r) to stage 1
    stage k:    receives s, runs its blocks           -> sends s on
    last stage: receives s, runs its blocks, Norm, Up, head and loss
    backward:   the gradient of s flows back stage by stage

Each global batch is cut into micro-batches that flow GPipe-style (all forwards, then all backwards),
so stages overlap. Every rank keeps a full copy of the side network but computes, and so updates,
only its own part; gradients are clipped by the global norm (one all-reduce of squared norms) and
the parts are summed into one adapter at the end. Up to float summation order this takes the same
steps as one device with the same batch and seed.

The pipelined forward/backward is the gradient hook of the trainer's step (a pac.runtime.step.BackpropStep,
which keeps the optimizer and schedule); the loop is the plain Trainer's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pac.methods.base import batch_metrics, loss_count, summarize
from pac.methods.parallel_adapters import ParallelAdapterModel
from pac.net.dataplane import DataPlane
from pac.plan.placement import Plan, stage_taps
from pac.runtime.step import BackpropStep
from pac.runtime.trainer import BatchSource, TrainConfig, Trainer

log = logging.getLogger(__name__)


class StagePart:
    """Which taps, side blocks and parameters one stage owns."""

    def __init__(self, model: ParallelAdapterModel, plan: Plan, rank: int):
        taps = model.taps
        mine = stage_taps(plan.stages[rank], taps)
        first, last = taps.index(mine[0]), taps.index(mine[-1]) + 1
        self.rows = slice(first, last)  # rows of the stacked taps / Down weights
        self.blocks = range(max(first - 1, 0), last - 1)  # block j reads tap taps[j + 1]
        self.first, self.last = rank == 0, rank == plan.world - 1

    def owns(self, name: str, shape: torch.Size) -> torch.Tensor | bool:
        """True, False, or a boolean mask over the first dimension of parameter `name`."""
        if name.startswith("side.down_"):
            mask = torch.zeros(shape[0], dtype=torch.bool)
            mask[self.rows] = True
            return mask
        if name == "side.gate_logits":
            mask = torch.zeros(shape[0], dtype=torch.bool)
            mask[list(self.blocks)] = True
            return mask
        if name.startswith("side.blocks."):
            return int(name.split(".")[2]) in self.blocks
        return self.last  # Norm, Up, head, final norm, vocab bias


class SidePipelineTrainer(Trainer):
    """A Trainer whose steps and evaluations run the side network across the stages of a pipeline."""

    def __init__(
        self,
        model: ParallelAdapterModel,
        task: str,
        train: BatchSource,
        config: TrainConfig,
        out_dir: Path,
        *,
        plane: DataPlane,
        plan: Plan,
        rank: int,
        micro_batches: int = 2,
        group: dist.ProcessGroup | None = None,
        **kwargs: Any,
    ):
        step = BackpropStep(model, task, train, config, gradients=self._train_step)
        super().__init__(model, task, train, config, out_dir, train_step=step, **kwargs)
        self.plane, self.plan, self.rank, self.group = plane, plan, rank, group
        self.part = StagePart(self.model, plan, rank)
        self.micro_batches = micro_batches

    # ------------------------------------------------------------------ one stage's pass
    def _stage_forward(self, batch: dict[str, torch.Tensor], tag: dict, grad: bool) -> tuple[torch.Tensor, ...]:
        """Run this stage on a (micro-)batch; returns (state entering, state leaving or side state)."""
        side = self.model.side
        downs = side.downs(batch["taps"], self.part.rows)
        if self.part.first:
            state_in, rest = None, downs[:, 1:]
            state = downs[:, 0]
        else:
            header, tensors = self.plane.recv()
            _expect(header, {"kind": "state", **tag}, self.rank - 1)
            state_in = tensors["state"].requires_grad_(grad)
            state, rest = state_in, downs
        state = side.run_blocks(state, rest, self.part.blocks, batch["attention_mask"])
        if not self.part.last:
            self.plane.send(self.rank + 1, {"kind": "state", **tag}, {"state": state.detach()})
        return state_in, state

    def _train_step(self, indices: list[int], step: int) -> tuple[float, float]:
        """The step's gradients (`step` is self.step): this stage's part of the batch's, clipped by the global norm."""
        parts = [list(p) for p in _chunks(indices, self.micro_batches)]
        batches = [self.train_source.batch(p) for p in parts]
        total = sum(loss_count(self.task, b["labels"]) for b in batches)
        graphs, loss_sum = [], 0.0
        for m, batch in enumerate(batches):  # all forwards, in order ...
            state_in, state = self._stage_forward(batch, {"micro": m, "step": self.step}, grad=True)
            if self.part.last:
                side_state = self.model.side.norm(state)
                loss = self.model.loss_from_state(
                    batch["taps"][:, -1], side_state, batch["attention_mask"], batch["labels"]
                )
                scaled = loss * (loss_count(self.task, batch["labels"]) / max(total, 1))
                loss_sum += scaled.item()
                graphs.append((state_in, scaled))
            else:
                graphs.append((state_in, state))
        for m in reversed(range(len(batches))):  # ... then all backwards, in reverse
            state_in, out = graphs[m]
            if self.part.last:
                out.backward()
            else:
                header, tensors = self.plane.recv()
                _expect(header, {"kind": "grad", "micro": m, "step": self.step}, self.rank + 1)
                out.backward(tensors["grad"])
            if state_in is not None:
                self.plane.send(self.rank - 1, {"kind": "grad", "micro": m, "step": self.step}, {"grad": state_in.grad})
        # Global gradient norm: each parameter element is computed by exactly one stage.
        squares = sum(float(p.grad.pow(2).sum()) for p in self.params if p.grad is not None)
        totals = torch.tensor([squares, loss_sum], dtype=torch.float64)
        dist.all_reduce(totals, group=self.group)
        norm = float(totals[0].sqrt())
        coef = min(1.0, self.config.max_grad_norm / (norm + 1e-6))  # as torch.nn.utils.clip_grad_norm_
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(coef)
        return float(totals[1]), norm

    def _evaluate(self, source: BatchSource) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        totals = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
        with torch.no_grad():
            for b, start in enumerate(range(0, len(source), 8)):
                batch = source.batch(list(range(start, min(start + 8, len(source)))))
                _, state = self._stage_forward(batch, {"micro": -1, "step": b}, grad=False)
                if not self.part.last:
                    continue
                side_state = self.model.side.norm(state)
                h_last, mask, labels = batch["taps"][:, -1], batch["attention_mask"], batch["labels"]
                if self.task == "lm":
                    count = loss_count("lm", labels)
                    loss = self.model.loss_from_state(h_last, side_state, mask, labels)
                    metrics = {"loss_sum": loss.item() * count, "count": count}
                else:
                    metrics = batch_metrics(self.task, self.model.logits_from_state(h_last, side_state, mask), labels)
                for k, v in metrics.items():
                    totals[k] += v
        self.model.train(was_training)
        summed = torch.tensor(list(totals.values()), dtype=torch.float64)
        dist.all_reduce(summed, group=self.group)  # only the last stage has non-zero totals
        return summarize(self.task, dict(zip(totals, summed.tolist(), strict=True)))

    def gather_adapter(self) -> None:
        """Sum every stage's own part into one full set of weights, on every rank."""
        with torch.no_grad():
            for name, p in zip(self.names, self.params, strict=True):
                owned = self.part.owns(name, p.shape)
                mine = p.clone() if owned is True else torch.zeros_like(p)
                if isinstance(owned, torch.Tensor):
                    mine[owned] = p[owned]
                dist.all_reduce(mine, group=self.group)
                p.copy_(mine)


def _chunks(indices: Sequence[int], count: int) -> list[Sequence[int]]:
    """`count` near-equal contiguous parts (fewer when the batch is smaller)."""
    count = max(1, min(count, len(indices)))
    size, extra = divmod(len(indices), count)
    parts, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        parts.append(indices[start:end])
        start = end
    return parts


def _expect(header: dict, wanted: dict, src: int) -> None:
    got = {k: header.get(k) for k in wanted}
    if got != wanted or header.get("src") != src:
        raise RuntimeError(f"side pipeline out of step: expected {wanted} from rank {src}, got {header}")
