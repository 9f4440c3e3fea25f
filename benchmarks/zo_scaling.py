"""Time per zeroth-order step against the number of perturbations q, batched against sequential.

SmolLM2-135M-Instruct, classification, LoRA-FA r=16, 64-token rows, in this process. For each q in 1, 2, 4, 8, 16
one step evaluates 2q perturbed copies: in one forward over the batch tiled 2q times (batched, P-RGE's
parallelism) or in 2q forwards (sequential). Two series:
  per copy 1   one row per copy: the work grows with q, and the question is how much of it batching hides
  q x rows 16  P-RGE's setting (q x batch = 16): every step reads 16 rows, spread over q directions
One warm-up step, then one timed. Writes benchmarks/results/zo_scaling.{json,md,png}.

    python benchmarks/zo_scaling.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
QS = [1, 2, 4, 8, 16]
TOKENS = 64


def measure() -> dict:
    from pac.methods.registry import BuildContext, get_method
    from pac.methods.zo import ZerothOrderOptions
    from pac.methods.zo.step import ZerothOrderStep
    from pac.models.loading import resolve_model
    from pac.runtime.trainer import TrainConfig

    class Rows:
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(0, 49152, (64, TOKENS), generator=g)

        def __len__(self) -> int:
            return len(self.ids)

        def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
            ids = self.ids[indices]
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(indices) % 5}

    ctx = BuildContext(resolve_model(None), "classify", list("abcde"), 0, TOKENS)
    model = get_method("zo").build(ZerothOrderOptions(), ctx)
    source, results = Rows(), {}
    for series, rows_of, qs in (("per copy 1", lambda q: 1, QS), ("q x rows 16", lambda q: 16 // q, [1, 4, 16])):
        for q in qs:
            for mode in ("batched", "sequential"):
                rows = rows_of(q)
                step = ZerothOrderStep(model, source, TrainConfig(epochs=1, lr=0.0), q, 1e-2, mode == "batched")
                seconds = []
                for i in range(2):
                    started = time.perf_counter()
                    step(list(range(rows * i, rows * (i + 1))), i)
                    seconds.append(time.perf_counter() - started)
                results.setdefault(series, {}).setdefault(str(q), {})[mode] = seconds[-1]
                print(series, q, mode, f"{results[series][str(q)][mode]:.2f} s", flush=True)
    return {"threads": torch.get_num_threads(), "tokens": TOKENS, "seconds_per_step": results}


def report(data: dict) -> str:
    lines = [
        f"Time per step, SmolLM2-135M, {data['tokens']} tokens, {data['threads']} threads "
        "(`python benchmarks/zo_scaling.py`).",
        "",
        "| series | q | copies per forward | batched | sequential | batched / sequential | batched vs q = 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for series, by_q in data["seconds_per_step"].items():
        first = by_q["1"]["batched"]
        for q, t in by_q.items():
            lines.append(
                f"| {series} | {q} | {2 * int(q)} | {t['batched']:.2f} s | {t['sequential']:.2f} s "
                f"| {t['batched'] / t['sequential']:.2f} | {t['batched'] / first:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (series, by_q) in zip(axes, data["seconds_per_step"].items(), strict=True):
        qs = [int(q) for q in by_q]
        for mode in ("batched", "sequential"):
            ax.plot(qs, [by_q[str(q)][mode] for q in qs], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("q (perturbations per step)")
        ax.set_ylabel("seconds per step")
        ax.set_title(series)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Zeroth-order LoRA-FA step time against q (SmolLM2-135M, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    data = measure()
    (RESULTS / "zo_scaling.json").write_text(json.dumps(data, indent=2) + "\n")
    text = report(data)
    (RESULTS / "zo_scaling.md").write_text(text)
    plot(data, RESULTS / "zo_scaling.png")
    print(text)


if __name__ == "__main__":
    main()
