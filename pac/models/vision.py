"""Edge CNNs defined in pac: MobileNetV2 (depthwise-separable convolutions) and ResNet-18 (standard ones).

torchvision does not import beside the CPU torch pac pins (its compiled operators are built against the CUDA
torch), so pac defines the two networks itself. Every parameter and buffer carries torchvision's name and shape
(`features.3.conv.1.0.weight`, `layer2.0.downsample.1.running_mean`, ...), so a torchvision ImageNet checkpoint
(a state dict saved by `torch.save(model.state_dict())`) loads as it is: `load_torchvision_weights`. A checkpoint
for another number of classes loads all but the classifier, which is then drawn fresh.

`pac train --task image-classify --model NAME[:CHECKPOINT]` names the network and what it starts from
(`NetworkSpec`): fresh weights, a torchvision state dict, or the --out directory of an earlier pac run that saved
the whole network (`--method full` or `galore`, e.g. pretraining on digits 0-4).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pac.errors import ModelError

# MobileNetV2's inverted residual stages: expansion t, output channels c, blocks n, first stride s.
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2))
MOBILENET_V2_STAGES += ((6, 320, 1, 1),)


def conv_bn(inputs: int, outputs: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True):
    """Convolution (no bias), BatchNorm and ReLU6, as one Sequential: torchvision's Conv2dNormActivation layout
    (`.0` the convolution, `.1` the norm)."""
    parts: list[nn.Module] = [
        nn.Conv2d(inputs, outputs, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(outputs),
    ]
    if act:
        parts.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*parts)


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped at t = 1), 3x3 depthwise, 1x1 linear projection; a residual where shapes allow."""

    def __init__(self, inputs: int, outputs: int, stride: int, expansion: int):
        super().__init__()
        hidden = inputs * expansion
        layers: list[nn.Module] = [conv_bn(inputs, hidden, kernel=1)] if expansion != 1 else []
        layers += [
            conv_bn(hidden, hidden, stride=stride, groups=hidden),  # depthwise: one 3x3 filter per channel
            nn.Conv2d(hidden, outputs, 1, bias=False),
            nn.BatchNorm2d(outputs),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 at width 1.0 (3.5 M parameters with 1,000 classes)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        features: list[nn.Module] = [conv_bn(3, 32, stride=2)]
        channels = 32
        for expansion, outputs, blocks, stride in MOBILENET_V2_STAGES:
            for i in range(blocks):
                features.append(InvertedResidual(channels, outputs, stride if i == 0 else 1, expansion))
                channels = outputs
        features.append(conv_bn(channels, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        _initialise(self)

    @property
    def head(self) -> nn.Linear:
        return self.classifier[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual; a strided 1x1 convolution matches shapes where they change."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class ResNet18(nn.Module):
    """ResNet-18 (11.7 M parameters with 1,000 classes)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = 64
        for index, outputs in enumerate((64, 128, 256, 512), start=1):
            stride = 1 if index == 1 else 2
            blocks = nn.Sequential(BasicBlock(channels, outputs, stride), BasicBlock(outputs, outputs, 1))
            setattr(self, f"layer{index}", blocks)
            channels = outputs
        self.fc = nn.Linear(512, num_classes)
        _initialise(self)

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


NETWORKS: dict[str, Callable[[int], nn.Module]] = {"mobilenet_v2": MobileNetV2, "resnet18": ResNet18}


def build_network(name: str, num_classes: int) -> nn.Module:
    if name not in NETWORKS:
        raise ModelError(f"unknown network {name!r}: pac defines {', '.join(NETWORKS)}")
    return NETWORKS[name](num_classes)


DEFAULT_NETWORK = "mobilenet_v2"
# A pac run directory that holds a whole network: its config says so (pac.methods.vision_model writes both).
RUN_CONFIG, RUN_WEIGHTS, WHOLE_NETWORK_KEY = "pac_adapter_config.json", "adapter_model.safetensors", "whole_network"


@dataclass(frozen=True)
class NetworkSpec:
    """A network to fine-tune and where its weights come from (`--model NAME[:CHECKPOINT]`)."""

    name: str
    checkpoint: Path | None = None  # a torchvision state dict, or a pac run directory; None: fresh weights

    @property
    def label(self) -> str:
        return self.name if self.checkpoint is None else f"{self.name}:{self.checkpoint}"

    def fingerprint(self) -> str:
        """sha256 hex of the network's name and its starting weights' bytes."""
        h = hashlib.sha256(f"pac.NetworkSpec.v1\0{self.name}\0".encode())
        if self.checkpoint is not None:
            file = self.checkpoint / RUN_WEIGHTS if self.checkpoint.is_dir() else self.checkpoint
            h.update(file.read_bytes())
        return h.hexdigest()


def parse_network(model: str | None) -> NetworkSpec:
    """`--model` of an image task: NAME (fresh weights) or NAME:CHECKPOINT."""
    name, _, checkpoint = (model or DEFAULT_NETWORK).partition(":")
    if name not in NETWORKS:
        raise ModelError(
            f"--task image-classify fine-tunes one of pac's CNNs: --model {' or '.join(NETWORKS)}[:CHECKPOINT], "
            f"not {model!r}"
        )
    if not checkpoint:
        return NetworkSpec(name)
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise ModelError(f"{path}: no such checkpoint (a torchvision state dict, or a pac run's --out directory)")
    return NetworkSpec(name, path.resolve())


def load_network(spec: NetworkSpec, label_names: list[str]) -> tuple[nn.Module, list[str]]:
    """The network with one output per label, its weights from the spec's checkpoint; returns it and the names
    of what starts fresh (the head, where the checkpoint was trained for other classes)."""
    network = build_network(spec.name, len(label_names))
    if spec.checkpoint is None:
        return network, sorted(network.state_dict())
    if not spec.checkpoint.is_dir():
        return network, load_torchvision_weights(network, spec.checkpoint)
    return network, _load_run_weights(network, spec, label_names)


def _load_run_weights(network: nn.Module, spec: NetworkSpec, label_names: list[str]) -> list[str]:
    from safetensors.torch import load_file

    config_file = spec.checkpoint / RUN_CONFIG
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    if not config.get(WHOLE_NETWORK_KEY):
        raise ModelError(
            f"{spec.checkpoint} does not hold a whole network to start from: pretrain with --method full or galore "
            "(an adapter of lora, dora or head-bn is a change of its own base network)"
        )
    if config.get("network") != spec.name:
        raise ModelError(
            f"{spec.checkpoint} holds a {config.get('network')}, not a {spec.name}: "
            f"--model {config.get('network')}:{spec.checkpoint}"
        )
    state = load_file(spec.checkpoint / RUN_WEIGHTS)
    head = {f"{name}.{p}" for name, m in network.named_modules() if m is network.head for p in ("weight", "bias")}
    # Other classes: the head starts fresh; the same classes (a distribution shift) keep the trained one.
    fresh = sorted(head) if config.get("label_names") != label_names else []
    network.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=not fresh)
    return fresh


def load_torchvision_weights(model: nn.Module, checkpoint: Path) -> list[str]:
    """Load a torchvision-format state dict into `model`; returns what was left at its fresh start (the head,
    when the checkpoint was trained for another number of classes). A checkpoint of another network is refused
    with the names that do not fit."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelError(f"cannot read {checkpoint} as a PyTorch state dict: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint that wraps it
    ours = model.state_dict()
    head = {f"{name}.{p}" for name, m in model.named_modules() if m is model.head for p in ("weight", "bias")}
    unknown = sorted(k for k in state if k not in ours)
    missing = sorted(k for k in ours if k not in state and k not in head)
    misshapen = sorted(k for k in state if k in ours and k not in head and state[k].shape != ours[k].shape)
    if unknown or missing or misshapen:
        found = "; ".join(
            f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for what, keys in (("unknown", unknown), ("missing", missing), ("other shapes", misshapen))
            if keys
        )
        raise ModelError(
            f"{checkpoint} is not a torchvision {type(model).__name__} state dict ({found}): pass the checkpoint of "
            "the network you chose"
        )
    fresh = sorted(k for k in head if k not in state or state[k].shape != ours[k].shape)
    model.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
    return fresh


def _initialise(model: nn.Module) -> None:
    """He-normal convolutions (fan out), unit BatchNorm, a small normal head."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
