"""The zeroth-order model: the base model frozen, LoRA-FA adapters in its chosen linear maps, and a forward that
runs several perturbed copies of the trained tensors at once.

A LoRA-FA layer adds scale * (x A^T) B^T to the frozen map, A (r x in) frozen at its random start, B (out x r)
trained from zero. Given copies of B stacked as (C, out, r), a batch tiled C times runs as C groups, group c
reading copy c: one forward evaluates C perturbations. The classification head reads its own copies the same way.
Nothing here needs autograd: every tensor has requires_grad False, and the step (pac.methods.zo.step) runs under
no_grad.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pac.data.tokenize import IGNORE_INDEX
from pac.methods.lora.model import DEFAULT_TARGETS
from pac.methods.transformers_model import TransformersModel, target_linears
from pac.models.heads import pool


class LoraFA(nn.Module):
    """A frozen linear map plus scale * (x A^T) B^T; with `copies` set (C, out, r), the input's leading
    dimension holds C groups and group c reads B's copy c."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base, self.scale = base, 2.0  # alpha = 2r, as pac's LoRA
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features), requires_grad=False)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's init of A
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank), requires_grad=False)
        self.copies: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = x @ self.lora_A.t()
        if self.copies is None:
            return self.base(x) + self.scale * (low @ self.lora_B.t())
        groups = self.copies.shape[0]
        delta = torch.bmm(low.reshape(groups, -1, low.shape[-1]), self.copies.transpose(1, 2))
        return self.base(x) + self.scale * delta.reshape(*x.shape[:-1], -1)


class ZerothOrderModel(TransformersModel):
    """The base model frozen, LoRA-FA layers in its target linear maps; `trained()` lists what the step moves,
    in the fixed order the perturbations are drawn in."""

    def __init__(
        self,
        model_dir: Path,
        task: str,
        pooling: str,
        label_names: list[str] | None,
        rank: int,
        targets: list[str] | None = None,
    ):
        super().__init__(model_dir, task, pooling, label_names)
        self.model_dir = model_dir
        self.requires_grad_(False)
        self.layers: dict[str, LoraFA] = {}
        for name, linear in target_linears(self.network, targets or DEFAULT_TARGETS[self.causal]).items():
            parent, _, attr = name.rpartition(".")
            self.layers[name] = LoraFA(linear, rank)
            setattr(self.network.get_submodule(parent), attr, self.layers[name])

    def trained(self) -> list[torch.Tensor]:
        """B of every LoRA-FA layer, then the head's weight and bias (classification)."""
        tensors = [layer.lora_B for layer in self.layers.values()]
        if self.head is not None:
            tensors += [self.head.proj.weight, self.head.proj.bias]
        return tensors

    def copy_losses(self, batch: dict[str, torch.Tensor], copies: list[torch.Tensor]) -> torch.Tensor:
        """The mean loss of `batch` under each of C copies of the trained tensors (each (C, *shape), in
        `trained()` order), from one forward over the batch tiled C times: a tensor of C losses."""
        groups = copies[0].shape[0]
        for layer, stacked in zip(self.layers.values(), copies, strict=False):
            layer.copies = stacked
        try:
            ids, mask = batch["input_ids"].repeat(groups, 1), batch["attention_mask"].repeat(groups, 1)
            hidden = self.body()(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            for layer in self.layers.values():
                layer.copies = None
        hidden = hidden.reshape(groups, -1, *hidden.shape[1:])  # [C, B, T, d]
        labels = batch["labels"]
        if self.head is not None:
            weight, bias = copies[len(self.layers)], copies[len(self.layers) + 1]
            pooled = torch.stack([pool(h, batch["attention_mask"], self.head.pooling) for h in hidden])
            logits = torch.baddbmm(bias.unsqueeze(1), pooled, weight.transpose(1, 2))  # [C, B, classes]
            return torch.stack([F.cross_entropy(lg, labels) for lg in logits])
        head = self.network.get_output_embeddings()
        targets = labels[:, 1:].reshape(-1)
        # One copy's logits at a time: C x B x T x vocabulary floats at once would dwarf the model.
        return torch.stack(
            [
                F.cross_entropy(head(h[:, :-1]).reshape(targets.numel(), -1), targets, ignore_index=IGNORE_INDEX)
                for h in hidden
            ]
        )
