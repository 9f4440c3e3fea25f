"""The perturbed forward through an inference engine (`--zo-engine executorch`): P-RGE's point that training
needs nothing but what runs inference.

The forward of 2q perturbed copies takes the copies as inputs (`PerturbedForward`), so one exported program
serves every step: torch.export captures it once per batch shape, ExecuTorch lowers it to its portable kernels and
runs it; the step draws the copies and updates B in Python as before. A batch of another shape (the last of an
epoch) gets its own program. ExecuTorch 1.5's XNNPACK delegate is not used: its program of this forward failed at
run time (NotSupported) and lowering SmolLM2 through it took over 14 minutes (benchmarks/results/zo_executorch.md).
ExecuTorch is optional: `pip install executorch`.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from pac.errors import PacError
from pac.methods.zo.model import Copies, ZerothOrderModel

log = logging.getLogger(__name__)


class PerturbedForward(nn.Module):
    """(input_ids, attention_mask, labels, *copies in `trained()` order) -> each copy's summed loss."""

    def __init__(self, model: ZerothOrderModel):
        super().__init__()
        self.model, self.names = model, list(model.trained())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *copies):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return self.model.copy_loss_sums(batch, dict(zip(self.names, copies, strict=True)))


class ExecuTorchLosses:
    """Each copy's summed loss from an ExecuTorch program of the model's perturbed forward, lowered once per
    shape of (batch, copies)."""

    def __init__(self, model: ZerothOrderModel):
        try:
            from executorch.runtime import Runtime
        except ImportError:
            raise PacError("--zo-engine executorch needs ExecuTorch: `pip install executorch`") from None
        self.forward = PerturbedForward(model).eval()
        self.runtime = Runtime.get()
        self.programs: dict[tuple, tuple] = {}  # input shapes -> (serialised program, loaded program, method)
        self.lowering_seconds = 0.0

    def __call__(self, batch: dict[str, torch.Tensor], copies: Copies) -> torch.Tensor:
        inputs = [batch["input_ids"], batch["attention_mask"], batch["labels"], *copies.values()]
        shape = tuple(tuple(t.shape) for t in inputs[:3]) + (next(iter(copies.values())).shape[0],)
        if shape not in self.programs:
            self.programs[shape] = self._lower(tuple(inputs))
        return self.programs[shape][-1].execute(inputs)[0]

    def _lower(self, inputs: tuple[torch.Tensor, ...]):
        from executorch.exir import to_edge

        started = time.perf_counter()
        program = to_edge(torch.export.export(self.forward, inputs, strict=False)).to_executorch()
        buffer = program.buffer
        loaded = self.runtime.load_program(buffer)
        seconds = time.perf_counter() - started
        self.lowering_seconds += seconds
        log.info("lowered the perturbed forward for inputs %s in %.1f s", [tuple(t.shape) for t in inputs], seconds)
        # A method reads its program's memory: both stay alive as long as it is used.
        return buffer, loaded, loaded.load_method("forward")
