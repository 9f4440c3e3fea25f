"""Training steps (pac.runtime.step) plugged into the unchanged loop: the default step is the trainer of
before, and two steps of other kinds (zeroth-order, masked sparse) train, checkpoint and resume exactly."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from torch import nn

from pac.methods.base import MethodModel, task_loss
from pac.runtime.step import BackpropStep, StepResult, lr_factor
from pac.runtime.trainer import BatchSource, TrainConfig, Trainer, epoch_order


class Blobs:
    """Points whose class is the sign of their first coordinate: easy for a linear model."""

    def __init__(self, n: int = 64, features: int = 8):
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, features, generator=gen)
        self.labels = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        i = torch.tensor(indices)
        return {"x": self.x[i], "labels": self.labels[i]}


class LinearClassifier(MethodModel):
    """The smallest method: a linear map to two classes, its bias at half the learning rate."""

    task = "classify"

    def __init__(self, features: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(features, 2)

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(batch["x"])

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": [self.linear.weight], "lr": lr}, {"params": [self.linear.bias], "lr": lr / 2}]


class ZerothOrderStep:
    """SPSA as MeZO runs it: the loss at w + eps z and at w - eps z (z drawn from a seed, never stored),
    their difference projects the gradient on z, and w moves by -lr (that projection) z. Two forward passes,
    no backward, no gradients in memory. Each step's seed comes from the step's own generator, which is
    its whole state."""

    def __init__(self, model: MethodModel, source: BatchSource, lr: float, eps: float = 1e-3, seed: int = 0):
        self.model, self.source, self.lr, self.eps = model, source, lr, eps
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.seeds = torch.Generator().manual_seed(seed)

    def _move(self, seed: int, scale: float) -> None:
        gen = torch.Generator().manual_seed(seed)
        for p in self.params:
            p.add_(torch.randn(p.shape, generator=gen), alpha=scale)

    @torch.no_grad()
    def __call__(self, indices: list[int], step: int) -> StepResult:
        batch = self.source.batch(indices)
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.seeds))
        self._move(seed, self.eps)
        plus = self.model.loss_batch(batch).item()
        self._move(seed, -2 * self.eps)
        minus = self.model.loss_batch(batch).item()
        projected = (plus - minus) / (2 * self.eps)
        self._move(seed, self.eps - self.lr * projected)  # back to w, and the update, in one pass over z
        return StepResult((plus + minus) / 2, {"projected_grad": projected})

    def state_dict(self) -> dict[str, Any]:
        return {"seeds": self.seeds.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seeds.set_state(state["seeds"])


class MaskedStep(BackpropStep):
    """The default update restricted to a mask fixed at the start: the half of each weight's entries
    largest in magnitude. The other entries get no gradient, so AdamW (without weight decay) leaves them
    exactly as they were. The masks are part of the state: a resumed run keeps the masks of its start."""

    def __init__(self, model: MethodModel, source: BatchSource, config: TrainConfig):
        if config.weight_decay:
            raise ValueError("weight decay would move the masked-out entries too")
        super().__init__(model, model.task, source, config)
        self.masks = [_top_half(p) for p in self.params]

    def gradients(self, indices: list[int], step: int) -> tuple[float, float]:
        loss = self.loss(self.source.batch(indices))
        loss.backward()
        for p, mask in zip(self.params, self.masks, strict=True):
            p.grad.mul_(mask)
        return loss.item(), self.clip()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "masks": self.masks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.masks = state["masks"]


def _top_half(p: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(p.numel(), dtype=p.dtype)
    mask[p.detach().abs().flatten().topk(max(1, p.numel() // 2)).indices] = 1
    return mask.view_as(p)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def _losses(out) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "step" in r]


CONFIG = TrainConfig(epochs=10, batch_size=8, lr=0.05, max_grad_norm=0.5)


def _fit_interrupted_and_whole(make_step, tmp_path, stop_after: int) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train twice: once whole, once stopped after `stop_after` steps and resumed by a fresh model and step.
    Asserts both end on the same weights and log the same losses; returns the whole run's model and epochs."""
    source = Blobs()
    runs = {}
    for name in ("whole", "cut"):
        model = LinearClassifier()
        step = make_step(model, source)
        trainer = Trainer(model, "classify", source, CONFIG, tmp_path / name, val=source, train_step=step)
        if name == "cut":
            trainer.fit(stop_after_steps=stop_after)
            model = LinearClassifier()
            step = make_step(model, source)
            trainer = Trainer(model, "classify", source, CONFIG, tmp_path / name, val=source, train_step=step)
        runs[name] = model, trainer.fit()
    _assert_same(_weights(runs["whole"][0]), _weights(runs["cut"][0]))
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "cut")
    return runs["whole"]


