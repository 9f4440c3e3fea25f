"""Phase 2 in `side-pipeline` mode: the side network itself runs as a pipeline over the peers.

In this mode phase 1 leaves every layer's taps on the peer that computed them (no cache traffic).
Stage k holds the taps of its layers for *all* samples, so it runs the side blocks of those layers:

    stage 0:    s = Down_0(h_0), then its blocks      -> sends s (width d/r) to stage 1
    stage k:    receives s, runs its blocks           -> sends s on
    last stage: receives s, runs its blocks, Norm, Up, head and loss
    backward:   the gradient of s flows back stage by stage

Each global batch is cut into micro-batches. A `SideStage` knows how to run, send and receive one
micro-batch; a schedule of pac.plan.schedule (GPipe or 1F1B, evaluation forward-only) says in which
order, so stages overlap. Every rank keeps a full copy of the side network but computes, and so
updates, only its own part (`SideNetwork.stage_parameters`); gradients are clipped by the global norm
(one all-reduce of squared norms) and the parts are summed into one adapter at the end. Up to float
summation order this takes the same steps as one device with the same batch and seed.

The pipelined forward/backward is the gradient hook of the trainer's step (a pac.runtime.step.BackpropStep,
which keeps the optimizer and learning-rate schedule); the loop is the plain Trainer's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pac.methods.base import batch_metrics, loss_count, summarize
from pac.methods.parallel_adapters import ParallelAdapterModel
from pac.net.dataplane import DataPlane, QueuedSends
from pac.plan.placement import Plan, stage_taps
from pac.plan.schedule import forward_only, run, split_batch, training_schedule
from pac.runtime.distributed import slowest_of_ranks
from pac.runtime.stage_messages import StageMessages
from pac.runtime.step import BackpropStep
from pac.runtime.trainer import BatchSource, TrainConfig, Trainer, evaluation_batches

log = logging.getLogger(__name__)


class StagePart:
    """Which taps, side blocks and parameters one stage owns, from the side network's structure."""

    def __init__(self, model: ParallelAdapterModel, plan: Plan, rank: int):
        taps, side = model.taps, model.side
        mine = stage_taps(plan.stages[rank], taps)
        first, last = taps.index(mine[0]), taps.index(mine[-1]) + 1
        self.rows = slice(first, last)  # rows of the stacked taps / Down weights
        self.blocks = range(max(first - 1, 0), last - 1)  # block j reads tap taps[j + 1]
        self.first, self.last = rank == 0, rank == plan.world - 1
        self._owned = {
            id(p): True if mask is None else mask for p, mask in side.stage_parameters(self.rows, self.blocks)
        }
        every_stage = side.stage_parameters(slice(None), range(len(side.blocks)))
        self._pipelined = {id(p) for p, _ in every_stage}

    def owns(self, param: torch.nn.Parameter) -> torch.Tensor | bool:
        """True, False, or a boolean mask over the first dimension of `param`. What no stage's side blocks
        hold (Norm, Up, the head, the final norm, the vocabulary bias) belongs to the last stage."""
        if id(param) in self._pipelined:
            return self._owned.get(id(param), False)
        return self.last


