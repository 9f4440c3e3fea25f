"""Where a run computes (`pac train --device`): the CPU, a CUDA GPU (a Jetson's, a desktop's), Apple silicon's
MPS, or "lazy", torch's lazy-tensor backend, which runs on the CPU and stands in for an accelerator where none
is: tensors left on the CPU by mistake meet a device tensor and fail there as they would on a GPU
(docs/architecture.md, "Devices").

A model is built on the CPU and moved to the device for the training loop; batches, read from the cache or the
tokenised data on the CPU, are moved one by one (`OnDevice`); the trained weights come back to the CPU before
anything is saved.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from pac.data.tasks import IMAGE_TASK
from pac.errors import PacError
from pac.runtime.sources import Wrapped

if TYPE_CHECKING:
    from pac.methods.registry import Method

log = logging.getLogger(__name__)

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps or lazy (the CPU stand-in for an accelerator)"
_LAZY_READY: list[bool] = []


def resolve_device(name: str) -> torch.device:
    """The torch device `name` asks for, checked to work here; "auto": a CUDA GPU, else MPS, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise PacError(f"--device {name!r} is not a device: use {DEVICE_CHOICES}") from exc
    if device.type not in ("cpu", "cuda", "mps", "lazy"):
        raise PacError(f"--device {name!r}: pac trains on {DEVICE_CHOICES}")
    if device.type == "lazy" and not _LAZY_READY:
        from torch._lazy import ts_backend

        ts_backend.init()  # once per process: a second init raises
        _LAZY_READY.append(True)
        log.warning(
            "--device lazy is torch's lazy-tensor backend on the CPU: a stand-in for an accelerator in tests, "
            "slower than --device cpu, and its random draws (dropout) do not match the graph it runs"
        )
    try:
        torch.empty(1, device=device)
    except (AssertionError, RuntimeError, NotImplementedError) as exc:
        hint = {
            "cuda": "a torch built with CUDA (on a Jetson: NVIDIA's JetPack wheel) and a visible GPU",
            "mps": "macOS 14 or newer on Apple silicon",
        }.get(device.type, "that device")
        raise PacError(
            f"--device {name}: this torch {torch.__version__} cannot compute there ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}); it needs {hint}. Train on --device cpu"
        ) from exc
    return device


def cpu_only(method: Method, task: str) -> str | None:
    """Why `method` trains on the CPU only for `task`, or None where it runs on a device too."""
    if not method.accelerates:
        return f"--method {method.name} trains on the CPU only"
    if task == IMAGE_TASK:
        return "image tasks train on the CPU only"
    return None


def move(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """`module.to(device)`, keeping a weight that several submodules share shared (a tied embedding and LM head):
    moving between the CPU and a device whose tensors are of another kind (the lazy stand-in; XLA) gives each
    submodule a new parameter of its own, which would then train apart."""
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for submodule in module.modules():
        for name, param in submodule._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((submodule, name))
    module.to(device)
    for (first, first_name), *others in owners.values():
        for submodule, name in others:
            submodule._parameters[name] = first._parameters[first_name]
    return module


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are (the CPU for a module without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def settle(device: torch.device) -> None:
    """End a step's work on the device: the lazy backend runs the step's graph now and starts the next one
    afresh (without it each step's graph would hold every earlier step's); other devices run eagerly."""
    if device.type == "lazy":
        from torch._lazy import mark_step

        mark_step()


def inference(device: torch.device) -> torch.autograd.grad_mode.inference_mode | torch.no_grad:
    """The no-gradient context of a pass on `device`: inference mode, or plain no_grad on the lazy stand-in, whose
    views (as in every attention layer) do not run under inference mode."""
    return torch.no_grad() if device.type == "lazy" else torch.inference_mode()


def autocast_device(device: torch.device, precision: str) -> str:
    """The autocast device type of a step on `device` under `precision` (the lazy stand-in has none)."""
    if device.type == "lazy" and precision != "fp32":
        raise PacError("the lazy stand-in device computes in fp32 only: drop --precision bf16, or train on cpu")
    return "cpu" if device.type == "lazy" else device.type


def to_cpu(tree: Any) -> Any:
    """`tree` (a state dict: nested dicts and lists) with every tensor copied to the CPU: a checkpoint that any
    device resumes, and one torch can write at all from the lazy stand-in."""
    from torch.utils._pytree import tree_map_only

    return tree_map_only(torch.Tensor, lambda t: t.to("cpu"), tree)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


class OnDevice(Wrapped):
    """A batch source whose batches are moved to `device` as they are drawn (the sources read on the CPU)."""

    def __init__(self, source: Any, device: torch.device):
        super().__init__(source)
        self.device = device

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return to_device(self.source.batch(indices), self.device)


def on_device(source: Any, device: torch.device) -> Any:
    """`source` with its batches on `device` (itself on the CPU; None stays None)."""
    return source if source is None or device.type == "cpu" else OnDevice(source, device)


def device_rng_state(device: torch.device) -> torch.Tensor | None:
    """The random state of `device`'s own generator (a GPU's dropout draws from it); None where the CPU's serves."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.mps.get_rng_state() if device.type == "mps" else None


def set_device_rng_state(device: torch.device, state: torch.Tensor | None) -> None:
    if state is None:
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)
