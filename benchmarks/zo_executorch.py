"""Zeroth-order's perturbed forward through ExecuTorch against PyTorch eager (issue 24, point 6).

SmolLM2-135M-Instruct, classification head, LoRA-FA r = 16, q = 2 (4 copies), batch 2 x 64 tokens: the losses of
the copies from `pac.methods.zo.engine.ExecuTorchLosses` (exported once, lowered to ExecuTorch's portable kernels)
and from the model in eager PyTorch, their largest difference, the one-off export and lowering time, the program's
size, and the time per forward (best of 3). One thread.

    python benchmarks/zo_executorch.py
Writes benchmarks/results/zo_executorch.{json,md}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pac.methods.zo.engine import ExecuTorchLosses
from pac.methods.zo.model import ZerothOrderModel
from pac.methods.zo.step import direction_seeds, perturbed_copies
from pac.models.loading import resolve_model

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    model = ZerothOrderModel(resolve_model(None), "classify", "mean", list("abcde"), rank=16, seed=0)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40000, (2, 64), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 3])}
    copies = perturbed_copies(model.trained(), direction_seeds(0, 0, 2), 1e-2)
    engine = ExecuTorchLosses(model)
    with torch.no_grad():
        exported = engine(batch, copies)  # exports and lowers
        eager = model.copy_loss_sums(batch, copies)
        result = {
            "setting": "SmolLM2-135M-Instruct, classify, LoRA-FA r=16, q=2 (4 copies), batch 2 x 64 tokens, 1 thread",
            "lowering_seconds": engine.lowering_seconds,
            "program_mb": len(next(iter(engine.programs.values()))[0]) / 1e6,
            "max_loss_difference": float((exported - eager).abs().max()),
            "losses": eager.tolist(),
            "eager_seconds": best_of(lambda: model.copy_loss_sums(batch, copies)),
            "executorch_seconds": best_of(lambda: engine(batch, copies)),
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "zo_executorch.json").write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join(
        [
            f"Setting: {result['setting']}.",
            "",
            "| engine | s per forward of the copies | one-off | program |",
            "|---|---|---|---|",
            f"| PyTorch eager | {result['eager_seconds']:.2f} | — | — |",
            f"| ExecuTorch (portable kernels) | {result['executorch_seconds']:.2f} | export and lowering "
            f"{result['lowering_seconds']:.0f} s | {result['program_mb']:.0f} MB |",
            "",
            f"The copies' losses agree to {result['max_loss_difference']:.1e} (losses about "
            f"{sum(result['losses']) / len(result['losses']):.1f}).",
        ]
    )
    (RESULTS / "zo_executorch.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
