"""TaskEdge's model: the base model whole and frozen, its chosen linear maps wrapped in `SparseDelta`s
(pac.methods.taskedge.sparse) once a calibration pass over a few training batches has chosen their entries
(pac.methods.taskedge.select).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pac.methods.taskedge.select import importance, select
from pac.methods.taskedge.sparse import SparseDelta
from pac.methods.transformers_model import DEFAULT_TARGETS, TransformersModel, target_linears


@torch.no_grad()
def input_square_sums(
    body: nn.Module, linears: dict[str, nn.Linear], batches: Iterable[dict]
) -> dict[str, torch.Tensor]:
    """Per linear map, the sum over every real (unpadded) token of its squared inputs: O(inputs) memory each."""
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    mask: list[torch.Tensor] = []

    def hook(name: str):  # noqa: ANN202
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            # Squares summed over a batch's tokens in the activations' precision, batches added up in float64.
            sums[name] += (inputs[0].pow(2) * mask[0].unsqueeze(-1)).sum((0, 1)).double()

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        for batch in batches:
            mask[:] = [batch["attention_mask"].float()]
            body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return sums


@dataclass
class SparseSettings:
    task: str
    budget_fraction: float = 0.001
    selection: str = "taskedge"
    nm: tuple[int, int] | None = None
    targets: list[str] | None = None
    sparse_lora_r: int = 0
    pooling: str = "mean"
    label_names: list[str] | None = None


class TaskEdgeModel(TransformersModel):
    """The base model frozen, its chosen linear maps wrapped in `SparseDelta`s once `install` is given the
    selection; the classification head (if any) trains whole."""

    def __init__(self, model_dir: Path, settings: SparseSettings):
        super().__init__(model_dir, settings.task, settings.pooling, settings.label_names)
        self.settings = settings
        self.network.requires_grad_(False)
        self.backbone_params = sum(p.numel() for p in self.network.parameters())
        self.deltas: dict[str, SparseDelta] = {}
        self.targets()  # names no linear map: refused before any calibration

    def targets(self) -> dict[str, nn.Linear]:
        return target_linears(self.network, self.settings.targets or DEFAULT_TARGETS[self.causal])

    def budget(self) -> int:
        """The number of weights to train: the fraction of every backbone parameter (embeddings included)."""
        return max(1, round(self.settings.budget_fraction * self.backbone_params))

    def choose(self, batches: Iterable[dict], seed: int) -> tuple[dict[str, torch.Tensor], float]:
        """The selection (flat indices per linear map) and the seconds its calibration pass took."""
        linears, started = self.targets(), time.perf_counter()
        how = self.settings.selection
        if how in ("taskedge", "global"):
            sums = input_square_sums(self.body(), linears, batches)

            def scores(name: str) -> torch.Tensor:
                return importance(linears[name].weight, sums[name])
        elif how == "magnitude":

            def scores(name: str) -> torch.Tensor:
                return linears[name].weight.detach().abs()
        else:
            draws = {name: torch.Generator().manual_seed(seed + i) for i, name in enumerate(linears)}

            def scores(name: str) -> torch.Tensor:
                return torch.rand(linears[name].weight.shape, generator=draws[name])

        shapes = {name: tuple(m.weight.shape) for name, m in linears.items()}
        chosen = select(how, scores, shapes, self.budget(), self.settings.nm)
        return chosen, time.perf_counter() - started

    def install(self, chosen: dict[str, torch.Tensor]) -> None:
        """Wrap each chosen linear map with its selection (its values start at zero: the base model's output)."""
        structured = self.settings.nm == (2, 4)
        for name, linear in self.targets().items():
            parent_name, _, attr = name.rpartition(".")
            delta = SparseDelta(linear, chosen[name], self.settings.sparse_lora_r, structured)
            setattr(self.network.get_submodule(parent_name), attr, delta)
            self.deltas[name] = delta

    def merged_deltas(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per wrapped map: (flat indices, the change at each), what the adapter file keeps."""
        with torch.no_grad():
            return {name: (d.index, d.delta().detach()) for name, d in self.deltas.items()}
