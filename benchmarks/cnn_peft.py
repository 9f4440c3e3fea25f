"""PEFT on edge CNNs (issue 25): accuracy against rank for LoRA, DoRA and GaLore, beside full fine-tuning and head +
BatchNorm, on MobileNetV2 (depthwise-separable) and ResNet-18 (standard convolutions), adapting to digits 5-9 (unseen
classes) and to corrupted digits 0-4 (a distribution shift).

Each network is pretrained once by `pac train --method full` on digits 0-4 (PRETRAIN_EPOCHS epochs from fresh
weights); every adaptation run starts from that run's directory (`--model NAME:RUN_DIR`) with the same pac train API
a user calls, EPOCHS epochs at batch 32, the method's default learning rate, 2 seeds (the seed draws the adapters
and the sample order; the split stays split seed 0). Reported: the last epoch's validation accuracy, trainable
parameters and seconds per epoch. Finished runs are kept in the JSON, so the script resumes where it stopped.

    python benchmarks/cnn_peft.py [--networks mobilenet_v2,resnet18] [--report]
Writes benchmarks/results/cnn_peft.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".work" / "cnn_peft"
NETWORKS = ["mobilenet_v2", "resnet18"]
TASKS = ["unseen", "shift"]
RANKED = ["lora", "dora", "galore"]
REFERENCES = ["full", "head-bn"]
RANKS = [1, 2, 4, 8, 16]
SEEDS = [0, 1]
PRETRAIN_EPOCHS, EPOCHS, BATCH = 5, 5, 32


def _options(method: str, rank: int | None):
    from pac.methods.registry import get_method

    options = get_method(method).options
    if method in ("lora", "dora"):
        return options(r=rank)
    if method == "galore":
        return options(rank=rank, update_gap=50)  # ~110 steps a run: the projection is refreshed twice
    return None


def _train(network_model: str, data: str, method: str, rank: int | None, seed: int, out: Path) -> dict:
    from pac.workflow import DataOptions, OptimOptions, TrainOptions, train

    opts = TrainOptions(
        model=network_model,
        data=DataOptions(data=data, task="image-classify"),
        method=method,
        method_options=_options(method, rank),
        optim=OptimOptions(epochs=EPOCHS, batch_size=BATCH, seed=seed),
        out=str(out),
        overwrite=True,
    )
    summary = train(opts)
    epochs = summary["epochs"]
    return {
        "accuracy": epochs[-1]["val_accuracy"],
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "seconds_per_epoch": statistics.mean(e["epoch_seconds"] for e in epochs),
    }


def pretrain(network: str) -> Path:
    from pac.workflow import DataOptions, OptimOptions, TrainOptions, train

    out = WORK / network / "pretrain"
    if not (out / "summary.json").exists():
        train(
            TrainOptions(
                model=network,
                data=DataOptions(data="digits:pretrain", task="image-classify"),
                method="full",
                optim=OptimOptions(epochs=PRETRAIN_EPOCHS, batch_size=BATCH),
                out=str(out),
            )
        )
    return out


def before_adaptation(start: Path) -> float:
    """The pretrained network's accuracy on the shift task's validation images, before any adaptation (the unseen
    classes have none: their head starts fresh)."""
    from pac.workflow import DataOptions, evaluate_adapter, load_for_inference

    data = DataOptions(data="digits:shift", task="image-classify")
    return evaluate_adapter(load_for_inference(start), data, split="val")["accuracy"]


def run(networks: list[str], results_file: Path) -> dict:
    results = json.loads(results_file.read_text()) if results_file.exists() else {"runs": {}}
    for network in networks:
        start = pretrain(network)
        results.setdefault("pretrain", {})[network] = json.loads((start / "summary.json").read_text())["epochs"][-1]
        results.setdefault("before", {})[network] = before_adaptation(start)
        for task in TASKS:
            plan = [(m, r) for m in RANKED for r in RANKS] + [(m, None) for m in REFERENCES]
            for method, rank in plan:
                for seed in SEEDS:
                    key = f"{network}/{task}/{method}/{rank}/{seed}"
                    if key in results["runs"]:
                        continue
                    out = WORK / network / task / f"{method}-{rank}-{seed}"
                    results["runs"][key] = _train(f"{network}:{start}", f"digits:{task}", method, rank, seed, out)
                    print(key, results["runs"][key], flush=True)
                    results_file.write_text(json.dumps(results, indent=2) + "\n")
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _grouped(results: dict) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for key, value in results["runs"].items():
        network, task, method, rank, _ = key.split("/")
        groups.setdefault((network, task, method, None if rank == "None" else int(rank)), []).append(value)
    return groups


def report(results: dict, stem: Path) -> None:
    groups = _grouped(results)
    # The network's own parameters: the fewest any run counted (a LoRA run's count includes its pairs)
    base: dict[str, int] = {}
    for (network, *_), runs in groups.items():
        base[network] = min(base.get(network, 1 << 62), *(r["total_params"] for r in runs))
    lines = [
        "# PEFT on edge CNNs: accuracy against rank (digits, 2 seeds)",
        "",
        f"Pretrained by full fine-tuning on digits 0-4 ({PRETRAIN_EPOCHS} epochs); adapted {EPOCHS} epochs at batch "
        f"{BATCH}, each method's default learning rate; validation accuracy of the last epoch, mean ± spread of "
        f"seeds {SEEDS}. Regenerate: `python benchmarks/cnn_peft.py`.",
        "",
        "Before adaptation, the pretrained networks score "
        + ", ".join(f"{n} {a:.3f}" for n, a in results.get("before", {}).items())
        + " on the shift task's validation images (the unseen classes start from a fresh head).",
        "",
        "| network | task | method | rank | accuracy | trainable params | share of network | s/epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (network, task, method, rank), runs in sorted(groups.items(), key=lambda kv: (kv[0][:3], kv[0][3] or 0)):
        accuracy = [r["accuracy"] for r in runs]
        spread = (max(accuracy) - min(accuracy)) / 2
        share = runs[0]["trainable_params"] / base[network]
        seconds = statistics.mean(r["seconds_per_epoch"] for r in runs)
        lines.append(
            f"| {network} | {task} | {method} | {rank or '—'} | {statistics.mean(accuracy):.3f} ± {spread:.3f} | "
            f"{runs[0]['trainable_params']:,} | {share:.2%} | {seconds:.1f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(groups, stem.with_suffix(".png"))


def _plot(groups: dict[tuple, list[dict]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    networks = sorted({k[0] for k in groups})
    fig, axes = plt.subplots(len(networks), len(TASKS), figsize=(11, 4 * len(networks)), squeeze=False)
    for row, network in enumerate(networks):
        for col, task in enumerate(TASKS):
            ax = axes[row][col]
            for method in RANKED:
                ranks = [r for r in RANKS if (network, task, method, r) in groups]
                means = [statistics.mean(x["accuracy"] for x in groups[(network, task, method, r)]) for r in ranks]
                ax.plot(ranks, means, marker="o", label=method)
            for method, style in zip(REFERENCES, ("--", ":"), strict=True):
                if (network, task, method, None) in groups:
                    mean = statistics.mean(x["accuracy"] for x in groups[(network, task, method, None)])
                    ax.axhline(mean, linestyle=style, color="grey", label=method)
            ax.set_xscale("log", base=2)
            ax.set_xticks(RANKS, [str(r) for r in RANKS])
            ax.set_title(f"{network}: {task}")
            ax.set_xlabel("rank")
            ax.set_ylabel("validation accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--results", default=str(RESULTS / "cnn_peft.json"), help="where runs are kept (resumable)")
    parser.add_argument("--report", action="store_true", help="only write the table and plot from the JSON")
    args = parser.parse_args()
    results_file = Path(args.results)
    results = json.loads(results_file.read_text()) if args.report else run(args.networks.split(","), results_file)
    report(results, RESULTS / "cnn_peft")


if __name__ == "__main__":
    main()
