"""Phase 2: train a method's model for E epochs, with checkpoints that resume exactly.

This is the loop; the update it makes on each batch is a `TrainStep` (pac.runtime.step), by default
`BackpropStep`. The loop owns the order and the bookkeeping: which samples form each step's batch,
when to evaluate, checkpoint, log and stop; the step owns the loss and how the weights change (gradients or
not, the optimizer, the schedule), and hands its state to the loop's checkpoints. So the loop never
mentions backward or an optimizer, and a zeroth-order or masked step trains under the same epochs,
checkpoints and early stopping.

The trainer knows nothing about caches or backbones: it draws sample positions of a `BatchSource`
(cached taps for parallel adapters, token ids for LoRA), and evaluation asks the model (a
pac.methods.base.MethodModel) for `metrics_batch`. The sample order of epoch e is a pure function of
(seed, e), so a run resumed from a checkpoint at step k sees exactly the batches an uninterrupted run
would have seen after step k.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save, save_file
from tqdm.auto import tqdm

from pac.methods.base import MethodModel, summarize
from pac.runtime.device import device_of, inference, to_cpu
from pac.runtime.progress import RunClock, Stopwatch
from pac.runtime.step import BackpropStep, TrainStep, steps_per_epoch

log = logging.getLogger(__name__)


class BatchSource(Protocol):
    """Samples named by id, drawn by their position 0..len-1 in `sample_ids`; `batch` returns a dict of tensors
    incl. "labels"."""

    sample_ids: list[str]

    def __len__(self) -> int: ...

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]: ...


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at epoch ends
    keep_checkpoints: int = 2
    # Epochs without a better holdout loss before training stops (0: never stop early). With a holdout
    # source the trainer always keeps the best epoch's weights and ends on them.
    early_stopping: int = 0
    # "bf16": the training steps' matrix products in bfloat16 (autocast); weights, optimizer state and
    # evaluation stay float32, so reported figures are exact.
    precision: str = "fp32"


EVAL_BATCH = 8  # samples per batch of an evaluation pass
# Without --checkpoint-every, a checkpoint at least this often besides every epoch's end: the most work a crash
# can cost. The interval in steps is set from the pace of the first AUTO_CHECKPOINT_STEPS steps, agreed by every
# rank of a collaborative run (one collective, once), so that their checkpoints stay at the same steps.
CHECKPOINT_SECONDS = 300.0
AUTO_CHECKPOINT_STEPS = 3


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled sample order of one epoch, reproducible from (seed, epoch) alone."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=gen).tolist()


def evaluate(model: MethodModel, source: BatchSource, task: str, batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """Accuracy (classify) or loss/perplexity (lm) over every sample of `source`; no figures for an empty
    source (an accuracy of 0 or a perplexity of 1 would be made up)."""
    if not len(source):
        return {}
    return summarize(task, evaluation_totals(model, source, batch_size))


def evaluation_batches(size: int, batch_size: int = EVAL_BATCH) -> list[list[int]]:
    """The positions of an evaluation pass over `size` samples, batch by batch, in order."""
    return [list(range(start, min(start + batch_size, size))) for start in range(0, size, batch_size)]


def evaluation_totals(model: MethodModel, source: BatchSource, batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """Sums over `source` (loss_sum, count, correct): totals of several shards add up to the whole."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    with inference(device_of(model)):
        for positions in evaluation_batches(len(source), batch_size):
            for k, v in model.metrics_batch(source.batch(positions)).items():
                totals[k] = totals.get(k, 0) + v
    model.train(was_training)
    return totals


