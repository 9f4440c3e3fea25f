"""A frozen backbone, or a contiguous slice of one (a pipeline stage), that returns per-layer taps.

Tap numbering follows the design: tap 0 is the embedding output h_0, tap i (1..L) is the output of
layer i. A slice holding layers [start, end) consumes h_start and produces taps start+1..end. Only
the tensors of the held layers (plus embeddings and the final norm / LM head where the slice needs
them) are read from disk, so a stage with a third of the layers holds about a third of the weights.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from pac.errors import ModelError
from pac.models.families import Family, family_for
from pac.models.loading import Checkpoint

# transformers 5.2x renamed the KV-cache argument of its models, layers and masks from past_key_values to cache
# (the old name warns): pass whichever this version takes.
CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def layer_kwargs(
    family: Family,
    config: Any,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rotary: nn.Module | None,
    past_key_values: Any = None,
) -> dict[str, Any]:
    """Keyword arguments every layer of a stack takes: the attention mask in the form the
    attention implementation wants, and positions/RoPE for decoders. Shared by the backbone
    and the side network, which builds its blocks from the same layer class."""
    if not family.causal:
        mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
        return {"attention_mask": mask}
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    position_ids = torch.arange(past, past + hidden.shape[1], device=hidden.device).unsqueeze(0)
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    make_mask = create_sliding_window_causal_mask if sliding else create_causal_mask
    mask = make_mask(
        config=config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{CACHE_ARG: past_key_values},
    )
    return {
        "attention_mask": mask,
        "position_ids": position_ids,
        "position_embeddings": rotary(hidden, position_ids),
        CACHE_ARG: past_key_values,
        "use_cache": past_key_values is not None,
    }


@dataclass
class StageOutput:
    hidden: torch.Tensor  # output of the last held layer (input of the next stage)
    taps: dict[int, torch.Tensor]  # tap index -> hidden state [B, T, d]


class Backbone(nn.Module):
    """Frozen layers [start, end) of a supported model, optionally with embeddings and the LM head."""

    def __init__(
        self,
        config: Any,
        start: int = 0,
        end: int | None = None,
        with_embeddings: bool | None = None,
        with_head: bool | None = None,
    ):
        super().__init__()
        self.config = config
        self.family = family_for(config)
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        end = self.num_layers if end is None else end
        if not 0 <= start <= end <= self.num_layers:
            raise ModelError(f"layer range [{start}, {end}) is outside the model's 0..{self.num_layers} layers")
        self.start, self.end = start, end
        self.with_embeddings = start == 0 if with_embeddings is None else with_embeddings
        self.with_head = end == self.num_layers if with_head is None else with_head
        classes = self.family.classes()

        # Parameters are created on the meta device (no memory) and replaced by the loaded tensors;
        # modules holding computed buffers (rotary frequencies, BERT position ids) are built for real.
        with torch.device("meta"):
            self.layers = nn.ModuleList([classes["layer"](config, i) for i in range(start, end)])
            if self.family.causal:
                if self.with_embeddings:
                    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
                if self.with_head:
                    eps = getattr(config, self.family.norm_eps_attr)
                    self.norm = classes["norm"](config.hidden_size, eps=eps)
                    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.family.causal:
            self.rotary = classes["rotary"](config)
        elif self.with_embeddings:
            from transformers.models.bert.modeling_bert import BertEmbeddings

            self.embeddings = BertEmbeddings(config)
        self.requires_grad_(False)
        self.eval()  # dropout off: the cache must hold deterministic outputs

    # ----------------------------------------------------------------- loading
    def load_weights(self, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> None:
        """Read exactly the tensors this slice needs and assign them in place of the meta tensors."""
        fam = self.family
        root = checkpoint.prefix_of(f"{fam.layers_prefix}0.")
        mapping: dict[str, str] = {}  # our key -> checkpoint key
        for key in self.state_dict():
            if key.startswith("layers."):
                _, k, rest = key.split(".", 2)
                mapping[key] = f"{root}{fam.layers_prefix}{self.start + int(k)}.{rest}"
            elif key.startswith("embed_tokens.") or key.startswith("embeddings."):
                mapping[key] = f"{root}{fam.embed_prefix}{key.split('.', 1)[1]}"
            elif key.startswith("norm."):
                mapping[key] = f"{root}{fam.final_norm_prefix}{key.split('.', 1)[1]}"
            elif key == "lm_head.weight":
                tied = getattr(self.config, "tie_word_embeddings", False) or "lm_head.weight" not in checkpoint.files
                mapping[key] = f"{root}{fam.embed_prefix}weight" if tied else "lm_head.weight"
        if not fam.causal and self.with_embeddings:
            # BERT embeddings hold non-persistent buffers; only their parameters come from disk.
            mapping = {k: v for k, v in mapping.items() if not k.endswith(("position_ids", "token_type_ids"))}
        tensors = checkpoint.load(set(mapping.values()), dtype)
        state = {ours: tensors[theirs] for ours, theirs in mapping.items()}
        missing, unexpected = self.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not m.startswith(("rotary.", "embeddings.position_ids"))]
        missing = [m for m in missing if m != "embeddings.token_type_ids"]
        if missing or unexpected:
            raise ModelError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
        self.to(dtype)
        self.requires_grad_(False)

    # ----------------------------------------------------------------- compute
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.with_embeddings:
            raise ModelError(f"this stage holds layers [{self.start}, {self.end}) without the embeddings")
        if self.family.causal:
            return self.embed_tokens(input_ids)
        return self.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))

    def forward(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        taps: Collection[int] | None = None,
        past_key_values: Any = None,
    ) -> StageOutput:
        """Run the held layers. `inputs` are token ids when the stage starts at 0 (holding the
        embeddings) or h_start otherwise. `taps`: which tap indices to return (None: all held)."""
        hidden = self.embed(inputs) if inputs.dtype in (torch.long, torch.int) else inputs
        wanted = set(range(self.start, self.end + 1)) if taps is None else set(taps)
        out: dict[int, torch.Tensor] = {}
        if self.start in wanted and self.start == 0:
            out[0] = hidden
        kwargs = layer_kwargs(
            self.family, self.config, hidden, attention_mask, getattr(self, "rotary", None), past_key_values
        )
        for offset, layer in enumerate(self.layers):
            hidden = layer(hidden, **kwargs)
            tap = self.start + offset + 1
            if tap in wanted:
                out[tap] = hidden
        return StageOutput(hidden=hidden, taps=out)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The backbone's last normalisation (decoders); BERT layers end in their own LayerNorm."""
        return self.norm(hidden) if self.family.causal else hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM logits from final-normed hidden states (decoders with the head loaded)."""
        if not (self.family.causal and self.with_head):
            raise ModelError("this model or stage has no LM head")
        return self.lm_head(hidden)


def load_config(model_dir: Path) -> Any:
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the model config in {model_dir}: {exc}") from exc
    family_for(config)  # fail early and clearly on unsupported architectures
    config._attn_implementation = "sdpa"
    return config


def load_backbone(
    model_dir: Path,
    start: int = 0,
    end: int | None = None,
    *,
    with_embeddings: bool | None = None,
    with_head: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> Backbone:
    """Load layers [start, end) of the model in `model_dir` (see `pac.models.loading.resolve_model`)."""
    config = load_config(model_dir)
    backbone = Backbone(config, start, end, with_embeddings=with_embeddings, with_head=with_head)
    backbone.load_weights(Checkpoint(model_dir), dtype)
    return backbone
