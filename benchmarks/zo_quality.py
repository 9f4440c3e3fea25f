"""Zeroth-order quality against steps and wall time (issue 24): P-RGE's zeroth-order LoRA-FA beside backprop LoRA
and parallel adapters, on BBC News with SmolLM2-135M-Instruct: classification and language modelling.

A CPU-sized setting (the harness's 400 x 128-token setting costs a zeroth-order step of q = 4 over a batch of 8
about 80 s at one thread): 100 training articles, 100 validation articles, 64 tokens, batch 4, 4 epochs (25 steps
each, validated after each), seeds 0 and 1. Zeroth-order runs q = 2 (4 copies per forward) at a learning rate of
1e-3, 20x P-RGE's 5e-5, which is set for 20,000 steps; LoRA and parallel adapters run at their defaults.

Reported: validation accuracy (classify) or perplexity (lm) after every epoch (mean over the seeds, ± half their
range) against steps and against cumulative training seconds, and the steps and seconds zeroth-order needs to reach
LoRA's first-epoch quality, or that it does not within the budget.

    python benchmarks/zo_quality.py [--task classify|lm] [--report]
Writes benchmarks/results/zo_quality.{json,md,png} (classify) and zo_quality_lm.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".work" / "zo_quality"
sys.path.insert(0, str(HERE))
from quality import record  # noqa: E402

SPLIT = ["--train-size", "100", "--val-size", "100", "--max-length", "64", "--split-seed", "0"]
SETTING = [*SPLIT, "--batch-size", "4", "--epochs", "4"]
STEPS_PER_EPOCH = 25
KEY = "train100-val100-len64-batch4-epochs4"  # the setting the runs are filed under
UNTRAINED = "zero-shot"  # filed apart from the runs: setting -> {"0": {metric: value}}
METRIC = {"classify": "val_accuracy", "lm": "val_perplexity"}
TASK_WORDS = {"classify": "classification (5 classes)", "lm": "language modelling of held-out text"}
CONFIGS = {
    "zo": ("zeroth-order LoRA-FA r=16, q=2, lr 1e-3", ["--method", "zo", "--perturbations", "2", "--lr", "1e-3"]),
    "lora": ("LoRA r=8, backprop", ["--method", "lora"]),
    "parallel-adapters": ("parallel adapters (pac's default)", ["--method", "parallel-adapters"]),
}
SEEDS = [0, 1]


def results_stem(task: str) -> Path:
    return RESULTS / ("zo_quality" if task == "classify" else f"zo_quality_{task}")


def better(task: str, value: float, than: float) -> bool:
    """At least as good: accuracy rises, perplexity falls."""
    return value >= than if task == "classify" else value <= than


def run(task: str, name: str, seed: int) -> dict:
    out = WORK / task / name / f"seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pac.cli", "train", "--out", str(out), "--seed", str(seed), "--task", task, *SETTING]
    cmd += ["--cache-dir", str(WORK / "cache"), *CONFIGS[name][1]]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    summary = json.loads((out / "summary.json").read_text())
    return {"epochs": summary["epochs"], "trainable_params": summary["trainable_params"]}


def zero_shot(task: str) -> float:
    """The untrained model's quality on the same validation split (`pac eval --zero-shot`): where training starts."""
    cmd = [sys.executable, "-m", "pac.cli", "eval", "--zero-shot", "--task", task, *SPLIT]
    print("$", " ".join(cmd[2:]), flush=True)
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return result[METRIC[task].removeprefix("val_")]


def curve(task: str, runs: dict[str, dict]) -> list[dict]:
    """Per epoch: steps, the mean of the task's metric over the seeds, mean cumulative training seconds."""
    points = []
    for e in range(len(next(iter(runs.values()))["epochs"])):
        quality = [r["epochs"][e][METRIC[task]] for r in runs.values()]
        seconds = [sum(x["epoch_seconds"] for x in r["epochs"][: e + 1]) for r in runs.values()]
        points.append(
            {
                "steps": STEPS_PER_EPOCH * (e + 1),
                "quality": sum(quality) / len(quality),
                "spread": max(quality) - min(quality),
                "seconds": sum(seconds) / len(seconds),
            }
        )
    return points


