"""Text generation with a parallel adapter, keeping KV caches for the backbone and the side blocks.

Each new token runs one position through the backbone (its DynamicCache holds the prefix) and
one position through the side network (a DynamicCache of its own, built from the side config,
since side blocks are the backbone's layer class at width d/r). Nothing is recomputed per token.
Without an adapter the backbone alone answers (`pac generate --base`), with the same decoding.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from pac.data.tokenize import render_prompt
from pac.methods.parallel_adapters import ParallelAdapterModel
from pac.models.backbone import Backbone


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """Token ids of the prompt exactly as training wrote a prompt/completion row's prompt
    (pac.data.tokenize.render_prompt): a chat template's user turn, or the plain text."""
    if chat:  # the template writes its own special tokens
        return tokenizer(render_prompt(tokenizer, prompt, chat=True), add_special_tokens=False, return_tensors="pt")[
            "input_ids"
        ]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Greedy at temperature 0, otherwise nucleus sampling. logits: [B, V] -> [B, 1]."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the most likely token
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, choice)


@torch.inference_mode()
def generate_ids(
    backbone: Backbone,
    adapter: ParallelAdapterModel | None,
    input_ids: torch.Tensor,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 0.9,
    seed: int = 0,
    eos_token_id: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Continue `input_ids` [1, T]; returns only the new token ids [1, N].

    adapter=None: the base model's own answer. use_cache=False recomputes the whole sequence per token
    (for tests: both must agree)."""
    generator = torch.Generator().manual_seed(seed)
    backbone_cache = DynamicCache(config=backbone.config) if use_cache else None
    side = adapter.side if adapter is not None else None
    taps = adapter.taps if adapter is not None else ()
    side_cache = DynamicCache(config=side.config) if use_cache and side is not None else None
    sequence, step_input, new = input_ids, input_ids, []
    for _ in range(max_new_tokens):
        mask = torch.ones_like(sequence)
        out = backbone(step_input, mask, taps=taps, past_key_values=backbone_cache)
        if adapter is None:
            logits = backbone.logits(backbone.final_norm(out.hidden[:, -1]))
        else:
            stacked = torch.stack([out.taps[t] for t in taps], 1)
            logits = adapter(stacked, mask, past_key_values=side_cache, last_only=True)[:, -1]
        token = next_token(logits, temperature, top_p, generator)
        new.append(token)
        sequence = torch.cat([sequence, token], 1)
        step_input = token if use_cache else sequence
        if eos_token_id is not None and int(token) == eos_token_id:
            break
    return torch.cat(new, 1) if new else input_ids[:, :0]
