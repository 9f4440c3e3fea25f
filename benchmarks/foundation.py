"""Foundation figures: parallel adapters vs LoRA vs zero-shot on SmolLM2-135M-Instruct / BBC News.

Fixed stratified split (seed 0): 400 training / 200 validation articles, 128 tokens, 3 epochs.
Every configuration runs in its own process so that its peak RSS is its own: phase 1 (the cache build
alone: `pac train`'s options with zero epochs, through pac.workflow) and phase 2 (training from the
finished cache) are measured apart.

    python benchmarks/foundation.py                # everything (~30 min on 2 cores)
    python benchmarks/foundation.py --only pa      # one part: zero-shot | pa | int8 | lora

Writes benchmarks/results/foundation.json and foundation.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".work"  # caches and adapters of the runs (git-ignored)


def run_pac(name: str, *args: str, cache_only: bool = False) -> dict:
    """`pac train` in a fresh process (or, cache_only, its phase 1 alone); returns its summary.json (with its
    own peak RSS)."""
    out = WORK / name
    shutil.rmtree(out, ignore_errors=True)
    entry = [__file__, "--cache-only"] if cache_only else ["-m", "pac.cli", "train"]
    cmd = [sys.executable, *entry, "--out", str(out), *args]
    print("$", " ".join(cmd[2:]), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - started
    return summary


def zero_shot() -> dict:
    """`pac eval --zero-shot`: label likelihood on the same validation split."""
    cmd = [sys.executable, "-m", "pac.cli", "eval", "--zero-shot"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out)
    return {
        "val_accuracy": result["accuracy"],
        "seconds_per_sample": result["seconds"] / result["samples"],
        "peak_rss_mb": result["peak_rss_mb"],
    }


def parallel_adapters(dtype: str, seeds: list[int]) -> dict:
    cache = WORK / f"cache-{dtype}"
    shutil.rmtree(cache, ignore_errors=True)
    common = ["--cache-dir", str(cache), "--cache-dtype", dtype]  # the split is always seed 0
    build = run_pac(f"pa-{dtype}-build", *common, cache_only=True)
    runs = [run_pac(f"pa-{dtype}-seed{s}", *common, "--seed", str(s)) for s in seeds]
    return {"cache_build": build, "runs": runs}


def lora(seeds: list[int]) -> dict:
    return {"runs": [run_pac(f"lora-seed{s}", "--method", "lora", "--seed", str(s)) for s in seeds]}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def std(xs: list[float]) -> float:
    m = mean(xs)
    return (sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)) ** 0.5


def accuracy_cell(runs: list[dict]) -> str:
    per_epoch = [[e["val_accuracy"] for e in r["epochs"]] for r in runs]
    curve = " / ".join(f"{mean([p[i] for p in per_epoch]):.3f}" for i in range(len(per_epoch[0])))
    finals = [p[-1] for p in per_epoch]
    spread = f" ± {std(finals):.3f}" if len(finals) > 1 else ""
    return f"{curve} (final {mean(finals):.3f}{spread}, {len(runs)} seed{'s' if len(runs) > 1 else ''})"


def epoch_seconds(runs: list[dict]) -> float:
    return mean([e["epoch_seconds"] for r in runs for e in r["epochs"]])


def markdown(results: dict) -> str:
    lines = [
        "| method | val accuracy, epoch 1 / 2 / 3 | time per epoch | peak RSS | trainable |",
        "|---|---|---|---|---|",
    ]
    if zs := results.get("zero-shot"):
        lines.append(
            f"| zero-shot, label likelihood | {zs['val_accuracy']:.3f} | {zs['seconds_per_sample']:.2f} s/sample "
            f"| {zs['peak_rss_mb'] / 1024:.2f} GB | 0 |"
        )
    for key, label in (("pa-fp16", "parallel adapters, fp16 cache"), ("pa-int8", "parallel adapters, int8 cache")):
        if r := results.get(key):
            runs = r["runs"]
            lines.append(
                f"| {label} | {accuracy_cell(runs)} | {epoch_seconds(runs):.1f} s "
                f"| {max(x['peak_rss_mb'] for x in runs) / 1024:.2f} GB (phase 2) | {runs[0]['trainable_params']:,} |"
            )
    if r := results.get("lora"):
        runs = r["runs"]
        lines.append(
            f"| LoRA r=8 (peft), q,k,v,o,gate,up,down + head | {accuracy_cell(runs)} | {epoch_seconds(runs):.1f} s "
            f"| {max(x['peak_rss_mb'] for x in runs) / 1024:.2f} GB | {runs[0]['trainable_params']:,} |"
        )
    lines += [
        "",
        "| cache | build time (400 train + 200 val) | bytes per sample | phase-1 peak RSS |",
        "|---|---|---|---|",
    ]
    for key in ("pa-fp16", "pa-int8"):
        if r := results.get(key):
            b = r["cache_build"]
            lines.append(
                f"| {b['cache_dtype']} | {sum(b['cache_build_seconds'].values()):.1f} s "
                f"({sum(b['cache_build_seconds'].values()) / 600:.3f} s/sample) "
                f"| {b['cache_bytes_per_sample'] / 1e6:.2f} MB | {b['peak_rss_mb'] / 1024:.2f} GB |"
            )
    if "lora" in results and "pa-fp16" in results:
        pa, lo = results["pa-fp16"]["runs"], results["lora"]["runs"]
        pa_rss, lo_rss = max(x["peak_rss_mb"] for x in pa), max(x["peak_rss_mb"] for x in lo)
        gap = mean([r["epochs"][-1]["val_accuracy"] for r in pa]) - mean([r["epochs"][-1]["val_accuracy"] for r in lo])
        lines += [
            "",
            f"- cached epoch vs LoRA epoch: **{epoch_seconds(lo) / epoch_seconds(pa):.1f}x faster** (target >= 10x)",
            f"- phase-2 peak RSS vs LoRA: **{pa_rss / lo_rss:.1%}** (target < 25%)",
            f"- final accuracy, parallel adapters - LoRA: **{gap:+.3f}** (target: within 0.01)",
        ]
    return "\n".join(lines) + "\n"


def cache_only(argv: list[str]) -> None:
    """Phase 1 of `pac train ARGV` alone: the cache build and the untrained starting point (zero epochs, which
    the command itself refuses)."""
    from dataclasses import replace

    from pac.cli import build_parser, train_options
    from pac.workflow import train

    train(replace(train_options(build_parser().parse_args(["train", *argv])), epochs=0))


def main() -> None:
    if sys.argv[1:2] == ["--cache-only"]:
        return cache_only(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["zero-shot", "pa", "int8", "lora"], action="append")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the side-network runs")
    parser.add_argument("--lora-seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "foundation.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    parts = args.only or ["zero-shot", "pa", "int8", "lora"]
    for part in parts:
        if part == "zero-shot":
            results["zero-shot"] = zero_shot()
        elif part == "pa":
            results["pa-fp16"] = parallel_adapters("fp16", args.seeds)
        elif part == "int8":
            results["pa-int8"] = parallel_adapters("int8", args.seeds[:1])
        elif part == "lora":
            results["lora"] = lora(args.lora_seeds)
        path.write_text(json.dumps(results, indent=2) + "\n")  # keep what is done if a later part fails
        (RESULTS / "foundation.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
