"""Weight memory of a pipeline stage: SmolLM2-135M-Instruct split into three stages of 10 layers.

Each stage is loaded in a fresh process (`load_backbone(dir, start, end)` reads only its tensors,
memory-mapped) and its weights are touched, as a forward pass would; the growth of the resident
set is the stage's weight memory. Writes benchmarks/results/layer_range_memory.{json,md}.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROBE = """
import json, sys, torch
import transformers.models.llama.modeling_llama  # imported before measuring: code, not weights
from pac.models.backbone import load_backbone
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
before = rss()
stage = load_backbone(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
unique = {p.data_ptr(): p for p in stage.parameters()}.values()
sum(float(p.sum()) for p in unique)
print(json.dumps({"rss_delta_mb": (rss() - before) / 2**20,
                  "weight_mb": sum(p.numel() * p.element_size() for p in unique) / 2**20,
                  "params": sum(p.numel() for p in unique)}))
"""
STAGES = {
    "whole model": (0, 30),
    "stage 1 (embeddings + layers 0-9)": (0, 10),
    "stage 2 (layers 10-19)": (10, 20),
    "stage 3 (layers 20-29 + norm + LM head)": (20, 30),
}


def main() -> None:
    from pac.models.loading import resolve_model

    model_dir = resolve_model(None)
    rows = {}
    for name, (start, end) in STAGES.items():
        out = subprocess.run(
            [sys.executable, "-c", PROBE, str(model_dir), str(start), str(end)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    whole = rows["whole model"]["rss_delta_mb"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "layer_range_memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| stage | parameters | weight MB | resident MB | share of the whole model's resident |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['params']:,} | {r['weight_mb']:.0f} | {r['rss_delta_mb']:.0f} "
            f"| {r['rss_delta_mb'] / whole:.0%} |"
        )
    (RESULTS / "layer_range_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
