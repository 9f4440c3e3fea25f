"""The base model whole, as transformers loads it, on token ids: what full fine-tuning trains as it is and LoRA /
DoRA wrap in peft (pac.methods.lora.model).

Language modelling reads the model's own LM head; classification reads pac's head over the pooled final-normed
hidden state, the read-out parallel adapters use, so every method is one flag apart on the same model and head.
Backward runs through the whole backbone, and every epoch re-runs it: the cost parallel adapters avoid.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

from pac.errors import PacError
from pac.methods.base import MethodModel
from pac.methods.registry import Loaded
from pac.models.backbone import load_config
from pac.models.families import family_for
from pac.models.heads import ClassificationHead

# The linear maps LoRA, TaskEdge and zeroth-order adapt by default, by causal or not: every linear map of a layer,
# as in the measured anchor (q,k,v,o,gate,up,down); BERT's query, key, value and dense.
DEFAULT_TARGETS = {
    True: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    False: ["query", "key", "value", "dense"],
}


class TransformersModel(MethodModel):
    """The causal LM (or, for classification, an encoder too) loaded whole in float32, with pac's classification
    head; every weight trains. A subclass changes what trains by wrapping the loaded model (`attach`)."""

    def __init__(self, model_dir: Path, task: str, pooling: str, label_names: list[str] | None):
        super().__init__()
        config = load_config(model_dir)
        family = family_for(config)
        if task == "lm" and not family.causal:
            raise PacError(f"{family.name} is an encoder without an LM head: use --task classify")
        self.task, self.causal = task, family.causal
        loader = AutoModelForCausalLM if family.causal else AutoModel
        # No hub kernels (transformers' default where the `kernels` package is): they are fetched from the hub,
        # which a home network may not reach, and they know only some devices; torch's own ops run on each.
        model = loader.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa", use_kernels=False)
        self.attach(model)
        self.head = ClassificationHead(config.hidden_size, len(label_names), pooling) if task == "classify" else None

    def attach(self, pretrained: PreTrainedModel) -> None:
        """Keep the loaded model as training runs it (`network`): here as it is."""
        self.network = pretrained

    def body(self) -> nn.Module:
        """The model below its LM head (its last_hidden_state is final-normed): what the classification head reads."""
        return self.network.model if self.causal else self.network

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.head is None:
            return self.network(input_ids=ids, attention_mask=mask).logits
        # The body alone: classification skips the vocabulary-wide LM head.
        return self.head(self.body()(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


def target_linears(network: nn.Module, targets: Iterable[str]) -> dict[str, nn.Linear]:
    """The linear maps whose last name is one of `targets` (q_proj, ...), by qualified name."""
    wanted = set(targets)
    linears = {name: m for name, m in network.named_modules() if isinstance(m, nn.Linear)}
    found = {name: m for name, m in linears.items() if name.rpartition(".")[2] in wanted}
    if not found:
        names = sorted({name.rpartition(".")[2] for name in linears})
        raise PacError(
            f"--target-modules {','.join(sorted(wanted))} names none of this model's linear maps: pick from "
            f"{','.join(names)}"
        )
    return found


def lm_logits(loaded: Loaded, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`Method.lm_logits` of a loaded TransformersModel: its network's next-token logits."""
    return loaded.model.network(input_ids=ids, attention_mask=mask).logits


def merged(loaded: Loaded) -> PreTrainedModel:
    """`Method.merged` of a method whose loaded network already holds its changes (full, taskedge)."""
    return loaded.model.network


def generate(
    loaded: Loaded, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float, seed: int
) -> torch.Tensor:
    """`Method.generate` of a loaded TransformersModel: its network's own decoding (transformers', or peft's
    around LoRA), greedy at temperature 0 (no sampling flags, so no warning about them), else sampled."""
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return loaded.model.network.generate(
        input_ids=input_ids,
        max_new_tokens=max_new_tokens,
        **(sampling if temperature > 0 else {"do_sample": False}),
    )[:, input_ids.shape[1] :]