def test_a_zeroth_order_step_learns_without_gradients_and_resumes_exactly(tmp_path, monkeypatch):
    def no_backward(*args, **kwargs):
        raise AssertionError("a zeroth-order step never runs backward")

    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    monkeypatch.setattr(torch.autograd, "backward", no_backward)
    model, epochs = _fit_interrupted_and_whole(
        lambda model, source: ZerothOrderStep(model, source, lr=0.05), tmp_path, stop_after=29
    )
    assert all(p.grad is None for p in model.parameters())  # nothing ever wrote a gradient (nothing clears them)
    train_losses = [e["train_loss"] for e in epochs]
    assert train_losses[-1] < 0.6 * train_losses[0], train_losses
    assert epochs[-1]["val_accuracy"] > 0.85
    record = json.loads((tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()[0])
    assert record.keys() == {"step", "epoch", "loss", "projected_grad", "lr"} and record["lr"] == 0.05


def test_a_masked_step_moves_only_its_entries_and_resumes_exactly(tmp_path):
    start = _weights(LinearClassifier())
    model, epochs = _fit_interrupted_and_whole(lambda model, source: MaskedStep(model, source, CONFIG), tmp_path, 45)
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    for name, p in model.named_parameters():
        selected = _top_half(start[name]).bool()
        assert torch.equal(p.detach()[~selected], start[name][~selected]), name  # bit-identical
        assert (p.detach()[selected] != start[name][selected]).all(), name


def test_a_checkpoint_of_another_step_is_refused_and_one_from_before_steps_loads(tmp_path):
    source = Blobs()
    Trainer(LinearClassifier(), "classify", source, CONFIG, tmp_path).fit(stop_after_steps=3)
    model = LinearClassifier()
    zeroth = Trainer(model, "classify", source, CONFIG, tmp_path, train_step=ZerothOrderStep(model, source, 0.05))
    with pytest.raises(ValueError, match="written by a BackpropStep training step, not ZerothOrderStep"):
        zeroth.fit()
    # Checkpoints written before steps were pluggable say nothing of their step; their state is BackpropStep's.
    checkpoint = tmp_path / "checkpoints" / "step-0000003"
    state = json.loads((checkpoint / "trainer.json").read_text())
    del state["step_kind"]
    (checkpoint / "trainer.json").write_text(json.dumps(state))
    resumed = Trainer(LinearClassifier(), "classify", source, CONFIG, tmp_path)
    resumed.load_checkpoint(checkpoint)
    assert resumed.step == 3 and resumed.train_step.scheduler.last_epoch == 3


def _reference_fit(model: LinearClassifier, source: Blobs, config: TrainConfig) -> list[float]:
    """Training as pac.runtime.trainer.Trainer did it when the step was part of the loop."""
    optimizer = torch.optim.AdamW(model.param_groups(config.lr), lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = math.ceil(len(source) / config.batch_size)
    total = per_epoch * config.epochs
    warmup = int(config.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, config.schedule))
    params, losses = [p for p in model.parameters() if p.requires_grad], []
    model.train()
    for epoch in range(config.epochs):
        order = epoch_order(len(source), config.seed, epoch)
        for b in range(per_epoch):
            batch = source.batch(order[b * config.batch_size : (b + 1) * config.batch_size])
            loss = task_loss("classify", model.forward_batch(batch), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    return losses


def test_the_default_step_is_the_trainer_of_before_bit_for_bit(tmp_path):
    source = Blobs(60)  # the last batch of an epoch is short
    config = TrainConfig(epochs=3, batch_size=8, lr=0.05, max_grad_norm=0.1, warmup_ratio=0.2, weight_decay=0.01)
    model = LinearClassifier()
    Trainer(model, "classify", source, config, tmp_path).fit()
    reference = LinearClassifier()
    losses = _reference_fit(reference, source, config)
    _assert_same(_weights(model), _weights(reference))
    assert _losses(tmp_path) == losses
