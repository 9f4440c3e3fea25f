"""TaskEdge's model: the base model whole and frozen, with a packed sparse update in its chosen linear maps.

Each chosen `nn.Linear` is wrapped in a `SparseDelta`: the flat indices of its selected entries (a buffer) and
their changes (a packed parameter, or for sparse LoRA the product of two low-rank factors read at those entries
only). The forward adds the changes onto a transient copy of the frozen weight; the backward rebuilds that copy
rather than keeping one per layer, and computes the gradient of the selected entries alone, by gathering the
rows of the output gradient and the columns of the input they pair (T x k products, not the dense out x in
weight gradient). So the trainable state — values, gradients, AdamW's moments — is sized to the selection, and
every other weight stays bit for bit what it was.

On CUDA, an N:M (2:4) update in half precision goes through torch's semi-structured sparse kernels
(`to_sparse_semi_structured`): the frozen product plus the sparse update's product. Elsewhere the same
selection runs densely.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pac.methods.lora.model import DEFAULT_TARGETS
from pac.methods.taskedge.select import importance, select
from pac.methods.transformers_model import TransformersModel

# T x k products of the weight gradient go in chunks of this many elements, so their memory stays bounded.
GATHER_CHUNK = 1 << 22


def _merged(weight: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The weight with `values` added at its flat `index` (a new tensor: the frozen one is never written)."""
    return weight.reshape(-1).index_add(0, index, values.to(weight.dtype)).view_as(weight)


def selected_gradient(grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, in_features: int) -> torch.Tensor:
    """d loss / d W_ij at the flat indices only: sum over tokens of grad_out[:, i] * x[:, j]."""
    g = grad_out.reshape(-1, grad_out.shape[-1]).t()  # [out, T]
    xs = x.reshape(-1, in_features).t()  # [in, T]
    rows, cols = index // in_features, index % in_features
    step = max(1, GATHER_CHUNK // max(1, g.shape[1]))
    parts = [
        (g.index_select(0, rows[i : i + step]) * xs.index_select(0, cols[i : i + step])).sum(1)
        for i in range(0, index.numel(), step)
    ]
    return torch.cat(parts) if parts else grad_out.new_zeros(0)


def _semi_structured(weight: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
    """The update as a 2:4 semi-structured sparse matrix where this device runs them (CUDA, fp16/bf16, shapes in
    the kernels' multiples); None elsewhere."""
    if not (weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16)):
        return None
    rows, cols = weight.shape
    if rows % 64 or cols % 64:
        return None
    from torch.sparse import to_sparse_semi_structured

    dense = torch.zeros(rows * cols, dtype=weight.dtype, device=weight.device)
    dense[index] = values.to(weight.dtype)
    return to_sparse_semi_structured(dense.view(rows, cols))


class _SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, index, values, structured):  # noqa: ANN001, ANN205 (torch's signature)
        ctx.save_for_backward(x, weight, index, values)
        sparse = _semi_structured(weight, index, values) if structured else None
        if sparse is not None:
            return F.linear(x, weight, bias) + F.linear(x, sparse)
        return F.linear(x, _merged(weight, index, values), bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, weight, index, values = ctx.saved_tensors
        grad_x = grad_out @ _merged(weight, index, values) if ctx.needs_input_grad[0] else None
        grad_values = selected_gradient(grad_out, x, index, weight.shape[1]).to(values.dtype)
        return grad_x, None, None, None, grad_values, None


class SparseDelta(nn.Module):
    """A frozen linear map plus a trained change at its selected entries: packed values, or for sparse LoRA
    (`rank` > 0) scale * (B A)_ij read at the selected (i, j) alone."""

    def __init__(self, base: nn.Linear, index: torch.Tensor, rank: int = 0, structured: bool = False):
        super().__init__()
        self.base, self.rank, self.structured = base, rank, structured
        self.register_buffer("index", index.to(torch.int64), persistent=False)
        out_features, in_features = base.weight.shape
        if rank:  # peft's LoRA init: A Kaiming-uniform, B zero, scale alpha / r with alpha = 2r
            self.lora_A = nn.Parameter(torch.empty(rank, in_features))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        else:
            self.values = nn.Parameter(torch.zeros(index.numel()))

    def delta(self) -> torch.Tensor:
        """The change at each selected entry (differentiable)."""
        if not self.rank:
            return self.values
        in_features = self.base.weight.shape[1]
        rows, cols = self.index // in_features, self.index % in_features
        return 2.0 * (self.lora_B.index_select(0, rows) * self.lora_A.t().index_select(0, cols)).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseDeltaLinear.apply(x, self.base.weight, self.base.bias, self.index, self.delta(), self.structured)


def target_linears(network: nn.Module, targets: Iterable[str]) -> dict[str, nn.Linear]:
    """The linear maps whose last name is one of `targets` (q_proj, ...), by qualified name."""
    wanted = set(targets)
    return {
        name: module
        for name, module in network.named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in wanted
    }


@torch.no_grad()
def input_square_sums(
    body: nn.Module, linears: dict[str, nn.Linear], batches: Iterable[dict]
) -> dict[str, torch.Tensor]:
    """Per linear map, the sum over every real (unpadded) token of its squared inputs: O(inputs) memory each."""
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    mask: list[torch.Tensor] = []

    def hook(name: str):  # noqa: ANN202
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].double() * mask[0].unsqueeze(-1)
            sums[name] += x.pow(2).sum((0, 1))

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        for batch in batches:
            mask[:] = [batch["attention_mask"].double()]
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
            scores = {name: importance(m.weight, sums[name]) for name, m in linears.items()}
        elif how == "magnitude":
            scores = {name: m.weight.detach().abs() for name, m in linears.items()}
        else:
            generator = torch.Generator().manual_seed(seed)
            scores = {name: torch.rand(m.weight.shape, generator=generator) for name, m in linears.items()}
        chosen = select(how, scores, self.budget(), self.settings.nm)
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
