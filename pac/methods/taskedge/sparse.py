"""TaskEdge's layer: a frozen linear map plus a trained change at its selected entries (torch alone).

The forward adds the changes onto a transient copy of the frozen weight; the backward rebuilds that copy rather
than keeping one per layer, and computes the gradient of the selected entries alone, by gathering the rows of the
output gradient and the columns of the input they pair (T x k products, not the dense out x in weight gradient).
So the trainable state (values, gradients, AdamW's moments) is sized to the selection, and every other weight
stays bit for bit what it was.

On CUDA, a 2:4 update in half precision goes through torch's semi-structured sparse kernels
(`to_sparse_semi_structured`): the frozen product plus the sparse update's product. Elsewhere the same selection
runs densely.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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
