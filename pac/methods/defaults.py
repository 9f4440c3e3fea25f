"""The measured default settings of each method (plain data, so `pac --help` can quote them without torch)."""

from __future__ import annotations

from typing import Any

from pac.data.tasks import IMAGE_TASK, TEXT_TASKS

TASKS = TEXT_TASKS  # what a language-model adapter can be trained for
ALL_TASKS = (*TEXT_TASKS, IMAGE_TASK)  # and edge CNNs (pac.methods.vision_model)

# Defaults of --method parallel-adapters per task, chosen by the quality harness (benchmarks/quality.py,
# SmolLM2-135M on BBC News, 400 training / 400 validation articles, 3 seeds; tables in benchmarks/results/).
# The side network is small and starts at zero output, so it takes a larger step than LoRA (5e-4).
PARALLEL_ADAPTER_DEFAULTS: dict[str, dict[str, Any]] = {
    # Classification: the plain side network (0.948 +- 0.001) already matches LoRA r=8 (0.950 +- 0.008), and no
    # lever beat it by more than its noise: dropout + weight decay 0.950 +- 0.004, read-out MLP 0.949 +- 0.012,
    # pruned init 0.943, 3x LR 0.945, last-token read-out 0.846, side-only read-out 0.941.
    "classify": {
        "lr": 3e-3,
        "reduction": 8,
        "side_init": "random",
        "readout_hidden": 0,
        "retrieval": False,
        "shortlist": 0,
    },
    # Language modelling: the plain side network plus a memory of the training tokens (retrieval, a kNN-LM over
    # the cache's last tap; pac.models.retrieval): perplexity 29.71 -> 27.02 +- 0.13, 65% of LoRA's
    # log-perplexity reduction where no trained lever passed 50%, at the plain epoch time plus ~1 minute once.
    # The best trained lever, a read-out MLP as wide as the model (29.07 +- 0.05, 49%), gains less with the
    # memory (27.38 +- 0.20, 62%): it fits the training text closer, so the weight fit on that text comes out
    # smaller. 3x LR 29.22 +- 0.08; width d/4 29.06 +- 0.06 at 1.4x the epoch and 36% of LoRA's memory.
    # Trained on shortlists of 256 words (pac.models.shortlist): 27.13 +- 0.14 with the memory (64%), at half the
    # epoch time (24-26 s against 51 s: 10.1-10.9x faster than LoRA's epoch, where the whole-vocabulary products
    # held it at 5x), once ~45 s per cache to build them; 1024 words matched the whole vocabulary (1 seed) at 34 s.
    # The whole run peaks at 23% of LoRA's memory (1.16 GB).
    "lm": {"lr": 1e-3, "reduction": 8, "side_init": "random", "readout_hidden": 0, "retrieval": True, "shortlist": 256},
}
LORA_LR = 5e-4
# TaskEdge's packed entries and the head: 4x LoRA's rate. On classification, 1 epoch (400 articles): 0.9325 at 2e-3
# against 0.8725 at 5e-4 (LoRA's rate, which left even the head under-trained: train loss above head+norm's).
TASKEDGE_LR = 2e-3
# Zeroth-order LoRA-FA: MeZO's and P-RGE's rate for LoRA (they run 20k steps; issue 24 measures what fewer give).
ZO_LR = 5e-5
# Full fine-tuning steps every pretrained weight, not a small update beside them: the usual 1e-5..5e-5 (not tuned here).
FULL_LR = 2e-5
# Edge CNNs on images (--task image-classify): Adam's usual 1e-3 for every method; the adapters and the fresh head
# start at zero or small, and the digits runs of benchmarks/cnn_peft.py train in a few hundred steps.
IMAGE_LR = 1e-3
# GaLore on a language model: full fine-tuning's rate times GaLore's scale is what reaches the weights.
GALORE_LR = 1e-4


def lr_for(task: str, text_lr: float) -> float:
    """A method's default rate: `text_lr` on text, IMAGE_LR on images."""
    return IMAGE_LR if task == IMAGE_TASK else text_lr