class SideStage:
    """One stage's side network on the micro-batches of one pass: run, send and receive them by number.

    A pass is started with `begin`; a schedule then calls forward/backward/send_*/recv_* (pac.plan.schedule.run),
    and the stages' messages go by (kind, pass, micro-batch) (pac.runtime.stage_messages)."""

    def __init__(self, model: ParallelAdapterModel, task: str, part: StagePart, plane: DataPlane, rank: int):
        self.model, self.task, self.part, self.plane, self.rank = model, task, part, plane, rank
        self.messages = StageMessages(plane, {"state": {rank - 1}, "grad": {rank + 1}}, "side pipeline")

    def begin(
        self,
        tag: list,
        batch: Callable[[int], dict[str, torch.Tensor]],
        sends: QueuedSends,
        *,
        train: bool,
        total: int = 0,
    ) -> None:
        """A new pass: `tag` names it on the wire, `batch(m)` gives micro-batch m, `total` is the loss count
        of the whole training batch (each micro-batch's loss is scaled to its share)."""
        self.tag, self.batch, self.sends, self.train, self.total = tag, batch, sends, train, total
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self.loss_sum = 0.0
        self.metrics = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}

    def forward(self, micro: int) -> None:
        side, part = self.model.side, self.part
        batch = self.batch(micro)
        downs = side.downs(batch["taps"], part.rows)
        if part.first:
            state, rest = downs[:, 0], downs[:, 1:]
        else:
            state, rest = self.inputs[micro], downs
        state = side.run_blocks(state, rest, part.blocks, batch["attention_mask"])
        if not part.last:
            self.outputs[micro] = state
            return
        side_state = side.norm(state)
        h_last, mask, labels = batch["taps"][:, -1], batch["attention_mask"], batch["labels"]
        if self.train:
            loss = self.model.loss_from_state(h_last, side_state, mask, labels)
            scaled = loss * (loss_count(self.task, labels) / max(self.total, 1))
            self.loss_sum += scaled.item()
            self.outputs[micro] = scaled
        elif self.task == "lm":
            count = loss_count("lm", labels)
            self._add(
                {
                    "loss_sum": self.model.loss_from_state(h_last, side_state, mask, labels).item() * count,
                    "count": count,
                }
            )
        else:
            self._add(batch_metrics(self.task, self.model.logits_from_state(h_last, side_state, mask), labels))

    def backward(self, micro: int) -> None:
        self.outputs.pop(micro).backward(self.grads.pop(micro, None))

    def send_forward(self, micro: int) -> None:
        state = self.outputs[micro] if self.train else self.outputs.pop(micro)
        self.messages.send(self.sends, self.rank + 1, "state", self.tag, micro, {"state": state.detach()})

    def recv_forward(self, micro: int) -> None:
        self.inputs[micro] = self.messages.recv("state", self.tag, micro)["state"].requires_grad_(self.train)

    def send_backward(self, micro: int) -> None:
        self.messages.send(self.sends, self.rank - 1, "grad", self.tag, micro, {"grad": self.inputs.pop(micro).grad})

    def recv_backward(self, micro: int) -> None:
        self.grads[micro] = self.messages.recv("grad", self.tag, micro)["grad"]

    def _add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.metrics[k] += v


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
        group: dist.ProcessGroup | None = None,
        **kwargs: Any,
    ):
        step = BackpropStep(model, task, train, config, gradients=self._train_step)
        super().__init__(model, task, train, config, out_dir, train_step=step, **kwargs)
        self.plan, self.rank, self.group = plan, rank, group
        self.part = StagePart(self.model, plan, rank)
        self.stage = SideStage(self.model, task, self.part, plane, rank)
        self._evaluations = 0

    def _agreed_seconds(self, seconds: float) -> float:
        return slowest_of_ranks(seconds, self.group)

    def _train_step(self, indices: list[int], step: int) -> tuple[float, float]:
        """The step's gradients (`step` is self.step): this stage's part of the batch's, clipped by the global norm."""
        batches = [self.train_source.batch(list(p)) for p in split_batch(indices, self.plan.micro_batches)]
        total = sum(loss_count(self.task, b["labels"]) for b in batches)
        actions = training_schedule(self.plan.schedule, self.plan.world, len(batches))[self.rank]
        with QueuedSends(self.stage.plane) as sends:
            self.stage.begin(["train", self.step], batches.__getitem__, sends, train=True, total=total)
            run(actions, self.stage)
        # Global gradient norm: each parameter element is computed by exactly one stage.
        squares = sum(float(p.grad.pow(2).sum()) for p in self.params if p.grad is not None)
        totals = torch.tensor([squares, self.stage.loss_sum], dtype=torch.float64)
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
        parts = evaluation_batches(len(source))
        self._evaluations += 1
        with torch.no_grad(), QueuedSends(self.stage.plane) as sends:
            self.stage.begin(["eval", self._evaluations], lambda m: source.batch(parts[m]), sends, train=False)
            if parts:
                run(forward_only(self.plan.world, len(parts))[self.rank], self.stage)
        self.model.train(was_training)
        totals = self.stage.metrics
        summed = torch.tensor(list(totals.values()), dtype=torch.float64)
        dist.all_reduce(summed, group=self.group)  # only the last stage has non-zero totals
        return summarize(self.task, dict(zip(totals, summed.tolist(), strict=True)))

    def gather_adapter(self) -> None:
        """Sum every stage's own part into one full set of weights, on every rank: one all-reduce of them all,
        as one call per tensor pays a round trip each."""
        with torch.no_grad():
            parts = []
            for p in self.params:
                owned = self.part.owns(p)
                mine = p.clone() if owned is True else torch.zeros_like(p)
                if isinstance(owned, torch.Tensor):
                    mine[owned] = p[owned]
                parts.append(mine)
            summed = torch.cat([part.view(-1) for part in parts])
            dist.all_reduce(summed, group=self.group)
            for p, whole in zip(self.params, summed.split([p.numel() for p in self.params]), strict=True):
                p.copy_(whole.view_as(p))
