"""Phase-2 trainer: exact resume from a mid-epoch checkpoint, schedules, metrics log."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import pac.runtime.trainer as trainer_module
from pac.methods.parallel_adapters import ParallelAdapterConfig, ParallelAdapterModel
from pac.models.backbone import load_backbone
from pac.runtime.step import lr_factor
from pac.runtime.trainer import TrainConfig, Trainer, epoch_order


class RandomTaps:
    """A fixed synthetic set of taps with learnable labels (stands in for the cache here)."""

    def __init__(self, n: int, num_taps: int, length: int = 8, width: int = 64):
        gen = torch.Generator().manual_seed(3)
        self.taps = torch.randn(n, num_taps, length, width, generator=gen)
        self.mask = torch.ones(n, length, dtype=torch.long)
        self.mask[::3, -2:] = 0
        self.labels = (self.taps[:, -1, 0, 0] > 0).long()

    def __len__(self):
        return len(self.labels)

    def batch(self, indices):
        i = torch.tensor(indices)
        return {"taps": self.taps[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _trainer(tiny_llama, out, source, holdout=None, **overrides):
    torch.manual_seed(0)
    top = load_backbone(tiny_llama, 4, 4, with_head=True)
    model = ParallelAdapterModel(top, ParallelAdapterConfig(task="classify", reduction=4, label_names=["n", "p"]))
    config = TrainConfig(**{"epochs": 2, "batch_size": 4, "lr": 1e-2, **overrides})
    return model, Trainer(model, "classify", source, config, out, val=source, holdout=holdout)


def test_resume_from_a_mid_epoch_checkpoint_is_exact(tiny_llama, tmp_path):
    source = RandomTaps(22, num_taps=5)  # 6 steps per epoch, the last one short
    full_model, full = _trainer(tiny_llama, tmp_path / "full", source)
    records = full.fit()
    assert [r["epoch"] for r in records] == [1, 2] and "val_accuracy" in records[0]

    _, first = _trainer(tiny_llama, tmp_path / "cut", source)
    first.fit(stop_after_steps=4)  # killed in the middle of epoch 1
    resumed_model, resumed = _trainer(tiny_llama, tmp_path / "cut", source)
    resumed.fit()
    assert resumed.step == full.step == 12
    for (name, a), (_, b) in zip(
        full_model.trainable_state_dict().items(), resumed_model.trainable_state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    losses = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "step" in r] == list(range(1, 13))


def test_checkpoint_with_other_settings_is_refused(tiny_llama, tmp_path):
    source = RandomTaps(8, num_taps=5)
    _, first = _trainer(tiny_llama, tmp_path, source)
    first.fit(stop_after_steps=1)
    _, other = _trainer(tiny_llama, tmp_path, source, seed=5)
    with pytest.raises(ValueError, match="other training settings"):
        other.fit()


def test_without_checkpoint_every_a_checkpoint_follows_minutes_of_work(tiny_llama, tmp_path, monkeypatch):
    """The interval is set from the first steps' pace: here, with CHECKPOINT_SECONDS below one step's time, every
    step after the first three is checkpointed, mid-epoch included, and a resume from one of them is exact."""
    monkeypatch.setattr(trainer_module, "CHECKPOINT_SECONDS", 1e-9)
    source = RandomTaps(22, num_taps=5)  # 6 steps per epoch
    _, cut = _trainer(tiny_llama, tmp_path / "cut", source, keep_checkpoints=10)
    cut.fit(stop_after_steps=5)
    kept = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert kept == ["step-0000003", "step-0000004", "step-0000005"]  # the 5th is also the interruption's
    monkeypatch.setattr(trainer_module, "CHECKPOINT_SECONDS", 300.0)  # the default: none within these steps
    full_model, full = _trainer(tiny_llama, tmp_path / "full", source)
    full.fit()
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["step-0000006", "step-0000012"]
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000005")  # lost: resume from step 4
    resumed_model, resumed = _trainer(tiny_llama, tmp_path / "cut", source, keep_checkpoints=10)
    resumed.fit()
    for (name, a), (_, b) in zip(
        full_model.trainable_state_dict().items(), resumed_model.trainable_state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_training_learns_and_keeps_few_checkpoints(tiny_llama, tmp_path):
    source = RandomTaps(40, num_taps=5)
    _, trainer = _trainer(tiny_llama, tmp_path, source, checkpoint_every=3)
    records = trainer.fit()
    assert records[-1]["val_accuracy"] > 0.8
    assert len(list((tmp_path / "checkpoints").iterdir())) == 2


def test_epoch_order_and_schedule():
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1) != epoch_order(10, 0, 2)
    assert sorted(epoch_order(10, 3, 0)) == list(range(10))
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "linear") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown LR schedule"):
        lr_factor(50, 100, 10, "step")


class FlippedLabels(RandomTaps):
    """The same taps with the opposite labels: the better the model fits the training set, the worse
    its loss here, so the best holdout epoch is the first."""

    def batch(self, indices):
        batch = super().batch(indices)
        return {**batch, "labels": 1 - batch["labels"]}


def test_early_stopping_keeps_the_best_holdout_epoch_and_survives_a_resume(tiny_llama, tmp_path):
    source = RandomTaps(22, num_taps=5)  # 6 steps per epoch
    model, trainer = _trainer(tiny_llama, tmp_path, source, FlippedLabels(22, num_taps=5), epochs=6, early_stopping=1)
    records = trainer.fit()
    assert [r["epoch"] for r in records] == [1, 2]  # epoch 2 was worse on the holdout part: stop
    assert [r["best_epoch"] for r in records] == [1, 1] and records[1]["holdout_loss"] > records[0]["holdout_loss"]
    epoch_one = load_file(tmp_path / "checkpoints" / "step-0000006" / "trainable.safetensors")
    for name, value in model.trainable_state_dict().items():
        torch.testing.assert_close(value, epoch_one[name], rtol=0, atol=0, msg=name)

    # Started again on the same directory, it resumes after epoch 2, sees the patience is spent and ends
    # on the same best weights instead of training on; it reports the run's two epochs from its log.
    again_model, again = _trainer(
        tiny_llama, tmp_path, source, FlippedLabels(22, num_taps=5), epochs=6, early_stopping=1
    )
    assert again.fit() == records and again.step == 12
    for name, value in again_model.trainable_state_dict().items():
        torch.testing.assert_close(value, epoch_one[name], rtol=0, atol=0, msg=name)


def test_early_stopping_needs_a_holdout(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="holdout"):
        _trainer(tiny_llama, tmp_path, RandomTaps(8, num_taps=5), early_stopping=2)
