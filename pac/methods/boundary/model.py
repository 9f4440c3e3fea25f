"""Boundary adapters: cache only the hidden state at layer k, then train LoRA on the top L-k layers.

Beyond the PAC paper. Phase 1 caches a single tap, h_k, so the cache is about (L+1)x smaller than
the parallel adapters' cache of every layer. Phase 2 runs the frozen layers k..L (LoRA injected by
peft into their linear maps) on the cached h_k; backward passes through those layers only, and an
epoch costs the top L-k layers instead of the whole model.

With `side_reduction` a parallel-adapter side network (pac.models.side) also runs beside the top
layers, fed by their live outputs h_k..h_L, and its Up(s) is added to the final-normed h_L as in
pac.methods.parallel_adapters: the boundary variant "with the side network".

With `below_reduction` a side network instead reads the cached h_0..h_k and its Up(s) is added to h_k
itself, so the frozen top layers (with or without LoRA, r = 0) carry its correction to the output. Why:
a side network whose correction goes straight to the LM head overfits 400 articles long before it
matches LoRA (benchmarks/results/quality_lm.md); here the pretrained top layers interpret the
correction, as they interpret a LoRA update of a lower layer. The cache then holds h_0..h_k.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model

from pac.errors import PacError
from pac.methods.base import MethodModel
from pac.methods.transformers_model import DEFAULT_TARGETS
from pac.models.backbone import Backbone
from pac.models.heads import ClassificationHead
from pac.models.side import SideNetwork

METHOD_TYPE = "BOUNDARY_LORA"
# The side network trains at the parallel adapters' learning rate (3e-3), LoRA at LoRA's (5e-4):
# one shared rate would leave one of them badly tuned.
SIDE_LR_RATIO = 6.0


def _side_network(config: Any, num_layers: int, reduction: int) -> SideNetwork:
    """A side network over a stack of `num_layers` layers shaped like `config`'s, tapping all its h_0..h_n."""
    stack = copy.deepcopy(config)
    stack.num_hidden_layers = num_layers
    return SideNetwork(stack, list(range(num_layers + 1)), reduction)


class BoundaryModel(MethodModel):
    """LoRA on backbone layers [k, L) fed by cached h_k, with the model's own final norm and LM head
    (or a classification head on the pooled final-normed state), and optionally a side network."""

    def __init__(
        self,
        upper: Backbone,
        task: str,
        label_names: list[str] | None,
        pooling: str,
        r: int = 8,
        side_reduction: int | None = None,
        below_reduction: int | None = None,
    ):
        super().__init__()
        if not upper.with_head and upper.family.causal:
            raise PacError("the boundary model needs the top stage with the final norm and LM head")
        if side_reduction and below_reduction:
            raise PacError("a boundary side network goes beside the top layers or below them, not both")
        if r < 0 or (r == 0 and not below_reduction):
            raise PacError(f"--lora-r must be positive (0 only with a side network below the boundary), not {r}")
        self.task, self.upper = task, upper
        self.taps = list(range(upper.start + 1)) if below_reduction else [upper.start]
        if r:
            config = LoraConfig(
                r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=DEFAULT_TARGETS[upper.family.causal]
            )
            inject_adapter_in_model(config, upper.layers)  # only the lora_A/lora_B weights require grad
        self.head = ClassificationHead(upper.hidden_size, len(label_names), pooling) if task == "classify" else None
        # Beside: the top layers seen as a model of their own (its taps 0..L-k are h_k..h_L).
        # Below: the cached layers 0..k, as parallel adapters run it over the whole model.
        self.side = _side_network(upper.config, upper.end - upper.start, side_reduction) if side_reduction else None
        self.below = _side_network(upper.config, upper.start, below_reduction) if below_reduction else None

    def _boundary_state(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """h_k as the top layers read it: the cached state, plus the side network below it if there is one."""
        h_k = batch["taps"][:, -1]
        return h_k if self.below is None else h_k + self.below(batch["taps"], batch["attention_mask"])

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask, h_k = batch["attention_mask"], self._boundary_state(batch)
        out = self.upper(h_k, mask, taps=None if self.side is not None else ())
        hidden = self.upper.final_norm(out.hidden)
        if self.side is not None:
            taps = torch.stack([h_k, *(out.taps[i] for i in range(self.upper.start + 1, self.upper.end + 1))], 1)
            hidden = hidden + self.side(taps, mask)
        return self.head(hidden, mask) if self.head is not None else self.upper.logits(hidden)

    def lm_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own next-token logits with this adapter: a language-model adapter's output; for a
        classifier, the LM head over the adapted top layers (LoRA and a side network below the boundary change
        them; a side network beside them feeds only the classification head)."""
        if self.head is None:
            return self.forward_batch(batch)
        out = self.upper(self._boundary_state(batch), batch["attention_mask"], taps=())
        return self.upper.logits(self.upper.final_norm(out.hidden))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups: LoRA and the head at `lr`, the side networks at SIDE_LR_RATIO x `lr`."""
        side = {id(p) for net in (self.side, self.below) if net is not None for p in net.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in side], "lr": lr}]
        if side:
            groups.append({"params": [p for p in trainable if id(p) in side], "lr": lr * SIDE_LR_RATIO})
        return groups

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