class Trainer:
    """The loop: epochs of batches through `train_step` (default: `BackpropStep` over `train`)."""

    def __init__(
        self,
        model: MethodModel,
        task: str,
        train: BatchSource,
        config: TrainConfig,
        out_dir: Path,
        val: BatchSource | None = None,
        holdout: BatchSource | None = None,
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
        on_step: Callable[[int, int, float], None] | None = None,
        clock: RunClock | None = None,
        train_step: TrainStep | None = None,
        on_checkpoint: Callable[[int], None] | None = None,
    ):
        self.model, self.task, self.train_source = model, task, train
        # An empty validation split (a few rows at --val-size 10%) leaves nothing to validate on: the epochs
        # then report the training loss only. Every rank of a collaborative run sees the whole split's size.
        self.val_source = val if val is not None and len(val) else None
        # Part of the training data kept out of the gradient steps: it picks the epoch to keep
        # (the validation set never does, or its figures would be optimistic).
        self.holdout_source = holdout
        if config.early_stopping and holdout is None:
            raise ValueError("early stopping needs a holdout source (a part of the training data)")
        self.best: dict[str, float] | None = None  # {"epoch", "loss"} of the best holdout loss so far
        self.config, self.out_dir = config, Path(out_dir)
        self.on_epoch_end, self.on_step = on_epoch_end, on_step  # progress for whoever watches (a coordinator)
        self.on_checkpoint = on_checkpoint  # told each step a checkpoint holds (a coordinator admits peers then)
        # The weights a checkpoint holds (whatever the step changes, it changes among these).
        weights = model.trained_weights()
        self.names, self.params = list(weights), list(weights.values())
        self.train_step = train_step if train_step is not None else BackpropStep(model, task, train, config)
        self.steps_per_epoch = steps_per_epoch(len(train), config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.step = 0  # updates done
        self._step_seconds: list[float] = []  # the first steps' times, to set the automatic checkpoint interval
        self._auto_every: int | None = None
        self.metrics_file = self.out_dir / "metrics.jsonl"
        self.clock = clock or RunClock()  # the whole run's estimate, shown beside the epoch bar

    # ------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Trainable weights and the step's state (optimizer, schedule, RNG...) at this step; written then renamed."""
        target = self.checkpoint_dir / f"step-{self.step:07d}"
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # Serialised in memory, then written by Python: a full disk is then an OSError (ENOSPC) that says so,
        # where torch.save's own writer fails with "unexpected pos" (pac.runtime.storage tells the user).
        (tmp / "trainable.safetensors").write_bytes(save(self._weights()))
        buffer = io.BytesIO()
        torch.save(to_cpu(self.train_step.state_dict()), buffer)
        (tmp / "state.pt").write_bytes(buffer.getbuffer())
        state = {"step": self.step, "config": asdict(self.config), "best": self.best, "step_kind": self._step_kind}
        (tmp / "trainer.json").write_text(json.dumps(state))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        for old in sorted(self.checkpoint_dir.glob("step-???????"))[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.step)
        return target

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in self.checkpoint_dir.glob("step-???????") if (p / "trainer.json").exists())
        return done[-1] if done else None

    @property
    def _step_kind(self) -> str:
        return type(self.train_step).__name__

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "trainer.json").read_text())
        if state["config"] != asdict(self.config):
            raise ValueError(
                f"checkpoint {path} was written with other training settings ({state['config']}); "
                "resume with the same settings, or start over in a fresh --out directory"
            )
        # Checkpoints from before steps were pluggable name no kind: every trainer then saved BackpropStep's state.
        kind = state.get("step_kind")
        if kind is not None and kind != self._step_kind:
            raise ValueError(
                f"checkpoint {path} was written by a {kind} training step, not {self._step_kind}: "
                "resume with the same method, or start over in a fresh --out directory"
            )
        self._load_weights(path / "trainable.safetensors")
        # Onto the CPU: the optimizer moves its state to the weights' device, so a run resumes on another device.
        self.train_step.load_state_dict(torch.load(path / "state.pt", map_location="cpu", weights_only=False))
        self.step, self.best = state["step"], state.get("best")

    @property
    def best_weights_file(self) -> Path:
        return self.checkpoint_dir / "best" / "trainable.safetensors"

    def _track_best(self, epoch: int, record: dict[str, Any]) -> None:
        """Evaluate the holdout part; keep the weights of the best epoch on disk (they survive a resume)."""
        held = self._evaluate(self.holdout_source)
        record.update({f"holdout_{k}": v for k, v in held.items()})
        if self.best is None or held["loss"] < self.best["loss"]:
            self.best = {"epoch": epoch, "loss": held["loss"]}
            self.best_weights_file.parent.mkdir(parents=True, exist_ok=True)
            save_file(self._weights(), self.best_weights_file)
        record["best_epoch"] = self.best["epoch"]

    def _patience_exhausted(self, epochs_done: int) -> bool:
        patience = self.config.early_stopping
        return bool(patience) and self.best is not None and epochs_done - self.best["epoch"] >= patience

    def _weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu").contiguous() for n, p in zip(self.names, self.params, strict=True)}

    def _load_weights(self, file: Path) -> None:
        weights = load_file(file)
        with torch.no_grad():
            for name, param in zip(self.names, self.params, strict=True):
                param.copy_(weights[name])

    # ------------------------------------------------------------ training
    def _automatic_interval(self, seconds: float) -> int | None:
        """Steps between checkpoints for about CHECKPOINT_SECONDS of work, once the first steps are timed."""
        if self._auto_every is None:
            self._step_seconds.append(seconds)
            if len(self._step_seconds) == AUTO_CHECKPOINT_STEPS:
                pace = self._agreed_seconds(max(self._step_seconds))
                self._auto_every = max(1, int(CHECKPOINT_SECONDS / max(pace, 1e-9)))
                log.info("a checkpoint every %d steps (about %.0f s of work)", self._auto_every, CHECKPOINT_SECONDS)
        return self._auto_every

    def _agreed_seconds(self, seconds: float) -> float:
        """A step time every process of the run agrees on: a single process's own."""
        return seconds

    def _logged_epochs(self, finished: int) -> list[dict[str, Any]]:
        """The records of epochs 1..`finished` from the metrics log (the last of each: an epoch logged just
        before a crash, and so trained again, appears twice)."""
        if not finished or not self.metrics_file.exists():
            return []
        records = [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]
        by_epoch = {r["epoch"]: r for r in records if "train_loss" in r and r["epoch"] <= finished}
        return [by_epoch[e] for e in sorted(by_epoch)]

    def _log(self, record: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _evaluate(self, source: BatchSource) -> dict[str, float]:
        return evaluate(self.model, source, self.task)

    def _batches(self, epoch: int, skip: int) -> Iterator[list[int]]:
        order = epoch_order(len(self.train_source), self.config.seed, epoch)
        bs = self.config.batch_size
        for b in range(skip, self.steps_per_epoch):
            yield order[b * bs : (b + 1) * bs]

    def fit(self, resume: bool = True, stop_after_steps: int | None = None) -> list[dict[str, Any]]:
        """Train to the end (or `stop_after_steps`, for tests of interruption). Returns the run's epoch records,
        those of epochs a resumed checkpoint already held included."""
        torch.set_flush_denormal(True)  # denormal grads of the zero-initialised Up slow CPUs down ~2x
        if resume and (ckpt := self.latest_checkpoint()) is not None:
            self.load_checkpoint(ckpt)
            log.info("resumed from %s (step %d)", ckpt, self.step)
        epochs = self._logged_epochs(self.step // self.steps_per_epoch)
        if self.config.epochs == 0 and self.val_source is not None:
            # Nothing to train: report the starting point (for parallel adapters, exactly the backbone).
            record = {
                "epoch": 0,
                **{f"val_{k}": v for k, v in self._evaluate(self.val_source).items()},
            }
            self._log(record)
            return [record]
        self.model.train()
        first_epoch = self.step // self.steps_per_epoch
        self.clock.steps = self.total_steps - self.step
        self.clock.evaluations = (self.config.epochs - first_epoch) * (self.val_source is not None)
        self.clock.batch_size = self.config.batch_size
        self.clock.eval_steps = math.ceil(len(self.val_source) / EVAL_BATCH) if self.val_source is not None else 0
        for epoch in range(first_epoch, self.config.epochs):
            if self._patience_exhausted(epoch):
                break
            skip = self.step - epoch * self.steps_per_epoch
            started, seen, loss_sum = time.perf_counter(), 0, 0.0
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=skip,
                desc=f"epoch {epoch + 1}/{self.config.epochs}",
                unit="step",
                leave=False,
                dynamic_ncols=True,
                disable=None,  # no bar where output goes to a file: the epoch lines say it there
            )
            lap = Stopwatch()
            for indices in self._batches(epoch, skip):
                result = self.train_step(indices, self.step)
                loss = result.loss
                self.step += 1
                seen += len(indices)
                loss_sum += loss * len(indices)
                seconds = lap.lap()
                self.clock.step_done(seconds)
                bar.set_postfix_str(f"loss {loss:.4f}  {self.clock.left()}", refresh=False)
                bar.update()
                if self.on_step is not None:
                    self.on_step(self.step, self.total_steps, loss)
                self._log(
                    {"step": self.step, "epoch": epoch + 1, "loss": loss, **result.metrics, "lr": self.train_step.lr}
                )
                every = self.config.checkpoint_every or self._automatic_interval(seconds)
                if every and self.step % every == 0 and self.step % self.steps_per_epoch:
                    self.save_checkpoint()
                if stop_after_steps is not None and self.step >= stop_after_steps:
                    bar.close()
                    self.save_checkpoint()
                    return epochs
            bar.close()
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / max(seen, 1),
                "epoch_seconds": time.perf_counter() - started,
                "samples": seen,
            }
            if self.val_source is not None:
                t0 = time.perf_counter()
                record.update({f"val_{k}": v for k, v in self._evaluate(self.val_source).items()})
                record["eval_seconds"] = time.perf_counter() - t0
                self.clock.evaluation_done(record["eval_seconds"])
            if self.holdout_source is not None:
                self._track_best(epoch + 1, record)
            self._log(record)
            epochs.append(record)
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch + 1, record)
            self.save_checkpoint()
            if self._patience_exhausted(epoch + 1):
                log.info("early stop after epoch %d: holdout loss best at epoch %d", epoch + 1, self.best["epoch"])
        if self.best is not None:
            self._load_weights(self.best_weights_file)
        return epochs
