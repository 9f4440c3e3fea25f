"""Zeroth-order training across devices (`pac-launch --method zo`, placement mode `pipeline`): the frozen model's
layers pipelined over the peers, forward passes only.

Stage k holds layers [a_k, b_k) with their LoRA-FA adapters (pac.methods.zo.model). For each training batch:

    every stage  draws the step's q directions for its own tensors from the shared seeds (pac.methods.zo.step)
                 and stacks the 2q perturbed copies of them
    stage 0      tiles each micro-batch of token ids 2q times and runs its layers  -> hidden states to stage 1
    stage k      receives them and runs its layers (copy c reads its copy c of B) -> on to stage k + 1
    last stage   receives them, runs its layers, the final norm, the head and the 2q summed losses;
                 then sends the 2q mean losses to every stage
    every stage  updates its own B (the last stage its head too) from those losses and the same directions

So per step only hidden states (to the next stage) and 2q numbers (from the last) cross the network, never a
gradient or a weight, and every message goes over the run's data plane (encrypted on ZeroMQ). Micro-batches
overlap the stages on phase 1's forward-only schedule (pac.plan.schedule); evaluation runs the unperturbed model
on the same schedule. Up to float summation order this takes the steps one device takes with the same seed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pac.methods.base import batch_metrics, loss_count, summarize
from pac.methods.zo.model import Copies, ZerothOrderModel
from pac.methods.zo.step import ZerothOrderStep, direction_seeds, perturbed_copies
from pac.net.dataplane import DataPlane, QueuedSends
from pac.plan.placement import Plan
from pac.plan.schedule import forward_only, run, split_batch
from pac.runtime.distributed import slowest_of_ranks
from pac.runtime.stage_messages import StageMessages
from pac.runtime.trainer import BatchSource, TrainConfig, Trainer, evaluation_batches

METRICS = ("loss_sum", "count", "correct")


class ZerothOrderStage:
    """One stage's layers on the micro-batches of one pass (a pac.plan.schedule.ForwardStage): with copies (a
    training step) the last stage sums each copy's loss; without (an evaluation) it sums the metrics."""

    def __init__(self, model: ZerothOrderModel, plane: DataPlane, rank: int, world: int):
        self.model, self.plane, self.rank, self.world = model, plane, rank, world
        sources = {"hidden": {rank - 1}, "result": {world - 1}, "adapter": set(range(1, world)) if rank == 0 else set()}
        self.messages = StageMessages(plane, sources, "zeroth-order pipeline")

    def begin(
        self, tag: list, batch: Callable[[int], dict[str, torch.Tensor]], sends: QueuedSends, copies: Copies | None
    ) -> None:
        self.tag, self.batch, self.sends, self.copies = tag, batch, sends, copies
        self.groups = 1 if copies is None else next(iter(copies.values())).shape[0]
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.loss_sums = torch.zeros(self.groups, dtype=torch.float64)
        self.totals = dict.fromkeys(METRICS, 0.0)

    def forward(self, micro: int) -> None:
        batch = self.batch(micro)
        mask = batch["attention_mask"].repeat(self.groups, 1)
        inputs = batch["input_ids"].repeat(self.groups, 1) if self.model.first else self.inputs.pop(micro)
        hidden = self.model.run(inputs, mask, self.copies)
        if not self.model.last:
            self.outputs[micro] = hidden
        elif self.copies is not None:
            self.loss_sums += self.model.loss_sums(hidden, batch, self.copies).double()
            self.totals["count"] += loss_count(self.model.task, batch["labels"])
        else:
            metrics = batch_metrics(
                self.model.task, self.model.logits(hidden, batch["attention_mask"]), batch["labels"]
            )
            for k, v in metrics.items():
                self.totals[k] += v

    def send_forward(self, micro: int) -> None:
        self.messages.send(self.sends, self.rank + 1, "hidden", self.tag, micro, {"hidden": self.outputs.pop(micro)})

    def recv_forward(self, micro: int) -> None:
        self.inputs[micro] = self.messages.recv("hidden", self.tag, micro)["hidden"]

    def result(self, value: torch.Tensor | None = None) -> torch.Tensor:
        """The last stage's `value` (the pass's result), sent to every other stage; elsewhere, received."""
        if self.rank != self.world - 1:
            return self.messages.recv("result", self.tag, 0)["value"]
        for dest in range(self.world - 1):
            self.messages.send(self.sends, dest, "result", self.tag, 0, {"value": value})
        return value


