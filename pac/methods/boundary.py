"""Boundary adapters: cache only the hidden state at layer k, then train LoRA on the top L-k layers.

Beyond the PAC paper. Phase 1 caches a single tap, h_k, so the cache is about (L+1)x smaller than
the parallel adapters' cache of every layer. Phase 2 runs the frozen layers k..L (LoRA injected by
peft into their linear maps) on the cached h_k; backward passes through those layers only, and an
epoch costs the top L-k layers instead of the whole model.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from pac.errors import PacError
from pac.methods.lora import DEFAULT_TARGETS
from pac.models.backbone import Backbone
from pac.models.heads import ClassificationHead

METHOD_TYPE = "BOUNDARY_LORA"


class BoundaryModel(nn.Module):
    """LoRA on backbone layers [k, L) fed by cached h_k, with the model's own final norm and LM head
    (or a classification head on the pooled final-normed state)."""

    def __init__(self, upper: Backbone, task: str, label_names: list[str] | None, pooling: str, r: int = 8):
        super().__init__()
        if not upper.with_head and upper.family.causal:
            raise PacError("the boundary model needs the top stage with the final norm and LM head")
        self.task, self.upper = task, upper
        self.taps = [upper.start]
        config = LoraConfig(
            r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=DEFAULT_TARGETS[upper.family.causal]
        )
        inject_adapter_in_model(config, upper.layers)  # only the lora_A/lora_B weights require grad
        self.head = ClassificationHead(upper.hidden_size, len(label_names), pooling) if task == "classify" else None

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        hidden = self.upper.final_norm(self.upper(batch["taps"][:, 0], mask, taps=()).hidden)
        return self.head(hidden, mask) if self.head is not None else self.upper.logits(hidden)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
