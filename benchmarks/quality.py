"""Quality harness: parallel adapters vs the baselines, lever by lever, on one fixed split.

Every configuration is a list of `pac train` options run in its own process (so time and peak
memory are its own) on the same split (stratified, --split-seed 0), for several training seeds.
Both tasks use SmolLM2-135M-Instruct on BBC News at 128 tokens:
  classify  5-way topic classification, validation accuracy
  lm        language modelling of held-out articles, validation perplexity

    python benchmarks/quality.py --task lm --configs zero-shot side lora --seeds 0 1 2
    python benchmarks/quality.py --task classify            # every configuration of the task
    python benchmarks/quality.py --task lm --report          # table and plot from what is recorded
    python benchmarks/quality.py --task classify --train-size 100 --configs side lora   # a learning-curve point

Runs with other training-set sizes (same validation set) make a learning curve,
quality_<task>_learning_curve.{md,png}, for every configuration run at two sizes or more; their own table
is printed, and the files below keep the main setting's (400 / 400 / 3 epochs).

Results accumulate in benchmarks/results/quality_<task>.json (a run already recorded is not run
again), with a markdown table quality_<task>.md and a plot quality_<task>.png of quality against
training time (one point per configuration, mean of seeds, bars = one standard deviation).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".work" / "quality"

# name -> (description, `pac train` options). Shared by both tasks unless a task leaves it out.
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "zero-shot": ("untrained model: label likelihood / perplexity (`pac eval --zero-shot`)", []),
    "probe": ("linear probe on pooled final-norm h_L", ["--no-side-network", "--lr", "3e-3"]),
    "head+norm": ("head + final norm only", ["--no-side-network", "--train-final-norm", "--lr", "3e-3"]),
    "lora": ("LoRA r=8 (peft), q,k,v,o,gate,up,down", ["--method", "lora"]),
    "side": ("naive side network: r=8, random init, sum read-out, every layer tapped", []),
    "side-pruned": ("side blocks from the pruned backbone", ["--side-init", "pruned"]),
    "side-tapnorm": ("taps scaled to unit RMS", ["--tap-norm"]),
    "side-pruned-tapnorm": ("pruned init + tap norm", ["--side-init", "pruned", "--tap-norm"]),
    "side-last": ("last-token read-out", ["--pooling", "last"]),
    "side-readout-side": ("head reads the side output alone, not h_L + side", ["--readout", "side"]),
    "side-final-norm": ("side network + trainable final norm", ["--train-final-norm"]),
    "side-vocab-bias": ("side network + vocab logit bias", ["--vocab-bias"]),
    "side-reg": ("dropout 0.1 + weight decay 0.01", ["--dropout", "0.1", "--weight-decay", "0.01"]),
    "side-early": ("early stopping: patience 1 on a 10% holdout of the training set", ["--early-stopping", "1"]),
    "side-r4": ("width d/4", ["--reduction", "4"]),
    "side-r16": ("width d/16", ["--reduction", "16"]),
    "side-tap2": ("every 2nd layer tapped", ["--tap-every", "2"]),
    "side-tap3": ("every 3rd layer tapped", ["--tap-every", "3"]),
    "side-last-half": ("only the last half of the layers tapped (15-30)", ["--taps", "15-30"]),
    "side-gate-t1": ("gate temperature 1 (gates move 10x slower)", ["--gate-temperature", "1"]),
    "side-lr-high": ("3x the default learning rate", ["--lr-scale", "3"]),
    "side-heads3": ("3 attention heads of 24 dims (not 9 of 8)", ["--side-heads", "3"]),
    "side-readout576": ("+ read-out MLP of [s; final_norm(h_L)], 576 hidden", ["--readout-hidden", "576"]),
    "side-r4-readout576": (
        "the two best LM levers together: width d/4 + read-out MLP (576)",
        ["--reduction", "4", "--readout-hidden", "576"],
    ),
    "side-readout576-lr-high": ("read-out MLP (576) + 3x LR", ["--readout-hidden", "576", "--lr-scale", "3"]),
    "readout576": (
        "read-out MLP of final_norm(h_L) alone, no side network",
        ["--no-side-network", "--readout-hidden", "576"],
    ),
    # A memory of the training tokens mixed in after training (kNN-LM over the cache's last tap).
    "side-retrieval": ("naive side network + retrieval from the cache: the LM default", ["--retrieval"]),
    "side-readout576-retrieval": (
        "read-out MLP (576) + retrieval from the cache",
        ["--readout-hidden", "576", "--retrieval"],
    ),
    # Training on per-token shortlists of the frozen head's likeliest words (pac.models.shortlist); evaluation
    # still scores the whole vocabulary.
    "side-shortlist64": ("side network trained on shortlists of 64 words", ["--shortlist", "64"]),
    "side-shortlist256": ("side network trained on shortlists of 256 words", ["--shortlist", "256"]),
    "side-shortlist1024": ("side network trained on shortlists of 1024 words", ["--shortlist", "1024"]),
    "side-retrieval-shortlist256": (
        "shortlists of 256 words + retrieval from the cache",
        ["--shortlist", "256", "--retrieval"],
    ),
    "side-bs4": ("batch 4 (twice the steps)", ["--batch-size", "4"]),
    # Mixed precision, for both sides of the comparison: bf16 products in the training steps.
    "side-bf16": ("bf16 training steps (`--precision bf16`)", ["--precision", "bf16"]),
    "lora-bf16": ("LoRA r=8 with bf16 training steps", ["--method", "lora", "--precision", "bf16"]),
    # The best single levers on LM (1 seed each: r=4, 3x LR, pruned init), together.
    "side-combo": ("r=4 + 3x LR + pruned init", ["--reduction", "4", "--lr-scale", "3", "--side-init", "pruned"]),
    "boundary-15": ("cache h_15, LoRA r=8 on layers 15-29", ["--method", "boundary", "--boundary-layer", "15"]),
    "boundary-20": ("cache h_20, LoRA r=8 on layers 20-29", ["--method", "boundary", "--boundary-layer", "20"]),
    "boundary-27": ("cache h_27, LoRA r=8 on layers 27-29", ["--method", "boundary", "--boundary-layer", "27"]),
    # The boundary variant with a side network (r=8, at the side network's LR) beside the top layers.
    "boundary-15-side": (
        "boundary-15 + side network r=8 over layers 15-29",
        ["--method", "boundary", "--boundary-layer", "15", "--boundary-side"],
    ),
    "boundary-20-side": (
        "boundary-20 + side network r=8 over layers 20-29",
        ["--method", "boundary", "--boundary-layer", "20", "--boundary-side"],
    ),
    "boundary-20-below": (
        "cache h_0..h_20; a side network over them adds to h_20; LoRA r=8 on layers 20-29",
        ["--method", "boundary", "--boundary-layer", "20", "--boundary-side-below"],
    ),
    "boundary-20-below-frozen": (
        "the same with layers 20-29 frozen (no LoRA): only the side network trains",
        ["--method", "boundary", "--boundary-layer", "20", "--boundary-side-below", "--lora-r", "0"],
    ),
    "boundary-27-below-frozen": (
        "cache h_0..h_27; a side network over them adds to h_27; layers 27-29 frozen",
        ["--method", "boundary", "--boundary-layer", "27", "--boundary-side-below", "--lora-r", "0"],
    ),
    "pac-default": ("`--method parallel-adapters` as shipped (its per-task defaults)", []),
    # TaskEdge (issue 23): sparse fine-tuning of a fraction of the backbone's weights, at its default rate (2e-3).
    "taskedge": ("TaskEdge 0.1%: top abs(W)·‖X‖ entries of every output neuron", ["--method", "taskedge"]),
    "taskedge-lr5e-4": ("TaskEdge 0.1% at LoRA's learning rate (5e-4)", ["--method", "taskedge", "--lr", "5e-4"]),
    "taskedge-0.01": ("TaskEdge 0.01%", ["--method", "taskedge", "--budget-percent", "0.01"]),
    "taskedge-1": ("TaskEdge 1%", ["--method", "taskedge", "--budget-percent", "1"]),
    "taskedge-global": ("0.1%, the same scores, global top-k", ["--method", "taskedge", "--selection", "global"]),
    "taskedge-magnitude": ("0.1%, abs(W) per output neuron", ["--method", "taskedge", "--selection", "magnitude"]),
    "taskedge-random": ("0.1%, random entries per output neuron", ["--method", "taskedge", "--selection", "random"]),
    "taskedge-nm24": ("TaskEdge 0.1% in a 2:4 pattern", ["--method", "taskedge", "--nm", "2:4"]),
    # At 0.1% a row keeps about one entry, which no 2:4 block refuses: at 1% (about 9 a row) the pattern binds.
    "taskedge-1-nm24": (
        "TaskEdge 1% in a 2:4 pattern",
        ["--method", "taskedge", "--budget-percent", "1", "--nm", "2:4"],
    ),
    "taskedge-sparse-lora": (
        "sparse LoRA r=8: B·A read only at TaskEdge's 0.1%",
        ["--method", "taskedge", "--sparse-lora-r", "8"],
    ),
}
# Every parallel-adapters configuration but pac-default (the side-* levers, and the baselines probe, head+norm
# and readout576) starts from the same naive side network, pinned here so that changing pac's defaults never
# changes what a recorded configuration means: without it, an LM baseline would pick up the LM default's
# memory of the training tokens and its shortlists.
NAIVE_SIDE = [
    "--reduction",
    "8",
    "--side-init",
    "random",
    "--readout-hidden",
    "0",
    "--no-retrieval",
    "--shortlist",
    "0",
]
NAIVE_LR = {"classify": 3e-3, "lm": 1e-3}
TASK_ONLY = {
    "classify": {"probe", "side-last", "side-readout-side"},
    "lm": {
        "side-vocab-bias",
        "side-retrieval",
        "side-readout576-retrieval",
        "side-shortlist64",
        "side-shortlist256",
        "side-shortlist1024",
        "side-retrieval-shortlist256",
    },
}
METRIC = {"classify": "val_accuracy", "lm": "val_perplexity"}


def configs_for(task: str) -> list[str]:
    other = "lm" if task == "classify" else "classify"
    return [name for name in CONFIGS if name not in TASK_ONLY[other]]


def train_args(task: str, name: str, args: argparse.Namespace) -> list[str]:
    options = list(CONFIGS[name][1])
    if name != "pac-default" and "--method" not in options:  # later flags override the pinned base
        scale = 1.0
        if "--lr-scale" in options:
            scale = float(options.pop(options.index("--lr-scale") + 1))
            options.remove("--lr-scale")
        options = [*NAIVE_SIDE, "--lr", str(NAIVE_LR[task] * scale), *options]
    return [
        "--task",
        task,
        "--train-size",
        str(args.train_size),
        "--val-size",
        str(args.val_size),
        "--max-length",
        "128",
        "--epochs",
        str(args.epochs),
        "--split-seed",
        "0",
        "--cache-dir",
        str(WORK / "cache"),
        *options,
    ]


def run_zero_shot(task: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pac.cli",
        "eval",
        "--zero-shot",
        "--task",
        task,
        "--train-size",
        str(args.train_size),
        "--val-size",
        str(args.val_size),
        "--max-length",
        "128",
        "--split-seed",
        "0",
    ]
    print("$", " ".join(cmd[2:]), flush=True)
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    metric = METRIC[task]
    return {
        "epochs": [{"epoch": 0, metric: result[metric.removeprefix("val_")]}],
        "peak_rss_mb": result["peak_rss_mb"],
        "trainable_params": 0,
        "wall_seconds": result["seconds"],
    }


def setting_key(args: argparse.Namespace) -> str:
    """What a run's figures are filed under; its adapter lands under it too, so sizes never overwrite."""
    return f"train{args.train_size}-val{args.val_size}-epochs{args.epochs}"