class PipelinedZerothOrderStep(ZerothOrderStep):
    """A training step of the zeroth-order pipeline: this stage's part of the 2q perturbed forwards, whose losses
    the last stage sends; the update of this stage's own tensors is one device's (ZerothOrderStep)."""

    def __init__(
        self, stage: ZerothOrderStage, source: BatchSource, config: TrainConfig, plan: Plan, q: int, eps: float
    ):
        super().__init__(stage.model, source, config, q, eps)
        self.stage, self.plan = stage, plan
        self.taken = self.sent_bytes = 0  # steps this process took, and what its data plane sent for them

    def step_losses(self, indices: list[int], step: int) -> torch.Tensor:
        stage = self.stage
        copies = perturbed_copies(self.model.trained(), direction_seeds(self.config.seed, step, self.q), self.eps)
        batches = [self.source.batch(list(part)) for part in split_batch(indices, self.plan.micro_batches)]
        sent = stage.plane.bytes_sent
        with QueuedSends(stage.plane) as sends:
            stage.begin(["train", step], batches.__getitem__, sends, copies)
            run(forward_only(self.plan.world, len(batches))[stage.rank], stage)
            means = stage.loss_sums / max(stage.totals["count"], 1) if self.model.last else None
            losses = stage.result(means)
        self.taken, self.sent_bytes = self.taken + 1, self.sent_bytes + stage.plane.bytes_sent - sent
        return losses


class ZerothOrderPipelineTrainer(Trainer):
    """A Trainer whose steps and evaluations run the zeroth-order model across the stages of a pipeline; each
    rank's checkpoints hold its own stage's tensors."""

    def __init__(
        self,
        model: ZerothOrderModel,
        task: str,
        train: BatchSource,
        config: TrainConfig,
        out_dir: Path,
        *,
        plane: DataPlane,
        plan: Plan,
        rank: int,
        perturbations: int,
        eps: float,
        **kwargs: Any,
    ):
        self.stage = ZerothOrderStage(model, plane, rank, plan.world)
        self.plan, self.rank = plan, rank
        step = PipelinedZerothOrderStep(self.stage, train, config, plan, perturbations, eps)
        super().__init__(model, task, train, config, out_dir, train_step=step, **kwargs)
        self._evaluations = 0

    def _agreed_seconds(self, seconds: float) -> float:
        return slowest_of_ranks(seconds)

    def _evaluate(self, source: BatchSource) -> dict[str, float]:
        parts = evaluation_batches(len(source))
        self._evaluations += 1
        stage = self.stage
        with torch.no_grad(), QueuedSends(stage.plane) as sends:
            stage.begin(["eval", self._evaluations], lambda m: source.batch(parts[m]), sends, copies=None)
            run(forward_only(self.plan.world, len(parts))[self.rank], stage)
            totals = torch.tensor([stage.totals[k] for k in METRICS], dtype=torch.float64)
            totals = stage.result(totals if self.stage.model.last else None)
        return summarize(self.task, dict(zip(METRICS, totals.tolist(), strict=True)))

    def gather_adapter(self) -> None:
        """Every stage's adapter tensors (A, B and the head) on rank 0, which saves the adapter: sent over the data
        plane, as everything else of this run."""
        stage, tag = self.stage, ["adapter"]
        with QueuedSends(stage.plane) as sends:
            if self.rank:
                stage.messages.send(sends, 0, "adapter", tag, self.rank, stage.model.adapter())
            else:
                for rank in range(1, self.plan.world):
                    stage.model.gathered |= stage.messages.recv("adapter", tag, rank)
