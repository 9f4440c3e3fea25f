"""Edge CNNs as a method's model (`--task image-classify`): a pac.models.vision network, and what each method
trains of it. The methods' own modules route image tasks here, so `--method lora` is one flag on an LLM or a CNN.

    full      every weight and BatchNorm statistic trains (the reference)
    galore    the same weights, GaLore's low-rank optimizer state (pac.methods.galore)
    head-bn   the classifier and the BatchNorm layers (affine weights and running statistics) only
    lora/dora peft's low-rank pairs on every Conv2d and Linear but the head, which trains whole; BatchNorm frozen

peft puts LoRA on a grouped convolution only at a rank that is a multiple of its groups (A is an ungrouped
r x C x k x k convolution, B grouped): on a depthwise layer (groups = channels) the pair is then larger than the
layer itself. So depthwise layers stay frozen unless `--depthwise lora` asks for them (at that rank).

An adapter saves what trained, under the network's own (torchvision) names; `full` and `galore` save the whole state
dict, which the next run can start from (`--model mobilenet_v2:RUN_DIR`).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pac.data.tasks import IMAGE_TASK
from pac.errors import PacError
from pac.methods.base import MethodModel, load_adapter, save_adapter
from pac.methods.registry import METHOD_KEY, BuildContext, Loaded
from pac.models.vision import WHOLE_NETWORK_KEY, NetworkSpec, load_network, parse_network

log = logging.getLogger(__name__)

WHOLE = ("full", "galore")  # methods whose every weight trains: their runs save (and start) a whole network
LOW_RANK = ("lora", "dora")
DEPTHWISE = ("frozen", "lora")


@dataclass
class VisionSettings:
    method: str  # full | galore | head-bn | lora | dora
    r: int = 8  # lora / dora rank
    depthwise: str = "frozen"  # lora / dora on depthwise (grouped) convolutions: frozen | lora


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1


def low_rank_targets(network: nn.Module, r: int, depthwise: str) -> tuple[list[str], dict[str, int]]:
    """The modules peft puts LoRA on (every Conv2d and Linear but the head; depthwise ones only if asked), and the
    rank of each grouped one: the smallest multiple of its groups at or above `r`, as peft requires."""
    targets, ranks = [], {}
    for name, module in network.named_modules():
        if module is network.head or not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        if is_depthwise(module):
            if depthwise == "frozen":
                continue
            ranks[name] = math.ceil(r / module.groups) * module.groups
        targets.append(name)
    return targets, ranks


class VisionModel(MethodModel):
    """A CNN and the part of it that a method trains; batches are {"images", "labels"}."""

    task = IMAGE_TASK

    def __init__(self, spec: NetworkSpec, label_names: list[str], settings: VisionSettings):
        super().__init__()
        if settings.method in LOW_RANK and settings.depthwise not in DEPTHWISE:
            raise PacError(f"--depthwise must be one of {', '.join(DEPTHWISE)}, not {settings.depthwise!r}")
        if settings.method not in WHOLE and spec.checkpoint is None:
            raise PacError(
                f"--method {settings.method} adapts a trained network, and --model {spec.name} is untrained: start "
                f"from a checkpoint (--model {spec.name}:FILE_OR_RUN_DIR), e.g. a `pac train --method full` run"
            )
        self.spec, self.label_names, self.settings = spec, label_names, settings
        self.network, self.fresh = load_network(spec, label_names)
        self.trains_norms = settings.method in (*WHOLE, "head-bn")
        if settings.method in LOW_RANK:
            self._attach_low_rank()
        if settings.method not in WHOLE:
            self.network.requires_grad_(False)
            trained = [self.network.head] + (self._norms() if self.trains_norms else [])
            for module in trained:
                module.requires_grad_(True)
            for name, param in self.network.named_parameters():
                if "lora_" in name:
                    param.requires_grad_(True)

    def _attach_low_rank(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        settings = self.settings
        targets, ranks = low_rank_targets(self.network, settings.r, settings.depthwise)
        if ranks:
            log.info(
                "LoRA on %d depthwise layers at ranks %s (peft's multiple of groups)",
                len(ranks),
                sorted(set(ranks.values())),
            )
        config = LoraConfig(
            r=settings.r,
            lora_alpha=2 * settings.r,
            target_modules=targets,
            rank_pattern=ranks,
            alpha_pattern={name: 2 * rank for name, rank in ranks.items()},
            use_dora=settings.method == "dora",
        )
        with warnings.catch_warnings():  # "Merging is not supported" for grouped layers: pac never merges them
            warnings.filterwarnings("ignore", "LoRA adapter added to ConvNd layer with groups > 1")
            inject_adapter_in_model(config, self.network)

    def _named_norms(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.network.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    def _norms(self) -> list[nn.Module]:
        return list(self._named_norms().values())

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images = batch["images"]
        if self.training and self.trains_norms and len(images) == 1:
            # BatchNorm cannot take statistics of one image where the map is 1x1 (MobileNetV2's last layers at
            # 32 pixels): an epoch's last batch of one normalises with the running statistics instead.
            norms = [norm for norm in self._norms() if norm.training]
            for norm in norms:
                norm.eval()
            try:
                return self.network(images)
            finally:
                for norm in norms:
                    norm.train()
        return self.network(images)

    def train(self, mode: bool = True) -> VisionModel:
        super().train(mode)
        if not self.trains_norms:  # frozen BatchNorm normalises with the statistics it was trained with
            for norm in self._norms():
                norm.eval()
        return self

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """What training changes, under the network's names: trainable parameters, and the BatchNorm running
        statistics of a method that trains the norms (a checkpoint must hold them to resume exactly)."""
        weights = {n: p for n, p in self.network.named_parameters() if p.requires_grad}
        if self.trains_norms:
            norms = self._named_norms()
            weights.update({n: b for n, b in self.network.named_buffers() if n.rpartition(".")[0] in norms})
        return weights


def build(settings: VisionSettings, ctx: BuildContext) -> VisionModel:
    if not ctx.label_names:
        raise PacError("--task image-classify needs labelled images: --data digits, digits:TASK or a folder per class")
    return VisionModel(ctx.network, ctx.label_names, settings)


def save(model: VisionModel, out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What trained (the whole state dict, for full and galore), with the settings to rebuild it."""
    settings, whole = model.settings, model.settings.method in WHOLE
    weights = model.network.state_dict() if whole else model.trained_weights()
    config = {
        **meta,
        METHOD_KEY: settings.method,
        "network": model.spec.name,
        "r": settings.r,
        "depthwise": settings.depthwise,
        WHOLE_NETWORK_KEY: whole,
    }
    save_adapter(out, config, weights)
    trainable = sum(p.numel() for p in model.network.parameters() if p.requires_grad)
    own = sum(p.numel() for name, p in model.network.named_parameters() if "lora_" not in name)  # not the pairs
    return {"trainable_params": trainable, "total_params": own}


def load(adapter_dir: Path, raw: dict[str, Any]) -> Loaded:
    """The adapter on its base network (the one it was trained from, checked by fingerprint)."""
    base = NetworkSpec(raw["network"]) if raw[WHOLE_NETWORK_KEY] else parse_network(raw["base_model_name_or_path"])
    if not raw[WHOLE_NETWORK_KEY] and base.fingerprint() != raw["base_model_fingerprint"]:
        raise PacError(
            f"{adapter_dir} was trained on another {base.name} than {base.label} (fingerprint mismatch): the base "
            "network's checkpoint has changed or moved"
        )
    settings = VisionSettings(raw[METHOD_KEY], raw["r"], raw["depthwise"])
    model = VisionModel(base, raw["label_names"], settings)
    saved = load_adapter(adapter_dir)[1]
    expected = model.network.state_dict() if raw[WHOLE_NETWORK_KEY] else model.trained_weights()
    if saved.keys() != expected.keys():
        raise PacError(f"{adapter_dir}: its weights do not fit a {base.name} with {settings.method}: retrain it")
    model.network.load_state_dict(saved, strict=raw[WHOLE_NETWORK_KEY])
    return Loaded(model.eval(), None, IMAGE_TASK, 0, raw["label_names"])
