"""The zeroth-order model: layers [start, end) of the frozen model with LoRA-FA adapters in their chosen linear maps,
and a forward that runs several perturbed copies of the trained tensors at once.

One device holds every layer (start 0, end L). A forward-only pipeline over the home's devices gives each peer a
contiguous range (pac.runtime.zo_pipeline): the first stage embeds the token ids, the last holds the final norm,
the head and the loss. Every random start is drawn from the run seed and the tensor's name (its layer's number in
the whole model), never from the global generator, so a stage draws exactly the A and head one device draws.

A LoRA-FA layer adds scale * (x A^T) B^T to the frozen map, A (r x in) frozen at its random start, B (out x r)
trained from zero. Given copies of B stacked as (C, out, r), a batch tiled C times runs as C groups, group c
reading copy c: one forward evaluates C perturbations. The classification head reads its own copies the same way.
Nothing here needs autograd: every tensor has requires_grad False, and the steps run under no_grad.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pac.data.tokenize import IGNORE_INDEX
from pac.errors import PacError
from pac.methods.base import MethodModel
from pac.methods.transformers_model import DEFAULT_TARGETS, target_linears
from pac.models.backbone import load_backbone
from pac.models.heads import ClassificationHead, pool

HEAD_WEIGHT, HEAD_BIAS = "head.weight", "head.bias"
Copies = dict[str, torch.Tensor]  # trained tensor's name -> its C copies stacked, (C, *shape)


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from the run seed and names or numbers: the same on every device, independent of the order in
    which anything else draws."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seeded(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*parts))


class LoraFA(nn.Module):
    """A frozen linear map plus scale * (x A^T) B^T; with `copies` set (C, out, r), the input's leading
    dimension holds C groups and group c reads B's copy c."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base, self.scale = base, 2.0  # alpha = 2r, as pac's LoRA
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features), requires_grad=False)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)  # peft's init of A
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank), requires_grad=False)
        self.copies: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = x @ self.lora_A.t()
        if self.copies is None:
            return self.base(x) + self.scale * (low @ self.lora_B.t())
        groups = self.copies.shape[0]
        delta = torch.bmm(low.reshape(groups, -1, low.shape[-1]), self.copies.transpose(1, 2))
        return self.base(x) + self.scale * delta.reshape(*x.shape[:-1], -1)


