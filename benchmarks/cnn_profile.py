"""What one training step costs per method on MobileNetV2 and ResNet-18 (issue 25): `pac profile`'s FLOPs and memory
by category, checked against a real training process, and the adapters' size against their layers' by layer type.

For each network, at batch 32 on 32-pixel images (the digits runs of benchmarks/cnn_peft.py), every method is profiled
by pac.runtime.step_profile (a fresh process each: two MemTracker steps and a FlopCounterMode step on a synthetic
batch), then measured (a fresh process each: 4 real training steps on digits 0-4, read as `pac train` reads them);
LoRA is profiled twice on MobileNetV2: depthwise layers frozen (pac's default) and with LoRA (`--depthwise lora`, at
peft's rank, a multiple of the channels). A rank sweep (no training) counts LoRA's parameters against the layers'
own, depthwise and standard/pointwise apart. The same prediction check runs on the bundled SmolLM2-135M.

    python benchmarks/cnn_profile.py [--report]
Writes benchmarks/results/cnn_profile.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NETWORKS = ["mobilenet_v2", "resnet18"]
METHODS = ["full", "galore", "lora", "dora", "head-bn"]
BATCH = 32
RANKS = [1, 2, 4, 8, 16]


def runs(network: str, checkpoint: Path) -> list[tuple[str, object]]:
    from pac.runconfig import DataOptions, OptimOptions, TrainOptions
    from pac.runtime.step_profile import with_method

    base = TrainOptions(
        model=f"{network}:{checkpoint}",
        data=DataOptions(task="image-classify", data="digits:pretrain"),
        optim=OptimOptions(batch_size=BATCH),
    )
    chosen = [(m, with_method(base, m, {})) for m in METHODS]
    if network == "mobilenet_v2":
        chosen.append(("lora, depthwise too", with_method(base, "lora", {"depthwise": "lora"})))
    return chosen


def measure(network: str, scratch: Path) -> list[dict]:
    from pac.models.vision import build_network
    from pac.runtime.step_profile import in_fresh_process, measured_training_steps, profile_in_this_process

    checkpoint = scratch / f"{network}.pth"  # costs do not depend on the weights' values: fresh ones, saved
    torch.save(build_network(network, 5).state_dict(), checkpoint)
    profiles = []
    for label, opts in runs(network, checkpoint):
        profile = in_fresh_process(profile_in_this_process, opts)
        measured = in_fresh_process(measured_training_steps, opts)
        profile.update(method=label, model=network, measured_peak_rss_mb=measured["peak_rss_mb"])
        print(
            label,
            network,
            f"predicted {profile['predicted_peak_rss_mb']:.0f} MB, measured {measured['peak_rss_mb']:.0f}",
        )
        profiles.append(profile)
    return profiles


def language_model_check() -> list[dict]:
    """The same prediction check on the bundled SmolLM2-135M (classification, batch 4 x 64 tokens)."""
    from pac.runconfig import DataOptions, OptimOptions, TrainOptions
    from pac.runtime.step_profile import in_fresh_process, measured_training_steps, profile_in_this_process, with_method

    base = TrainOptions(data=DataOptions(task="classify", max_length=64), optim=OptimOptions(batch_size=4))
    rows = []
    for method in ("full", "galore", "lora", "taskedge", "zo"):
        opts = with_method(base, method, {})
        profile = in_fresh_process(profile_in_this_process, opts)
        profile["measured_peak_rss_mb"] = in_fresh_process(measured_training_steps, opts)["peak_rss_mb"]
        rows.append(profile)
    return rows


def rank_sweep(network: str, scratch: Path) -> list[dict]:
    """LoRA's trainable parameters per layer type at each rank, depthwise layers included, against the layers'."""
    from pac.methods.vision_model import VisionModel, VisionSettings
    from pac.models.vision import parse_network
    from pac.runtime.step_profile import parameters_by_layer_type

    spec, labels = parse_network(f"{network}:{scratch / f'{network}.pth'}"), [str(i) for i in range(5)]
    rows = []
    for rank in RANKS:
        model = VisionModel(spec, labels, VisionSettings("lora", r=rank, depthwise="lora"))
        for kind, counts in parameters_by_layer_type(model).items():
            if kind in ("depthwise", "pointwise", "standard conv"):
                rows.append({"network": network, "rank": rank, "layer_type": kind, **counts})
    return rows


def _checks(profiles: list[dict]) -> str:
    return "Predicted / measured peak: " + " | ".join(
        f"{p['method']} {p['predicted_peak_rss_mb']:.0f}/{p['measured_peak_rss_mb']:.0f} MB "
        f"({p['predicted_peak_rss_mb'] / p['measured_peak_rss_mb'] - 1:+.0%})"
        for p in profiles
    )


def report(results: dict) -> None:
    from pac.runtime.step_profile import layer_type_table, plot_profiles, profile_table

    lines = [
        "# One training step per method on edge CNNs (batch 32, 32-pixel images)",
        "",
        "`pac profile` (FLOPs by FlopCounterMode, memory by MemTracker, each method in a fresh process) beside a real",
        "training process's peak (4 steps on digits). Regenerate: `python benchmarks/cnn_profile.py`.",
    ]
    for network, profiles in results["profiles"].items():
        lines += ["", f"## {network}", "", profile_table(profiles), "", _checks(profiles), ""]
        lines += [layer_type_table(profiles)]
        plot_profiles(profiles, RESULTS / f"cnn_profile_{network}.png", f"{network}, image-classify, batch {BATCH}")
    lm = results["language_model"]
    lines += [
        "",
        "## The same on SmolLM2-135M-Instruct (classification, batch 4 x 64 tokens)",
        "",
        profile_table(lm),
        "",
    ]
    lines += [_checks(lm)]
    lines += [
        "",
        "## LoRA's parameters against its layers', by rank (depthwise layers at peft's rank: a multiple of channels)",
        "",
        "| network | rank | layer type | layers | layers' params | LoRA + layers' trainable | trainable / layers |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rank_sweep"]:
        lines.append(
            f"| {row['network']} | {row['rank']} | {row['layer_type']} | {row['layers']} | {row['total']:,} | "
            f"{row['trainable']:,} | {row['trainable'] / row['total']:.2f} |"
        )
    (RESULTS / "cnn_profile.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="only write the tables and charts from the JSON")
    args = parser.parse_args()
    results_file = RESULTS / "cnn_profile.json"
    if args.report:
        results = json.loads(results_file.read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="pac-cnn-profile-") as scratch:
            results = {"profiles": {}, "rank_sweep": []}
            for network in NETWORKS:
                results["profiles"][network] = measure(network, Path(scratch))
                results["rank_sweep"] += rank_sweep(network, Path(scratch))
            results["language_model"] = language_model_check()
        results_file.write_text(json.dumps(results, indent=2) + "\n")
    report(results)


if __name__ == "__main__":
    main()
