"""Backbone families pac supports, and how each lays out its weights.

A family names the transformers classes that make up one layer, the final norm and the rotary
embedding, and the checkpoint key prefixes. The backbone builds only the pieces a process needs
from these classes, and the side network builds its blocks from the same layer class at a
smaller width, so masks, RoPE and KV caches behave as in the backbone.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from pac.errors import ModelError


@dataclass(frozen=True)
class Family:
    name: str
    causal: bool  # decoders: causal masks, an LM head; encoders: bidirectional masks, no LM head
    module: str  # transformers module holding the classes
    layer_class: str
    norm_class: str  # the family's normalisation (name in `module`, or a dotted path), reused by the side net
    norm_eps_attr: str
    rotary_class: str | None
    # Checkpoint key layout: "{layers_prefix}{i}." starts layer i's tensors.
    layers_prefix: str
    embed_prefix: str
    final_norm_prefix: str | None

    def classes(self) -> dict[str, Any]:
        names = {"layer": self.layer_class, "norm": self.norm_class, "rotary": self.rotary_class}
        return {k: _import(self.module, v) for k, v in names.items() if v is not None}


def _import(module: str, name: str) -> Any:
    """A class by name from the family's module, or by a dotted path of its own."""
    if "." in name:
        module, name = name.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _decoder(prefix: str, module: str) -> Family:
    return Family(
        name=prefix.lower(),
        causal=True,
        module=f"transformers.models.{module}.modeling_{module}",
        layer_class=f"{prefix}DecoderLayer",
        norm_class=f"{prefix}RMSNorm",
        norm_eps_attr="rms_norm_eps",
        rotary_class=f"{prefix}RotaryEmbedding",
        layers_prefix="model.layers.",
        embed_prefix="model.embed_tokens.",
        final_norm_prefix="model.norm.",
    )


BERT = Family(
    name="bert",
    causal=False,
    module="transformers.models.bert.modeling_bert",
    layer_class="BertLayer",
    norm_class="torch.nn.LayerNorm",
    norm_eps_attr="layer_norm_eps",
    rotary_class=None,
    layers_prefix="encoder.layer.",
    embed_prefix="embeddings.",
    final_norm_prefix=None,  # every BERT layer ends in its own LayerNorm
)

# model_type (config.json) -> family. Llama-like decoders share one layout.
FAMILIES: dict[str, Family] = {
    "llama": _decoder("Llama", "llama"),
    "qwen2": _decoder("Qwen2", "qwen2"),
    "mistral": _decoder("Mistral", "mistral"),
    "bert": BERT,
}


def family_for(config: Any) -> Family:
    """The family of a transformers config; a clear error for architectures pac does not run."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise ModelError(
            f"model type {model_type!r} is not supported by pac. Supported model types: {supported} "
            "(Llama-like decoders such as SmolLM2, Qwen2 and Mistral; BERT-family encoders such as MiniLM). "
            "Pick a checkpoint of one of these families."
        )
    return FAMILIES[model_type]
