"""What every fine-tuning method shares: its model's contract, task losses and metrics, and the adapter files.

A method's model (`MethodModel`) maps a batch (a dict of tensors) to logits with `forward_batch`; the
training step asks it for `loss_batch` and `param_groups`, evaluation for `metrics_batch`. Each has a
default built on `forward_batch`, which a method overrides where it knows better (a memory-lean LM loss, a
learning rate per part), so the trainer, evaluation and benchmarks treat parallel adapters, LoRA and the
others alike.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pac.data.tokenize import IGNORE_INDEX
from pac.errors import PacError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# pac's own methods keep their config under a name of pac's own: peft's loaders read adapter_config.json and
# fail with a KeyError on a peft_type they do not know, where without the file they say plainly it is missing.
ADAPTER_CONFIG = "pac_adapter_config.json"
# Where pac wrote those configs before (with these peft_types); such adapters still load.
LEGACY_ADAPTER_CONFIG = "adapter_config.json"
LEGACY_PEFT_TYPES = ("PARALLEL_ADAPTERS", "BOUNDARY_LORA")


def predicts_class(task: str) -> bool:
    """Whether a task's logits are one row of classes per sample (classify, image-classify), not next tokens."""
    return task != "lm"


def task_loss(task: str, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy: over classes, or over next tokens (labels -100 carry no loss)."""
    if predicts_class(task):
        return F.cross_entropy(logits.float(), labels, reduction=reduction)
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction)


def loss_count(task: str, labels: torch.Tensor) -> int:
    """What a batch's mean loss averages over: samples (classify) or next-token targets (lm)."""
    return labels.shape[0] if predicts_class(task) else int((labels[:, 1:] != IGNORE_INDEX).sum())


def batch_metrics(task: str, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Sums, so batches of any size add up exactly: loss_sum / count is the mean."""
    metrics = {"loss_sum": task_loss(task, logits, labels, reduction="sum").item(), "count": loss_count(task, labels)}
    if predicts_class(task):
        metrics["correct"] = (logits.argmax(-1) == labels).sum().item()
    return metrics


def summarize(task: str, totals: dict[str, float]) -> dict[str, float]:
    """Accuracy for classification; mean token loss and perplexity for language modelling."""
    loss = totals["loss_sum"] / max(totals["count"], 1)
    if predicts_class(task):
        return {"loss": loss, "accuracy": totals["correct"] / max(totals["count"], 1)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


class MethodModel(nn.Module, ABC):
    """The model of a fine-tuning method, as the training step and evaluation see it."""

    task: str  # "classify", "lm" or "image-classify"

    @abstractmethod
    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of a batch: [B, classes] (classify) or [B, T, vocab] (lm)."""

    def loss_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training loss: the mean over samples (classify) or next-token targets (lm)."""
        return task_loss(self.task, self.forward_batch(batch), batch["labels"])

    def metrics_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Evaluation sums of a batch (see `batch_metrics`)."""
        return batch_metrics(self.task, self.forward_batch(batch), batch["labels"])

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups: every trainable parameter at `lr`, unless a method's parts want other rates."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """What training changes, by name: what a checkpoint holds. Every parameter that requires a gradient,
        unless a method trains without gradients (zeroth-order) and says what it moves."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


def save_adapter(out_dir: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, out_dir / ADAPTER_WEIGHTS)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    legacy = out_dir / LEGACY_ADAPTER_CONFIG
    if _legacy_config(out_dir) is not None:  # an older pac run's config there would still trip peft up
        legacy.unlink()


def read_adapter_config(adapter_dir: Path) -> dict[str, Any] | None:
    """The pac config of a parallel-adapter or boundary directory (under its current or its old name), if any."""
    config_file = Path(adapter_dir) / ADAPTER_CONFIG
    return json.loads(config_file.read_text()) if config_file.exists() else _legacy_config(Path(adapter_dir))


def load_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    adapter_dir = Path(adapter_dir)
    config, weights = read_adapter_config(adapter_dir), adapter_dir / ADAPTER_WEIGHTS
    if config is None or not weights.exists():
        raise PacError(
            f"{adapter_dir} is not a pac adapter: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
            "(the --out directory of `pac train`)"
        )
    return config, load_file(weights)


def _legacy_config(adapter_dir: Path) -> dict[str, Any] | None:
    """The config an older pac saved as adapter_config.json, or None (no such file, or peft's own)."""
    file = Path(adapter_dir) / LEGACY_ADAPTER_CONFIG
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    return config if config.get("peft_type") in LEGACY_PEFT_TYPES else None
