"""Peak memory and step time of one training step, method by method, at the same batch.

Each configuration runs in a fresh process: SmolLM2-135M-Instruct built by its method (TaskEdge calibrates on
64 samples first), then 4 training steps of the method's own step (backprop + AdamW, or the zeroth-order step)
on batches of 8 x 128 tokens, the quality harness's batch and length. "inference" is the floor: forward passes
of the base model under no_grad over the same batch, and "inference x16" over the batch tiled 16 times, what a
zeroth-order step with q = 8 evaluates in one forward. Reported: the process's peak resident memory, its
resident memory once the model is built (the difference is what the step adds), the trainable numbers and the
state they carry (weight, gradient and AdamW's two moments for backprop; the weight alone for zeroth-order),
and the median step time (the first step, which allocates, left out). Writes
benchmarks/results/step_memory.{json,md}.

    python benchmarks/step_memory.py
"""

from __future__ import annotations

import argparse
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
from pac.methods.transformers_model import TransformersModel

task, method_name, options_json, batch_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
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

labels = ["a", "b", "c", "d", "e"] if task == "classify" else None
source = Source(64)
config = TrainConfig(epochs=1, lr=5e-4)
if method_name.startswith("inference"):  # the floor: forwards of the base model, the batch tiled `copies` times
    copies = json.loads(options_json)["copies"]
    model = TransformersModel(resolve_model(None), task, "mean", labels).eval()
    def run(indices, i):  # as a zeroth-order forward reads it: the LM head over one copy's tokens at a time
        batch = source.batch(indices)
        ids, mask = batch["input_ids"].repeat(copies, 1), batch["attention_mask"].repeat(copies, 1)
        with torch.no_grad():
            hidden = model.body()(input_ids=ids, attention_mask=mask).last_hidden_state
            for h, m in zip(hidden.split(len(indices)), mask.split(len(indices))):
                model.head(h, m) if model.head is not None else model.network.get_output_embeddings()(h)
    trainable, state_floats = 0, 0
else:
    method = get_method(method_name)
    raw = json.loads(options_json)
    if "nm" in raw:
        raw["nm"] = tuple(raw["nm"])
    options = method.resolved(method.options(**raw), task)
    ctx = BuildContext(resolve_model(None), task, labels, 0, 128, train_source=source)
    model = method.build(options, ctx)
    if method.step:  # zeroth-order: the trained tensors alone, no gradient, no optimizer state
        run = method.step(options, model, task, source, config)
        trainable = sum(t.numel() for t in model.trained().values())
        state_floats = trainable
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        state_floats = 4 * trainable  # weight, gradient, AdamW's two moments
        run = BackpropStep(model, task, source, config)
built = rss_mb()
seconds = []
for i in range(3):
    started = time.perf_counter()
    run(list(range(batch_size * i, batch_size * (i + 1))), i)
    seconds.append(time.perf_counter() - started)
print(json.dumps({
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "built_rss_mb": built,
    "trainable_params": trainable,
    "trainable_state_mb": state_floats * 4 / 2**20,
    "step_seconds": sum(seconds[1:]) / 2,
    "calibration_seconds": getattr(model, "calibration_seconds", None),
}))
"""
# name -> (method, options, batch size). The zeroth-order rows and their references run at batch 2 per copy:
# q = 4 evaluates 2q = 8 copies, 16 sequences per forward, on two cores.
CONFIGS: dict[str, tuple[str, dict, int]] = {
    "full": ("full", {}, 8),
    "lora": ("lora", {}, 8),
    "taskedge-0.01": ("taskedge", {"budget_percent": 0.01}, 8),
    "taskedge": ("taskedge", {}, 8),
    "taskedge-1": ("taskedge", {"budget_percent": 1.0}, 8),
    "taskedge-nm24": ("taskedge", {"nm": [2, 4]}, 8),
    "taskedge-sparse-lora": ("taskedge", {"sparse_lora_r": 8}, 8),
    "inference": ("inference", {"copies": 1}, 8),
    "lora, batch 2": ("lora", {}, 2),
    "zo q=1, batch 2": ("zo", {"perturbations": 1}, 2),
    "zo q=4, batch 2": ("zo", {"perturbations": 4}, 2),
    "inference, batch 2": ("inference", {"copies": 1}, 2),
    "inference, batch 2 tiled 8 (= zo q=4)": ("inference", {"copies": 8}, 2),
}


def measure(task: str, method: str, options: dict, batch_size: int) -> dict:
    cmd = [sys.executable, "-c", PROBE, task, method, json.dumps(options), str(batch_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(results: dict[str, dict[str, dict]]) -> str:
    lines = [
        "| task | configuration | peak RSS | added by the step | trainable | their state | s/step "
        "| vs LoRA's peak (same batch) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, rows in results.items():
        for name, r in rows.items():
            same_batch = [x for n, x in rows.items() if n.startswith("lora") and x["batch_size"] == r["batch_size"]]
            ratio = f"{r['peak_rss_mb'] / same_batch[0]['peak_rss_mb']:.2f}x" if same_batch else "—"
            added = (r["peak_rss_mb"] - r["built_rss_mb"]) / 1024
            cells = [task, name, f"{r['peak_rss_mb'] / 1024:.2f} GB", f"{added:.2f} GB", f"{r['trainable_params']:,}"]
            cells += [f"{r['trainable_state_mb']:.1f} MB", f"{r['step_seconds']:.2f}", ratio]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=["classify", "lm"], default=["classify", "lm"])
    args = parser.parse_args()
    path = RESULTS / "step_memory.json"
    results: dict[str, dict[str, dict]] = json.loads(path.read_text()) if path.exists() else {}
    for task in args.tasks:
        for name, (method, options, batch_size) in CONFIGS.items():
            if name in results.get(task, {}):
                continue
            print(f"{task} {name} ...", flush=True)
            results.setdefault(task, {})[name] = {
                **measure(task, method, options, batch_size),
                "batch_size": batch_size,
            }
            path.write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    note = (
        "Batch 8 (or 2, where named) x 128 tokens, fp32, one process per row (`python benchmarks/step_memory.py`). "
        '"Added by the step" is the peak less the resident memory once the model and its step were built.\n\n'
    )
    (RESULTS / "step_memory.md").write_text(note + text)
    print(text)


if __name__ == "__main__":
    main()
