"""Memory of a training step by category, from torch's MemTracker (`torch.distributed._tools.mem_tracker`), which
attributes every tensor allocated through torch's dispatcher to parameters, buffers, gradients, optimizer state,
activations or temporaries, on CPU as on CUDA. It is a private API: this module is pac's only user of it, and
tests/test_step_profile.py checks it on the torch pac runs with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# MemTracker's reference types (their values) -> pac's names for them
CATEGORIES = {
    "Parameter": "parameters",
    "Buffer": "buffers",
    "Gradient": "gradients",
    "Optstate": "optimizer_state",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "other",
}


class _NoHook:
    """A hook handle with nothing to remove."""

    def remove(self) -> None:
        pass


def _tracker(model: nn.Module) -> Any:
    """A MemTracker that tolerates frozen parameters: it hooks every parameter's gradient, and torch refuses a hook
    on one that needs none (every frozen weight beside an adapter): those are marked as hooked already."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    for param in model.parameters():
        if not param.requires_grad:
            tracker._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
    return tracker


def peak_by_category(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, step: Callable[[], Any], steps: int = 2
) -> dict[str, int]:
    """Bytes by category at the peak of `steps` calls of `step` (the second has the optimizer's state to hold, the
    first allocates it), and "total"."""
    tracker = _tracker(model)
    tracker.track_external(*(x for x in (model, optimizer) if x is not None))
    with tracker:
        for _ in range(steps):
            step()
            tracker.reset_mod_stats()  # MemTracker refuses a module's second forward otherwise
    snapshot: dict[Any, dict[Any, int]] = tracker.get_tracker_snapshot("peak")
    peak = {name: 0 for name in CATEGORIES.values()}
    for per_device in snapshot.values():
        for kind, size in per_device.items():
            name = CATEGORIES.get(getattr(kind, "value", kind))
            if name is not None:
                peak[name] += int(size)
    peak["total"] = sum(peak.values())
    return peak
