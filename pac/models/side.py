"""The Parallel Adapter side network (docs/architecture.md, "The side network").

    s_0 = Down_0(h_0)
    for each tapped layer i:  g_i = sigmoid(alpha_i / T)
                              u_i = g_i * s_prev + (1 - g_i) * Down_i(h_i)
                              s_i = SideBlock_i(u_i)
    y = Up(Norm(s_last))                      (Up zero-initialised: step 0 answers like the backbone)

Side blocks are the backbone's own layer class built from a config scaled down by the reduction
factor r (hidden d/r, intermediate/r, same head count, head_dim/r), so masks, RoPE and KV caches work
as in the backbone. Untapped layers have no block: the side state passes through unchanged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pac.errors import ModelError
from pac.models.backbone import layer_kwargs
from pac.models.families import family_for


def side_config(config: Any, reduction: int, num_blocks: int, heads: int | None = None) -> Any:
    """The backbone config scaled to width d/r with `num_blocks` layers, and the backbone's head count
    or `heads` attention heads (fewer, wider heads: at r = 8 SmolLM2's 9 heads are 8 dimensions each)."""
    d = config.hidden_size
    heads = heads or config.num_attention_heads
    width = d // reduction
    if d % reduction or width % heads:
        options = [r for r in range(2, 65) if d % r == 0 and (d // r) % heads == 0]
        raise ModelError(
            f"reduction {reduction} does not fit hidden size {d} with {heads} heads "
            f"(d/r must be a whole multiple of the head count); try one of {options[:8]}"
        )
    sc = copy.deepcopy(config)
    sc.hidden_size = width
    sc.intermediate_size = max(1, config.intermediate_size // reduction)
    sc.num_attention_heads = heads
    sc.head_dim = width // heads
    kv_heads = getattr(config, "num_key_value_heads", None)
    if kv_heads is not None:
        # Grouped-query attention needs the query heads to be a multiple of the key/value heads.
        sc.num_key_value_heads = math.gcd(kv_heads, heads)
    sc.num_hidden_layers = num_blocks
    if getattr(sc, "layer_types", None) is not None:
        sc.layer_types = list(sc.layer_types[:1]) * num_blocks if sc.layer_types else None
    return sc


class TapDown(torch.autograd.Function):
    """Down_i(h_i) for every tap at once: taps [B, n, T, d], weight [n, k, d], bias [n, k] -> [B, n, T, k].

    A single einsum would first copy the taps into [n, B*T, d] order and keep that copy for backward
    (73 MB for SmolLM2's 31 taps of 8 x 128 tokens, the largest tensor of a language-model step); tap by
    tap, the products read the batch where it lies and backward reuses it. Same values, and on CPU a
    little faster than the einsum (40-48 ms against 54 ms for that batch, forward and backward)."""

    @staticmethod
    def forward(ctx, taps, weight, bias):  # noqa: D102 (autograd API)
        ctx.save_for_backward(taps, weight)
        return torch.stack([taps[:, i] @ weight[i].T for i in range(taps.shape[1])], 1) + bias[:, None, :]

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 (autograd API)
        taps, weight = ctx.saved_tensors
        taps_range = range(taps.shape[1])
        grad_taps = torch.stack([grad[:, i] @ weight[i] for i in taps_range], 1) if ctx.needs_input_grad[0] else None
        grad_weight = torch.stack([grad[:, i].flatten(0, 1).T @ taps[:, i].flatten(0, 1) for i in taps_range])
        return grad_taps, grad_weight, grad.sum((0, 2))


class SideNetwork(nn.Module):
    def __init__(
        self,
        config: Any,
        taps: list[int],
        reduction: int = 8,
        gate_temperature: float = 0.1,
        tap_norm: bool = False,
        dropout: float = 0.0,
        heads: int | None = None,
    ):
        super().__init__()
        self.family = family_for(config)
        taps = sorted(set(taps))
        num_layers = config.num_hidden_layers
        if taps[0] != 0 or taps[-1] != num_layers or not all(0 <= t <= num_layers for t in taps):
            raise ModelError(
                f"tapped layers {taps} must include 0 (the embeddings) and {num_layers} (the last layer), "
                f"within 0..{num_layers}"
            )
        self.taps = taps
        self.gate_temperature = gate_temperature
        # Raw taps carry massive outliers (|h| ~ 29,000 on a few channels of the first token in
        # SmolLM2); scaling each tap to unit RMS per token keeps them from swamping the side state.
        self.tap_norm = tap_norm
        self.dropout = nn.Dropout(dropout)
        self.config = side_config(config, reduction, num_blocks=len(taps) - 1, heads=heads)
        d, width = config.hidden_size, self.config.hidden_size
        classes = self.family.classes()

        # All Down_i as one batched weight, applied by TapDown and initialised like nn.Linear.
        self.down_weight = nn.Parameter(torch.empty(len(taps), width, d))
        self.down_bias = nn.Parameter(torch.empty(len(taps), width))
        bound = 1 / math.sqrt(d)
        nn.init.uniform_(self.down_weight, -bound, bound)
        nn.init.uniform_(self.down_bias, -bound, bound)
        self.gate_logits = nn.Parameter(torch.zeros(len(taps) - 1))  # g = 0.5 at start
        self.blocks = nn.ModuleList([classes["layer"](self.config, j) for j in range(len(taps) - 1)])
        self.norm = classes["norm"](width, eps=getattr(config, self.family.norm_eps_attr))
        self.up = nn.Linear(width, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.rotary = classes["rotary"](self.config) if self.family.causal else None

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logits / self.gate_temperature)

    def state(
        self, taps: torch.Tensor, attention_mask: torch.Tensor | None = None, past_key_values: Any = None
    ) -> torch.Tensor:
        """Norm(s_last) [B, T, d/r]: the side network's output before Up."""
        downs = self.downs(taps)
        state = self.run_blocks(downs[:, 0], downs[:, 1:], range(len(self.blocks)), attention_mask, past_key_values)
        return self.norm(state)

    def downs(self, taps: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """Down_i(h_i) for the stacked taps [B, n, T, d]: all of them, or those of `rows` of self.taps."""
        if self.tap_norm:
            taps = taps * torch.rsqrt(taps.pow(2).mean(-1, keepdim=True) + 1e-6)
        weight, bias = self.down_weight, self.down_bias
        if rows is not None:
            weight, bias = weight[rows], bias[rows]
        return self.dropout(TapDown.apply(taps, weight, bias))

    def run_blocks(
        self,
        state: torch.Tensor,
        downs: torch.Tensor,
        blocks: range,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
    ) -> torch.Tensor:
        """Side blocks `blocks` in order; downs[:, i] is Down of the tap that block blocks[i] reads.
        A pipeline stage runs the blocks of its own layers (pac.runtime.side_pipeline)."""
        kwargs = layer_kwargs(self.family, self.config, state, attention_mask, self.rotary, past_key_values)
        gates = self.gates()
        for i, j in enumerate(blocks):
            state = self.blocks[j](gates[j] * state + (1 - gates[j]) * downs[:, i], **kwargs)
        return state

    def stage_parameters(self, rows: slice, blocks: range) -> list[tuple[nn.Parameter, torch.Tensor | None]]:
        """What a pipeline stage holding taps `rows` of self.taps and side blocks `blocks` computes: its rows of
        the Down weights, its blocks' gates and every weight of its blocks. Each parameter comes with a boolean
        mask over its first dimension, or None when the stage computes all of it."""
        tap_rows = torch.zeros(len(self.taps), dtype=torch.bool)
        tap_rows[rows] = True
        block_rows = torch.zeros(len(self.blocks), dtype=torch.bool)
        block_rows[list(blocks)] = True
        owned: list[tuple[nn.Parameter, torch.Tensor | None]] = [
            (self.down_weight, tap_rows),
            (self.down_bias, tap_rows),
            (self.gate_logits, block_rows),
        ]
        return owned + [(p, None) for j in blocks for p in self.blocks[j].parameters()]

    def forward(
        self, taps: torch.Tensor, attention_mask: torch.Tensor | None = None, past_key_values: Any = None
    ) -> torch.Tensor:
        """taps: [B, len(self.taps), T, d] in self.taps order. Returns y = Up(Norm(s)) [B, T, d]."""
        return self.up(self.state(taps, attention_mask, past_key_values))

    @torch.no_grad()
    def init_pruned(
        self,
        layer_weights: Callable[[int], dict[str, torch.Tensor]],
        final_norm_weight: torch.Tensor,
        mean_abs: torch.Tensor,
        max_abs: torch.Tensor,
        outliers: int = 8,
    ) -> torch.Tensor:
        """Initialise from the backbone pruned to width d/r (see pac.models.prune).

        `layer_weights(i)` is the state dict of the backbone layer that produces tap i (read one layer
        at a time); channel statistics come from cached taps. Returns the kept channel indices. Up
        stays zero, so step 0 still equals the backbone."""
        if not self.family.causal:
            raise ModelError("pruned initialisation is implemented for Llama-like decoders; use side_init=random")
        from pac.models.prune import kept_head_dims, prune_llama_layer, select_channels

        sc = self.config
        channels = select_channels(mean_abs, max_abs, sc.hidden_size, outliers)
        backbone_head_dim = sc.head_dim * (mean_abs.numel() // sc.hidden_size)
        q_rows = kept_head_dims(sc.num_attention_heads, backbone_head_dim, sc.head_dim)
        kv_rows = kept_head_dims(sc.num_key_value_heads, backbone_head_dim, sc.head_dim)
        for block, tap in zip(self.blocks, self.taps[1:], strict=True):
            block.load_state_dict(
                prune_llama_layer(layer_weights(tap), channels, q_rows, kv_rows, sc.intermediate_size)
            )
        self.down_weight.zero_()
        self.down_weight[:, torch.arange(sc.hidden_size), channels] = 1.0
        self.down_bias.zero_()
        self.norm.weight.copy_(final_norm_weight[channels])
        return channels
