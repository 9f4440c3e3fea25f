"""Peak memory and step time of TaskEdge's training step against LoRA's and full fine-tuning's.

Each configuration runs in a fresh process: SmolLM2-135M-Instruct built by its method (TaskEdge calibrates on
64 samples first), then 4 training steps (pac's BackpropStep: backward, clipping, AdamW) on batches of 8 x 128
tokens, the harness's batch and length. Reported: the process's peak resident memory, its resident memory once
the model is built (so the difference is what training adds), the trainable numbers and the optimizer state
they carry (gradient + AdamW's two moments), and the median step time (the first step, which allocates, left
out). Writes benchmarks/results/taskedge_memory.{json,md}.

    python benchmarks/taskedge_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROBE = r"""
import json, resource, sys, time, torch
from pac.methods.registry import BuildContext, get_method
from pac.models.loading import resolve_model
from pac.runtime.step import BackpropStep
from pac.runtime.trainer import TrainConfig

task, method_name, options_json = sys.argv[1], sys.argv[2], sys.argv[3]
def rss_mb():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20

class Source:  # token ids of the harness's shape; memory does not depend on which tokens
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 49152, (n, 128), generator=g)
        self.labels = torch.randint(0, 5, (n,), generator=g)
    def __len__(self):
        return len(self.ids)
    def batch(self, indices):
        ids = self.ids[indices]
        labels = self.labels[indices] if task == "classify" else ids
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

method = get_method(method_name)
options = method.resolved(method.options(**json.loads(options_json)), task)
labels = ["a", "b", "c", "d", "e"] if task == "classify" else None
source = Source(64)
ctx = BuildContext(resolve_model(None), task, labels, 0, 128, train_source=source)
model = method.build(options, ctx)
built = rss_mb()
step = BackpropStep(model, task, source, TrainConfig(epochs=1, lr=5e-4))
seconds = []
for i in range(4):
    started = time.perf_counter()
    step(list(range(8 * i, 8 * i + 8)), i)
    seconds.append(time.perf_counter() - started)
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(json.dumps({
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "built_rss_mb": built,
    "trainable_params": trainable,
    "trainable_state_mb": 4 * trainable * 4 / 2**20,  # weight, gradient, AdamW's two moments (fp32)
    "step_seconds": sorted(seconds[1:])[1],
    "calibration_seconds": getattr(model, "calibration_seconds", None),
}))
"""
CONFIGS: dict[str, tuple[str, dict]] = {
    "full": ("full", {}),
    "lora": ("lora", {}),
    "taskedge-0.01": ("taskedge", {"budget_percent": 0.01}),
    "taskedge": ("taskedge", {}),
    "taskedge-1": ("taskedge", {"budget_percent": 1.0}),
    "taskedge-nm24": ("taskedge", {"nm": [2, 4]}),
    "taskedge-sparse-lora": ("taskedge", {"sparse_lora_r": 8}),
}


def measure(task: str, method: str, options: dict) -> dict:
    if "nm" in options:
        options = {**options, "nm": tuple(options["nm"])}
    cmd = [sys.executable, "-c", PROBE, task, method, json.dumps(options)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(results: dict[str, dict[str, dict]]) -> str:
    lines = [
        "| task | configuration | peak RSS | added by training | trainable | their state | s/step | vs LoRA's peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, rows in results.items():
        lora = rows.get("lora")
        for name, r in rows.items():
            ratio = f"{r['peak_rss_mb'] / lora['peak_rss_mb']:.2f}x" if lora else "—"
            added = (r["peak_rss_mb"] - r["built_rss_mb"]) / 1024
            cells = [task, name, f"{r['peak_rss_mb'] / 1024:.2f} GB", f"{added:.2f} GB", f"{r['trainable_params']:,}"]
            cells += [f"{r['trainable_state_mb']:.1f} MB", f"{r['step_seconds']:.2f}", ratio]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    path = RESULTS / "taskedge_memory.json"
    results: dict[str, dict[str, dict]] = json.loads(path.read_text()) if path.exists() else {}
    for task in ("classify", "lm"):
        for name, (method, options) in CONFIGS.items():
            if name in results.get(task, {}):
                continue
            print(f"{task} {name} ...", flush=True)
            results.setdefault(task, {})[name] = measure(task, method, options)
            path.write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    note = (
        'Batch 8 x 128 tokens, fp32, one process per row (`python benchmarks/taskedge_memory.py`). "Added by '
        'training" is the peak less the resident memory once the model was built.\n\n'
    )
    (RESULTS / "taskedge_memory.md").write_text(note + text)
    print(text)


if __name__ == "__main__":
    main()