def report(task: str, store: dict[str, dict], untrained: float | None) -> str:
    curves = {name: curve(task, runs) for name, runs in store.items() if runs}
    word = "accuracy" if task == "classify" else "perplexity"
    lines = [
        f"Setting: SmolLM2-135M-Instruct, BBC News {TASK_WORDS[task]}, 100 training and 100 validation "
        f"articles, 64 tokens, batch 4, {STEPS_PER_EPOCH} steps per epoch, seeds {', '.join(map(str, SEEDS))}; "
        "one thread per run, runs side by side on 2 cores (seconds comparable between rows only roughly). "
        f"Cells: validation {word} (± half the seeds' range), cumulative training seconds.",
        "",
        *([f"The untrained model (`pac eval --zero-shot`, same split): {untrained:.3f}.", ""] if untrained else []),
        "| method | seeds | trainable | "
        + " | ".join(f"after {p['steps']} steps" for p in next(iter(curves.values())))
        + " |",
        "|---|---|---|" + "---|" * len(next(iter(curves.values()))),
    ]
    for name, points in curves.items():
        trainable = next(iter(store[name].values()))["trainable_params"]
        cells = " | ".join(f"{p['quality']:.3f} (± {p['spread'] / 2:.3f}), {p['seconds']:.0f} s" for p in points)
        lines.append(f"| {name}: {CONFIGS[name][0]} | {len(store[name])} | {trainable:,} | {cells} |")
    if "lora" in curves and "zo" in curves:
        target = curves["lora"][0]
        reached = next((p for p in curves["zo"] if better(task, p["quality"], target["quality"])), None)
        last = curves["zo"][-1]
        lines += [
            "",
            f"LoRA's first-epoch {word}: {target['quality']:.3f} after {target['steps']} steps, "
            f"{target['seconds']:.0f} s. "
            + (
                f"Zeroth-order reaches it after {reached['steps']} steps, {reached['seconds']:.0f} s."
                if reached
                else f"Zeroth-order does not reach it within {last['steps']} steps and {last['seconds']:.0f} s: "
                f"it ends at {last['quality']:.3f}."
            ),
        ]
    return "\n".join(lines) + "\n"


def plot(task: str, store: dict[str, dict], untrained: float | None, path: Path) -> None:
    from pac.report import lines, pyplot, save

    curves = {name: curve(task, runs) for name, runs in store.items() if runs}
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(
        axes, ("steps", "seconds"), ("training steps", "training seconds (cumulative)"), strict=True
    ):
        series = {name: ([p[key] for p in points], [p["quality"] for p in points]) for name, points in curves.items()}
        spreads = {name: [p["spread"] / 2 for p in points] for name, points in curves.items()}
        if untrained:
            ax.axhline(untrained, color="grey", linestyle=":", label="untrained (zero-shot)")
        lines(ax, series, spreads, xlabel=label, ylabel=f"validation {METRIC[task].removeprefix('val_')}")
    fig.suptitle(f"Zeroth-order against backprop LoRA and parallel adapters (BBC News {task}, SmolLM2-135M)")
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(METRIC), default="classify")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = results_stem(args.task)
    path = stem.with_suffix(".json")
    if not args.report:
        for name in args.configs:
            for seed in args.seeds:
                record(path, KEY, name, seed, run(args.task, name, seed))
        record(path, UNTRAINED, KEY, 0, {METRIC[args.task]: zero_shot(args.task)})
    saved = json.loads(path.read_text())
    store = saved[KEY]
    untrained = saved.get(UNTRAINED, {}).get(KEY, {}).get("0", {}).get(METRIC[args.task])
    stem.with_suffix(".md").write_text(report(args.task, store, untrained))
    plot(args.task, store, untrained, stem.with_suffix(".png"))
    print(report(args.task, store, untrained))


if __name__ == "__main__":
    main()
