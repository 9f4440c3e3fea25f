"""LoRA and DoRA baselines through the peft library, on the same model, data and head as pac.

Every comparison with parallel adapters is one flag apart (`--method lora`): the base model whole
(pac.methods.transformers_model) with peft's low-rank updates in its linear maps, the classification head on
the same pooled final-normed hidden state, language modelling through the frozen LM head. Unlike parallel
adapters, backward runs through the whole backbone, every epoch re-runs it, and the activations of every layer
are kept for backward: that is the cost pac avoids.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from pac.methods.transformers_model import DEFAULT_TARGETS, TransformersModel

HEAD_FILE = "head.safetensors"


@dataclass
class LoraSettings:
    task: str
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    use_dora: bool = False
    pooling: str = "mean"
    label_names: list[str] | None = None
    target_modules: list[str] | None = None


class LoraModel(TransformersModel):
    def __init__(self, model_dir: Path, settings: LoraSettings, adapter_dir: Path | None = None):
        # Plain attributes, set before nn.Module's own: `attach` reads them while the base model loads.
        self.settings, self.adapter_dir = settings, adapter_dir
        super().__init__(model_dir, settings.task, settings.pooling, settings.label_names)

    def attach(self, pretrained: PreTrainedModel) -> None:
        """peft around the loaded model: new low-rank updates train, or a saved adapter's load frozen."""
        settings = self.settings
        with warnings.catch_warnings():
            # peft asks the model `is_gradient_checkpointing`, an alias transformers deprecates: nothing to act on.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            if self.adapter_dir is not None:
                self.peft = PeftModel.from_pretrained(pretrained, self.adapter_dir, is_trainable=False)
            else:
                targets = settings.target_modules or DEFAULT_TARGETS[self.causal]
                self.peft = get_peft_model(
                    pretrained,
                    LoraConfig(
                        r=settings.r,
                        lora_alpha=settings.alpha,
                        lora_dropout=settings.dropout,
                        target_modules=targets,
                        use_dora=settings.use_dora,
                    ),
                )

    @property
    def network(self) -> nn.Module:
        return self.peft

    def body(self) -> nn.Module:
        base = self.peft.get_base_model()  # LoRA already injected into its linears
        return base.model if self.causal else base

    def save(self, out_dir: Path, base_model_name: str) -> None:
        """peft's files, with `base_model_name` (a hub id or the user's own path) as the base model
        in adapter_config.json: peft would record the directory loaded, pac's cache for a GGUF."""
        from safetensors.torch import save_file

        self.peft.peft_config["default"].base_model_name_or_path = base_model_name
        # Embeddings never train here; "auto" would ask the hub about base_model_name's vocabulary to find out.
        self.peft.save_pretrained(out_dir, save_embedding_layers=False)
        if self.head is not None:
            save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, out_dir / HEAD_FILE)

    def load_head(self, adapter_dir: Path) -> None:
        from safetensors.torch import load_file

        if self.head is not None:
            self.head.load_state_dict(load_file(Path(adapter_dir) / HEAD_FILE))
