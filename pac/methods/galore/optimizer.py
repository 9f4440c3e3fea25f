"""GaLore's optimizer (galore-torch's AdamW: Adam moments kept in a rank-r projection of each weight's gradient,
the projection refreshed by an SVD every `update_proj_gap` steps), for weights of any shape.

galore-torch 1.0 projects 2-D gradients only. A convolution's gradient (out, in, k, k) is projected here as the
matrix (out, in*k*k) and its update reshaped back (the approach of the authors' open PR #65): `MatrixProjector`,
placed in the optimizer's state before its first step so galore-torch uses it instead of its own.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

import torch
from torch import nn

from pac.errors import PacError


def _galore_package() -> None:
    """Make galore-torch's modules importable without its package's __init__, which imports its 8-bit optimizer and
    so bitsandbytes: pac leaves that out (peft would import it in every command: a second and a log line)."""
    if "galore_torch" in sys.modules:
        return
    spec = importlib.util.find_spec("galore_torch")
    if spec is None:
        raise PacError("--method galore needs the galore-torch package: pip install galore-torch")
    sys.modules["galore_torch"] = importlib.util.module_from_spec(spec)  # the package's path, its __init__ not run


_galore_package()
GaLoreAdamW = importlib.import_module("galore_torch.adamw").AdamW
GaLoreProjector = importlib.import_module("galore_torch.galore_projector").GaLoreProjector


class MatrixProjector(GaLoreProjector):
    """GaLore's projector for a gradient of any rank >= 2: projected as (shape[0], the rest), returned reshaped."""

    def project(self, full_rank_grad: torch.Tensor, iter: int) -> torch.Tensor:
        self.shape = full_rank_grad.shape
        return super().project(full_rank_grad.reshape(self.shape[0], -1), iter)

    def project_back(self, low_rank_grad: torch.Tensor) -> torch.Tensor:
        return super().project_back(low_rank_grad).reshape(self.shape)


def projected_weights(model: nn.Module, head: nn.Module | None) -> list[nn.Parameter]:
    """The weights GaLore projects: every trainable matrix or convolution kernel of a Linear or Conv layer but the
    head's (biases, norms and the head keep plain Adam moments)."""
    head_params = set() if head is None else {id(p) for p in head.parameters()}
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)
        and m.weight.requires_grad
        and id(m.weight) not in head_params
        and min(m.weight.shape[0], m.weight[0].numel()) > 1
    ]


def galore_optimizer(
    groups: list[dict[str, Any]], projected: list[nn.Parameter], rank: int, gap: int, scale: float, weight_decay: float
) -> torch.optim.Optimizer:
    """GaLore's AdamW over `groups` (the model's optimizer groups), the `projected` weights moved to a group of their
    own with GaLore's settings."""
    chosen = {id(p) for p in projected}
    plain = [{**g, "params": [p for p in g["params"] if id(p) not in chosen]} for g in groups]
    low_rank = {"params": projected, "rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": "std"}
    optimizer = GaLoreAdamW(
        [g for g in plain if g["params"]] + [{**low_rank, "lr": groups[0]["lr"]}],
        lr=groups[0]["lr"],
        weight_decay=weight_decay,
        no_deprecation_warning=True,
    )
    for p in projected:
        optimizer.state[p]["projector"] = MatrixProjector(rank, update_proj_gap=gap, scale=scale, proj_type="std")
    return optimizer