class ZerothOrderModel(MethodModel):
    """Layers [start, end) of the base model, frozen, with LoRA-FA layers in their target linear maps (named by
    their layer's number in the whole model: "3.self_attn.q_proj"); the last stage adds the head."""

    def __init__(
        self,
        model_dir: Path,
        task: str,
        pooling: str,
        label_names: list[str] | None,
        rank: int,
        seed: int,
        targets: list[str] | None = None,
        start: int = 0,
        end: int | None = None,
    ):
        super().__init__()
        self.model_dir, self.task = model_dir, task
        self.backbone = load_backbone(model_dir, start, end)
        self.causal = self.backbone.family.causal
        if task == "lm" and not self.causal:
            raise PacError(f"{self.backbone.family.name} is an encoder without an LM head: use --task classify")
        self.first, self.last = self.backbone.with_embeddings, self.backbone.with_head
        self.layers: dict[str, LoraFA] = {}
        for name, linear in target_linears(self.backbone.layers, targets or DEFAULT_TARGETS[self.causal]).items():
            offset, _, path = name.partition(".")
            key = f"{start + int(offset)}.{path}"
            self.layers[key] = LoraFA(linear, rank, seeded(seed, "lora_A", key))
            parent, _, attr = name.rpartition(".")
            setattr(self.backbone.layers.get_submodule(parent), attr, self.layers[key])
        self.gathered: dict[str, torch.Tensor] = {}  # the other stages' adapter tensors, on the rank that saves
        # What computes each copy's summed loss when not this model eagerly (pac.methods.zo.engine)
        self.engine: Callable[[dict[str, torch.Tensor], Copies], torch.Tensor] | None = None
        self.head = None
        if task == "classify" and self.last:
            self.head = ClassificationHead(self.backbone.hidden_size, len(label_names), pooling)
            _seeded_linear(self.head.proj, seeded(seed, "head"))
        self.requires_grad_(False)

    def hf_name(self, key: str) -> str:
        """A LoRA-FA layer's module name in the model transformers loads (model.layers.3.self_attn.q_proj)."""
        return f"{self.backbone.family.layers_prefix}{key}"

    def trained(self) -> dict[str, torch.Tensor]:
        """What the steps move, by name, in the fixed order copies and directions follow: B of every LoRA-FA
        layer, then the head's weight and bias (classification, last stage)."""
        tensors = {f"{key}.lora_B": layer.lora_B for key, layer in self.layers.items()}
        if self.head is not None:
            tensors |= {HEAD_WEIGHT: self.head.proj.weight, HEAD_BIAS: self.head.proj.bias}
        return tensors

    def trained_weights(self) -> dict[str, torch.Tensor]:
        return self.trained()

    def adapter(self) -> dict[str, torch.Tensor]:
        """What the saved adapter holds: A and B of every LoRA-FA layer and the head, this stage's and those
        `gathered` from the others."""
        own = {f"{key}.lora_A": layer.lora_A for key, layer in self.layers.items()} | self.trained()
        return {**self.gathered, **own}

    def run(self, inputs: torch.Tensor, attention_mask: torch.Tensor, copies: Copies | None = None) -> torch.Tensor:
        """This stage's layers over `inputs` (token ids on the first stage, else the previous stage's hidden
        states); with `copies`, the inputs hold C groups of the batch and group c reads copy c."""
        for key, layer in self.layers.items():
            layer.copies = None if copies is None else copies[f"{key}.lora_B"]
        try:
            return self.backbone(inputs, attention_mask, taps=()).hidden
        finally:
            for layer in self.layers.values():
                layer.copies = None

    def loss_sums(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor], copies: Copies) -> torch.Tensor:
        """The summed loss of each of C copies (last stage): `hidden` is the output of the last layer over the batch
        tiled C times. Divide by pac.methods.base.loss_count for the means."""
        groups = next(iter(copies.values())).shape[0]
        hidden = self.backbone.final_norm(hidden).reshape(groups, -1, *hidden.shape[1:])  # [C, B, T, d]
        labels, mask = batch["labels"], batch["attention_mask"]
        if self.head is not None:
            pooled = torch.stack([pool(h, mask, self.head.pooling) for h in hidden])
            logits = torch.baddbmm(copies[HEAD_BIAS].unsqueeze(1), pooled, copies[HEAD_WEIGHT].transpose(1, 2))
            return torch.stack([F.cross_entropy(lg, labels, reduction="sum") for lg in logits])
        targets = labels[:, 1:].reshape(-1)
        # One copy's logits at a time: C x B x T x vocabulary floats at once would dwarf the model.
        return torch.stack(
            [
                F.cross_entropy(
                    self.backbone.logits(h[:, :-1]).reshape(targets.numel(), -1),
                    targets,
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                for h in hidden
            ]
        )

    def copy_loss_sums(self, batch: dict[str, torch.Tensor], copies: Copies) -> torch.Tensor:
        """Each copy's summed loss over `batch`, from one forward over the batch tiled C times (one device)."""
        groups = next(iter(copies.values())).shape[0]
        ids, mask = batch["input_ids"].repeat(groups, 1), batch["attention_mask"].repeat(groups, 1)
        return self.loss_sums(self.run(ids, mask, copies), batch, copies)

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of the unperturbed model from the last layer's output (last stage)."""
        normed = self.backbone.final_norm(hidden)
        return self.head(normed, attention_mask) if self.head is not None else self.backbone.logits(normed)

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the unperturbed model (one device: every layer)."""
        return self.logits(self.run(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])


def _seeded_linear(linear: nn.Linear, generator: torch.Generator) -> None:
    """nn.Linear's own initialisation, drawn from `generator`."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(linear.in_features)
        linear.bias.uniform_(-bound, bound, generator=generator)