def run(task: str, name: str, seed: int, args: argparse.Namespace) -> dict:
    if name == "zero-shot":
        return run_zero_shot(task, args)
    out = WORK / task / setting_key(args) / name / f"seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "pac.cli",
        "train",
        "--out",
        str(out),
        "--seed",
        str(seed),
        *train_args(task, name, args),
    ]
    print("$", " ".join(cmd[2:]), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    summary = json.loads((out / "summary.json").read_text())
    return {
        "epochs": summary["epochs"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "training_peak_rss_mb": summary.get("training_peak_rss_mb"),
        "trainable_params": summary["trainable_params"],
        "cache_bytes_per_sample": summary.get("cache_bytes_per_sample"),
        "best_epoch": summary.get("best_epoch"),
        "retrieval": summary.get("retrieval"),
        "shortlist": summary.get("shortlist"),
        "calibration_seconds": summary.get("calibration_seconds"),
        "selected_weights": summary.get("selected_weights"),
        "wall_seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------- report
def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1))


def final(run: dict, metric: str) -> float:
    """The metric of what the run saved: the last epoch, or the epoch early stopping kept; with a memory of
    the training tokens, the mixture's."""
    if run.get("retrieval"):
        return run["retrieval"][metric]
    kept = run.get("best_epoch")
    return next(e for e in run["epochs"] if e["epoch"] == kept)[metric] if kept else run["epochs"][-1][metric]


def _shortlist_builds(seeds: list[dict]) -> list[float]:
    return [s["shortlist"]["seconds"] for s in seeds if (s.get("shortlist") or {}).get("built_files")]


def aggregate(task: str, runs: dict[str, dict]) -> dict[str, dict]:
    metric = METRIC[task]
    rows = {}
    for name, by_seed in runs.items():
        seeds = list(by_seed.values())
        finals = [final(s, metric) for s in seeds]
        ran = min(len(s["epochs"]) for s in seeds)
        trained = [e for s in seeds for e in s["epochs"] if e["epoch"] > 0]
        rows[name] = {
            "final_mean": _mean(finals),
            "final_std": _std(finals) if len(finals) > 1 else 0.0,
            "seeds": len(seeds),
            # Early stopping may end seeds at different epochs: the curve covers the epochs all seeds ran.
            "curve": [_mean([s["epochs"][i][metric] for s in seeds]) for i in range(ran)],
            # Median: one epoch slowed by another job on the machine does not move it.
            "epoch_seconds": statistics.median(e["epoch_seconds"] for e in trained) if trained else 0.0,
            "train_seconds": _mean([sum(e.get("epoch_seconds", 0) for e in s["epochs"]) for s in seeds]),
            # Median: the seed that built the shared cache also counts phase 1 in its process's peak.
            "peak_rss_mb": statistics.median(s["peak_rss_mb"] for s in seeds),
            # Parallel adapters: the peak up to the end of training, before the memory of the training tokens.
            "training_peak_rss_mb": statistics.median(peaks)
            if all(peaks := [s.get("training_peak_rss_mb") for s in seeds])
            else None,
            "trainable_params": seeds[0]["trainable_params"],
            "retrieval_seconds": _mean([s["retrieval"]["seconds"] for s in seeds]) if seeds[0].get("retrieval") else 0,
            # Shortlists are built once per cache: later seeds reuse them, so only the seeds that built count.
            "shortlist_seconds": _mean(built) if (built := _shortlist_builds(seeds)) else 0,
        }
    return rows


def _rows_in_config_order(task: str, runs: dict[str, dict]) -> dict[str, dict]:
    order = list(CONFIGS)
    rows = aggregate(task, runs)
    return dict(sorted(rows.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _share_of_lora_gain(zero: dict | None, lora: dict | None, row: dict) -> float | None:
    """LM: the row's share of LoRA's log-perplexity reduction from zero-shot; None unless both ends are recorded
    (not so at every training-set size)."""
    if not (zero and lora):
        return None
    return math.log(zero["final_mean"] / row["final_mean"]) / math.log(zero["final_mean"] / lora["final_mean"])


def report(task: str, runs: dict[str, dict]) -> str:
    rows = _rows_in_config_order(task, runs)
    metric = METRIC[task]
    lines = [
        f"| configuration | {metric} (final, mean ± sd) | per epoch | time per epoch (median) | peak RSS | trainable |",
        "|---|---|---|---|---|---|",
    ]
    zero, lora = rows.get("zero-shot"), rows.get("lora")
    for name, r in rows.items():
        cell = f"{r['final_mean']:.4f} ± {r['final_std']:.4f} ({r['seeds']} seeds)"
        gain = _share_of_lora_gain(zero, lora, r) if task == "lm" and name != "zero-shot" else None
        if gain is not None:
            cell += f", {gain:.0%} of LoRA's log-ppl reduction"
        curve = " / ".join(f"{v:.3f}" for v in r["curve"])
        lines.append(
            f"| {name}: {CONFIGS.get(name, (name,))[0]} | {cell} | {curve} | {r['epoch_seconds']:.1f} s "
            f"| {r['peak_rss_mb'] / 1024:.2f} GB | {r['trainable_params']:,} |"
        )
    lines += [
        "",
        "Peak RSS is that of the whole `pac train` process (median over seeds): for a run that built the cache "
        "it includes phase 1.",
    ]
    if lora and lora["epoch_seconds"]:
        lines.append("")
        for name, r in rows.items():
            if name.startswith("side") and r["epoch_seconds"]:
                # bf16 against bf16: the same precision on both sides of a ratio
                bf16 = name.endswith("-bf16") and "lora-bf16" in rows
                ref, ref_label = (rows["lora-bf16"], "LoRA bf16") if bf16 else (lora, "LoRA")
                once = "".join(
                    f"; {what} adds {r[f'{what}_seconds']:.0f} s once"
                    for what in ("shortlist", "retrieval")
                    if r[f"{what}_seconds"]
                )
                if r["retrieval_seconds"] and r["training_peak_rss_mb"]:
                    once += f"; up to the end of training {r['training_peak_rss_mb'] / ref['peak_rss_mb']:.0%}"
                lines.append(
                    f"- {name}: epoch {ref['epoch_seconds'] / r['epoch_seconds']:.1f}x faster than {ref_label}'s, "
                    f"peak RSS {r['peak_rss_mb'] / ref['peak_rss_mb']:.0%} of {ref_label}'s{once}"
                )
    return "\n".join(lines) + "\n"


def compact(task: str, runs: dict[str, dict]) -> str:
    """The README's table: one line per configuration, rounded (the full one is `report`)."""
    rows = _rows_in_config_order(task, runs)
    zero, lora = rows.get("zero-shot"), rows.get("lora")
    if task == "lm":
        lines = ["| configuration | perplexity | of LoRA's log-ppl reduction | seeds | s/epoch | peak RSS |"]
        rows.pop("zero-shot", None)
    else:
        lines = ["| configuration | accuracy | seeds | s/epoch | peak RSS |"]
    lines.append("|" + "---|" * (lines[0].count("|") - 1))
    for name, r in rows.items():
        value = f"{r['final_mean']:.3f}" + (f" ± {r['final_std']:.3f}" if r["seeds"] > 1 else "")
        cells = [name, value]
        if task == "lm":
            gain = _share_of_lora_gain(zero, lora, r)
            cells.append("—" if gain is None else f"{gain:.0%}")
        seconds = "—" if name == "zero-shot" else f"{r['epoch_seconds']:.0f}"
        cells += [str(r["seeds"]), seconds, f"{r['peak_rss_mb'] / 1024:.2f} GB"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(task: str, runs: dict[str, dict], path: Path) -> None:
    from pac.report import pyplot, save

    rows = aggregate(task, runs)
    fig, ax = pyplot().subplots(figsize=(8, 5))
    for name, r in rows.items():
        ax.errorbar(max(r["train_seconds"], 1.0), r["final_mean"], yerr=r["final_std"], fmt="o", capsize=3)
        ax.annotate(
            name, (max(r["train_seconds"], 1.0), r["final_mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax.set_xscale("log")
    ax.set_xlabel("training time, all epochs (s, log scale)")
    ax.set_ylabel("validation accuracy" if task == "classify" else "validation perplexity (lower is better)")
    ax.set_title(f"SmolLM2-135M-Instruct, BBC News, {task}: quality vs training time")
    ax.grid(alpha=0.3)
    save(fig, path)


def learning_curve(task: str, store: dict[str, dict], val_size: int, epochs: int) -> dict[str, dict[int, dict]]:
    """config -> train size -> aggregated row, over the settings that differ only in training size."""
    curves: dict[str, dict[int, dict]] = {}
    for key, runs in store.items():
        size, val, ep = map(int, re.fullmatch(r"train(\d+)-val(\d+)-epochs(\d+)", key).groups())
        if (val, ep) == (val_size, epochs):
            for name, row in aggregate(task, runs).items():
                curves.setdefault(name, {})[size] = row
    return {name: dict(sorted(c.items())) for name, c in curves.items() if len(c) > 1}


def write_learning_curve(task: str, curves: dict[str, dict[int, dict]], stem: Path) -> None:
    from pac.report import lines, pyplot, save

    metric = METRIC[task]
    table = [f"| configuration | training articles | {metric} (mean ± sd) | time per epoch |", "|---|---|---|---|"]
    for name, by_size in curves.items():
        for size, r in by_size.items():
            table.append(
                f"| {name} | {size} | {r['final_mean']:.4f} ± {r['final_std']:.4f} ({r['seeds']} seeds) "
                f"| {r['epoch_seconds']:.1f} s |"
            )
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    means = {name: (list(by_size), [r["final_mean"] for r in by_size.values()]) for name, by_size in curves.items()}
    sds = {name: [r["final_std"] for r in by_size.values()] for name, by_size in curves.items()}
    lines(ax, means, sds, xlabel="training articles (log scale)", ylabel=metric, log_x=True)
    save(fig, stem.with_suffix(".png"))
    stem.with_suffix(".md").write_text("\n".join(table) + "\n")


def record(path: Path, key: str, name: str, seed: int, result: dict) -> dict:
    """Add one finished run to the results file, re-read under a lock: harnesses running side by side (one
    thread each) keep each other's runs."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store = json.loads(path.read_text()) if path.exists() else {}
        store.setdefault(key, {}).setdefault(name, {})[str(seed)] = result
        path.write_text(json.dumps(store, indent=2) + "\n")
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["classify", "lm"], required=True)
    parser.add_argument("--configs", nargs="+", help=f"subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=400)
    parser.add_argument("--val-size", type=int, default=400)
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"quality_{args.task}.json"
    store = json.loads(path.read_text()) if path.exists() else {}
    key = setting_key(args)
    runs = store.setdefault(key, {})
    if not args.report:
        for name in args.configs or configs_for(args.task):
            for seed in [0] if name == "zero-shot" else args.seeds:
                if str(seed) in runs.get(name, {}):
                    continue
                runs.setdefault(name, {})[str(seed)] = result = run(args.task, name, seed, args)
                store = record(path, key, name, seed, result)
                runs = store[key]
    table = report(args.task, runs)
    print(table)
    # The tables and plot are the main setting's; a run at another size (a learning-curve point) only prints its
    # own table and joins the learning curve, so it never overwrites them.
    if key == setting_key(parser.parse_args(["--task", args.task])):  # the defaults' setting
        (RESULTS / f"quality_{args.task}.md").write_text(f"Setting: {key}, split seed 0, 128 tokens.\n\n{table}")
        (RESULTS / f"quality_{args.task}_compact.md").write_text(compact(args.task, runs))
        plot(args.task, runs, RESULTS / f"quality_{args.task}.png")
    curves = learning_curve(args.task, store, args.val_size, args.epochs)
    if curves:
        write_learning_curve(args.task, curves, RESULTS / f"quality_{args.task}_learning_curve")


if __name__ == "__main__":
    main()
