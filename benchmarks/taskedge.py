"""TaskEdge against LoRA and parallel adapters: quality, trainable parameters, memory, time (issue 23).

Runs go through the quality harness (benchmarks/quality.py: its split, seeds, records), in two settings:
  main   400 / 400 articles, 3 epochs: TaskEdge 0.1% beside LoRA r=8 and parallel adapters (both tasks)
  sweep  400 / 400 articles, 1 epoch, seed 0, both tasks: budgets (0.01%, 0.1%, 1%), selections at 0.1%
         (TaskEdge, global top-k, magnitude alone, random), the 2:4 pattern, sparse LoRA and (classification)
         LoRA's learning rate (5e-4), with LoRA for reference
Peak memory and step time against LoRA and full fine-tuning at one batch: benchmarks/step_memory.py.

    python benchmarks/taskedge.py            # run what is not recorded yet, then the report
    python benchmarks/taskedge.py --report   # the report alone: taskedge.{md,png}
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from quality import CONFIGS, METRIC, aggregate  # noqa: E402

MAIN, SWEEP = "train400-val400-epochs3", "train400-val400-epochs1"
MAIN_RUNS = {"classify": ["taskedge"], "lm": ["taskedge"]}
SWEEP_RUNS = [
    "lora",
    "taskedge",
    "taskedge-lr5e-4",
    "taskedge-0.01",
    "taskedge-1",
    "taskedge-global",
    "taskedge-magnitude",
    "taskedge-random",
    "taskedge-nm24",
    "taskedge-1-nm24",
    "taskedge-sparse-lora",
]
LM_SWEEP_LEFT_OUT = ("taskedge-lr5e-4",)  # classification's question; the LM sweep is long
SHOWN = ["zero-shot", "lora", "side", "pac-default", "side-retrieval-shortlist256"]


def run_missing() -> None:
    harness = [sys.executable, str(HERE / "quality.py")]
    for task, configs in MAIN_RUNS.items():
        subprocess.run([*harness, "--task", task, "--configs", *configs, "--seeds", "0", "1", "2"], check=True)
    for task in ("classify", "lm"):
        configs = sweep_runs(task)
        subprocess.run([*harness, "--task", task, "--epochs", "1", "--configs", *configs, "--seeds", "0"], check=True)


def sweep_runs(task: str) -> list[str]:
    return [name for name in SWEEP_RUNS if task == "classify" or name not in LM_SWEEP_LEFT_OUT]


def rows(task: str, setting: str) -> dict[str, dict]:
    path = RESULTS / f"quality_{task}.json"
    store = json.loads(path.read_text()) if path.exists() else {}
    runs = store.get(setting, {})
    return aggregate(task, runs) if runs else {}


def _quality(task: str, r: dict, zero: dict | None, lora: dict | None) -> str:
    cell = f"{r['final_mean']:.3f}" + (f" ± {r['final_std']:.3f}" if r["seeds"] > 1 else "")
    if task == "lm" and zero and lora and r is not zero:
        share = math.log(zero["final_mean"] / r["final_mean"]) / math.log(zero["final_mean"] / lora["final_mean"])
        cell += f" ({share:.0%} of LoRA's log-ppl gain)"
    return cell


def table(task: str, setting: str, names: list[str]) -> list[str]:
    found = rows(task, setting)
    zero = rows(task, MAIN).get("zero-shot")
    lora = found.get("lora")
    lines = [
        f"| configuration | {METRIC[task]} | seeds | trainable | s/epoch | peak RSS | calibration |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        if name not in found:
            continue
        r = found[name]
        calibration = _calibration(task, setting, name)
        lines.append(
            f"| {name}: {CONFIGS[name][0]} | {_quality(task, r, zero, lora)} | {r['seeds']} "
            f"| {r['trainable_params']:,} | {r['epoch_seconds']:.0f} | {r['peak_rss_mb'] / 1024:.2f} GB "
            f"| {calibration} |"
        )
    return lines


def _calibration(task: str, setting: str, name: str) -> str:
    store = json.loads((RESULTS / f"quality_{task}.json").read_text())
    seconds = [s["calibration_seconds"] for s in store[setting][name].values() if s.get("calibration_seconds")]
    return f"{sum(seconds) / len(seconds):.0f} s" if seconds else "—"


def plot(path: Path) -> None:
    from pac.report import pyplot, save

    panels = [("classify", MAIN), ("lm", MAIN), ("classify", SWEEP), ("lm", SWEEP)]
    fig, axes = pyplot().subplots(2, 2, figsize=(14, 10))
    for ax, (task, setting) in zip(axes.flat, panels, strict=True):
        for name, r in rows(task, setting).items():
            if r["trainable_params"] == 0:
                ax.axhline(r["final_mean"], color="grey", linestyle=":", label=f"{name}")
                continue
            marker = "s" if name.startswith("taskedge") else "o"
            ax.errorbar(r["trainable_params"], r["final_mean"], yerr=r["final_std"], fmt=marker, capsize=3)
            ax.annotate(
                name, (r["trainable_params"], r["final_mean"]), textcoords="offset points", xytext=(4, 3), fontsize=7
            )
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel("validation accuracy" if task == "classify" else "validation perplexity (lower is better)")
        ax.set_title(f"{task}, {setting}")
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M-Instruct, BBC News: quality against trainable parameters (squares: TaskEdge)")
    save(fig, path, dpi=110)


def report() -> str:
    taskedge_main = [n for n in CONFIGS if n.startswith("taskedge")]
    parts = []
    for task in ("classify", "lm"):
        parts += [f"### {task}, {MAIN} (the harness's main setting)", "", *table(task, MAIN, SHOWN + taskedge_main), ""]
    for task in ("classify", "lm"):
        parts += [f"### {task}, {SWEEP}: budgets, selections and variants (seed 0)", ""]
        parts += [*table(task, SWEEP, sweep_runs(task)), ""]
    parts += [
        "TaskEdge's rows were run one thread per process, two or more processes at once on two cores (issue 23's "
        "session): their s/epoch and calibration times are not comparable with the two-thread rows run alone "
        "(LoRA's, the side network's). The step times of the memory table below were measured side by side.",
        "",
    ]
    memory = RESULTS / "step_memory.md"
    if memory.exists():
        parts += ["### Peak memory and step time at one batch (benchmarks/step_memory.py)", "", memory.read_text()]
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    if not parser.parse_args().report:
        run_missing()
    text = report()
    (RESULTS / "taskedge.md").write_text(text)
    plot(RESULTS / "taskedge.png")
    print(text)


if __name__ == "__main__":
    main()
