"""Initialise side blocks from the backbone's own weights, structurally pruned to width d/r.

Ladder Side-Tuning initialises its side network from the pruned backbone and reports that it
matters. For Llama-like layers (docs/architecture.md, "Pruned initialisation"):
- hidden channels: the d/r channels with the largest mean |h| over cached taps, skipping the few
  massive-outlier channels (their values reach ~29,000 and would dominate a small side state);
- attention: every head is kept, each at head_dim/r dimensions {0, r, 2r, ...}: with rotate-half
  RoPE, dimension j pairs with j + head_dim/2, so the kept pairs keep the backbone's frequencies,
  which are exactly the frequencies a head of head_dim/r gets from the side config;
- MLP: the intermediate/r units with the largest |down column| x |up row|;
- Down_i: the selection of those channels (trainable from there).
Pure functions on tensors; `pac.methods.parallel_adapters` wires them to a checkpoint and a cache.
"""

from __future__ import annotations

import torch

from pac.errors import ModelError


def select_channels(mean_abs: torch.Tensor, max_abs: torch.Tensor, width: int, outliers: int = 8) -> torch.Tensor:
    """Indices (sorted) of `width` channels by mean |h|, never one of the `outliers` largest by max |h|."""
    if width + outliers > mean_abs.numel():
        raise ModelError(f"cannot keep {width} of {mean_abs.numel()} channels while skipping {outliers} outliers")
    score = mean_abs.clone()
    score[max_abs.topk(outliers).indices] = -1.0
    return score.topk(width).indices.sort().values


def kept_head_dims(num_heads: int, head_dim: int, side_head_dim: int) -> torch.Tensor:
    """Row indices of q/k/v projections kept for `num_heads` heads: dims {0, s, 2s, ...} of each head."""
    stride = head_dim // side_head_dim
    per_head = torch.arange(0, head_dim, stride)[:side_head_dim]
    return (torch.arange(num_heads)[:, None] * head_dim + per_head[None, :]).flatten()


def select_mlp_units(up: torch.Tensor, down: torch.Tensor, units: int) -> torch.Tensor:
    """Indices (sorted) of the `units` intermediate units with the largest |down col| x |up row|."""
    score = down.norm(dim=0) * up.norm(dim=1)
    return score.topk(units).indices.sort().values


def prune_llama_layer(
    weights: dict[str, torch.Tensor],
    channels: torch.Tensor,
    q_rows: torch.Tensor,
    kv_rows: torch.Tensor,
    units: int,
) -> dict[str, torch.Tensor]:
    """A Llama-style decoder layer's state dict, pruned to the side width. `weights` uses the layer's
    own keys (self_attn.q_proj.weight, ..., input_layernorm.weight)."""
    mlp = select_mlp_units(weights["mlp.up_proj.weight"], weights["mlp.down_proj.weight"], units)
    out = {
        "self_attn.q_proj.weight": weights["self_attn.q_proj.weight"][q_rows][:, channels],
        "self_attn.k_proj.weight": weights["self_attn.k_proj.weight"][kv_rows][:, channels],
        "self_attn.v_proj.weight": weights["self_attn.v_proj.weight"][kv_rows][:, channels],
        "self_attn.o_proj.weight": weights["self_attn.o_proj.weight"][channels][:, q_rows],
        "mlp.gate_proj.weight": weights["mlp.gate_proj.weight"][mlp][:, channels],
        "mlp.up_proj.weight": weights["mlp.up_proj.weight"][mlp][:, channels],
        "mlp.down_proj.weight": weights["mlp.down_proj.weight"][channels][:, mlp],
        "input_layernorm.weight": weights["input_layernorm.weight"][channels],
        "post_attention_layernorm.weight": weights["post_attention_layernorm.weight"][channels],
    }
    for bias in ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"):  # Qwen2
        if bias in weights:
            rows = q_rows if "q_proj" in bias else kv_rows
            out[bias] = weights[bias][rows]
    return out
