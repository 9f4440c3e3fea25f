"""An estimate of the whole run's remaining time (phase 1 + every epoch), for the progress lines.

Every figure comes from rates measured in this run: phase 1's seconds per sample, phase 2's seconds per
step and per evaluation. Before the first training step, a parallel-adapter step is priced from phase 1's
rate: a side-network step over a cached batch measured about a third of a backbone forward per sample
(benchmarks/results/quality_*.md: 0.195 s/sample forward, 0.065 s/sample per side epoch).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STEP_PER_FORWARD_SAMPLE = 0.33


def format_seconds(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 12 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@dataclass
class RunClock:
    """What is left of a run, in samples, steps and evaluations, and how fast each has gone so far."""

    cache_samples: int = 0  # phase-1 samples still to compute
    steps: int = 0  # optimizer steps still to take
    evaluations: int = 0  # validation passes still to run
    batch_size: int = 8
    eval_steps: int = 0  # batches of one validation pass
    step_seconds: float | None = None  # measured seconds per training step
    eval_seconds: float | None = None  # measured seconds per validation pass
    cached_samples: int = 0  # phase-1 samples computed so far ...
    cache_seconds: float = 0.0  # ... and the seconds they took

    @property
    def sample_seconds(self) -> float | None:
        """Measured phase-1 seconds per sample (None before the first batch)."""
        return self.cache_seconds / self.cached_samples if self.cached_samples else None

    def cache_progress(self, samples: int, seconds: float) -> None:
        """`samples` more phase-1 samples took `seconds`."""
        self.cache_samples = max(0, self.cache_samples - samples)
        self.cached_samples += samples
        self.cache_seconds += seconds

    def cache_reused(self, samples: int) -> None:
        self.cache_samples = max(0, self.cache_samples - samples)

    def step_done(self, seconds: float) -> None:
        self.steps = max(0, self.steps - 1)
        # A running mean that favours recent steps (the first ones pay for warm-up).
        self.step_seconds = seconds if self.step_seconds is None else 0.8 * self.step_seconds + 0.2 * seconds

    def evaluation_done(self, seconds: float) -> None:
        self.evaluations = max(0, self.evaluations - 1)
        self.eval_seconds = seconds

    def seconds_left(self) -> float | None:
        """None until one rate is measured that prices every remaining part."""
        step = self.step_seconds
        if step is None and self.sample_seconds is not None:
            step = STEP_PER_FORWARD_SAMPLE * self.batch_size * self.sample_seconds
        if (self.cache_samples and self.sample_seconds is None) or (self.steps and step is None):
            return None
        evaluation = self.eval_seconds if self.eval_seconds is not None else self.eval_steps * (step or 0.0) / 3
        return (
            self.cache_samples * (self.sample_seconds or 0.0)
            + self.steps * (step or 0.0)
            + self.evaluations * evaluation
        )

    def left(self) -> str:
        """'run: ~3 min 05 s left', or '' while nothing is measured yet."""
        seconds = self.seconds_left()
        return "" if seconds is None else f"~{format_seconds(seconds)} left in the run"


class Stopwatch:
    """Seconds since the last call (for per-step and per-batch rates)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """'epoch 2/3: train loss 0.4123  val_accuracy 0.9500  (15.1 s)'; epoch 0 is the untrained start."""
    metrics = "  ".join(f"{k} {record[k]:.4f}" for k in ("val_accuracy", "val_perplexity") if k in record)
    if record["epoch"] == 0:
        return f"before training: {metrics or 'no validation rows'}"
    metrics = metrics or "(no validation rows)"
    seconds = record["epoch_seconds"]
    return f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f}  {metrics}  ({seconds:.1f} s)"


@dataclass
class Watch:
    """What a user follows while a run trains: lines through `report` and the whole run's estimate."""

    report: Callable[[str], None]
    clock: RunClock = field(default_factory=RunClock)

    def trainer_hooks(self, epochs: int) -> dict[str, Any]:
        """A Trainer's keyword arguments: the clock, and an on_epoch_end that reports each epoch's line as it
        ends, with what is left of the run."""

        def epoch_end(epoch: int, record: dict[str, Any]) -> None:
            left = self.clock.left()
            self.report(epoch_line(record, epochs) + (f"  {left}" if left and epoch < epochs else ""))

        return {"on_epoch_end": epoch_end, "clock": self.clock}
