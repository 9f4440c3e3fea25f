"""`pac train --device`: phase 1 and the training loop on an accelerator. No GPU is here, so the accelerator is
torch's lazy-tensor backend (pac.runtime.device): a real device other than the CPU, computing on it, where a
tensor left on the CPU by mistake meets the device's tensors and fails as it would on a GPU. Each run is a
`pac train` process of its own (the backend, once started, stays in its process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_argv
from safetensors.torch import load_file

from pac.runtime.device import resolve_device


def pac_train(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pac.cli", *argv], env=env, capture_output=True, text=True, timeout=600
    )


def trained(tmp_path: Path, name: str, model: Path, data: Path, *extra: str) -> tuple[dict, dict]:
    """(summary.json, the adapter's weights) of a `pac train` run that must succeed."""
    out = tmp_path / name
    done = pac_train(train_argv(model, data, out, tmp_path / f"cache-{name}", "--epochs", "1", *extra))
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / "summary.json").read_text()), load_file(out / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "method, task, options",
    [
        ("parallel-adapters", "classify", ("--holdout", "0.25")),  # the best epoch's weights copied back
        ("parallel-adapters", "lm", ("--shortlist", "16")),  # training on shortlists, evaluation on every word
        # No dropout: the stand-in draws its random numbers apart from the graph it runs (pac.runtime.device).
        ("lora", "classify", ("--lora-dropout", "0")),
        ("full", "lm", ()),
    ],
)
def test_a_run_on_the_stand_in_device_trains_the_adapter_the_cpu_trains(
    tiny_llama, topic_jsonl, tmp_path, method, task, options
):
    """Phase 1 (where the method caches), every step, evaluation and the checkpoints run on the device; the saved
    adapter matches the CPU's up to float summation order, and so do the figures."""
    extra = ("--method", method, "--task", task, *options)
    cpu_summary, cpu_weights = trained(tmp_path, "cpu", tiny_llama, topic_jsonl, *extra)
    lazy_summary, lazy_weights = trained(tmp_path, "lazy", tiny_llama, topic_jsonl, *extra, "--device", "lazy")
    assert lazy_summary["options"]["device"] == "lazy"
    if "--shortlist" in options:  # the shortlists were built (on the CPU) and trained on
        assert lazy_summary["shortlist"]["size"] == 16
    assert lazy_weights.keys() == cpu_weights.keys()
    for name, weight in cpu_weights.items():
        assert lazy_weights[name].device.type == "cpu"
        torch.testing.assert_close(lazy_weights[name], weight, rtol=1e-3, atol=1e-4, msg=name)
    metric = "val_accuracy" if task == "classify" else "val_perplexity"
    assert lazy_summary["epochs"][-1][metric] == pytest.approx(cpu_summary["epochs"][-1][metric], rel=1e-3)


def test_a_method_not_made_for_a_device_is_refused_before_any_work(tiny_llama, topic_jsonl, tmp_path):
    done = pac_train(
        train_argv(
            tiny_llama, topic_jsonl, tmp_path / "out", tmp_path / "cache", "--method", "taskedge", "--device", "lazy"
        )
    )
    assert done.returncode != 0
    assert "--method taskedge trains on the CPU only" in done.stderr
    assert "drop --device lazy, or train parallel-adapters, lora, full there" in done.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch computes on CUDA")
def test_a_device_this_torch_cannot_reach_says_what_it_needs():
    from pac.errors import PacError

    with pytest.raises(PacError, match="--device cuda: this torch .* cannot compute there .* Train on --device cpu"):
        resolve_device("cuda")
    with pytest.raises(PacError, match="'gpu' is not a device: use auto, cpu, cuda"):
        resolve_device("gpu")
    with pytest.raises(PacError, match="pac trains on"):
        resolve_device("meta")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_run_on_a_cuda_gpu_trains_the_adapter_the_cpu_trains(tiny_llama, topic_jsonl, tmp_path):
    cpu_summary, cpu_weights = trained(tmp_path, "cpu", tiny_llama, topic_jsonl)
    gpu_summary, gpu_weights = trained(tmp_path, "cuda", tiny_llama, topic_jsonl, "--device", "cuda")
    for name, weight in cpu_weights.items():
        torch.testing.assert_close(gpu_weights[name], weight, rtol=1e-2, atol=1e-3, msg=name)
    assert gpu_summary["epochs"][-1]["val_accuracy"] == pytest.approx(
        cpu_summary["epochs"][-1]["val_accuracy"], abs=0.1
    )


def test_data_parallel_peers_on_the_stand_in_device_train_the_one_device_adapter(
    tiny_llama, topic_jsonl, tmp_path, monkeypatch
):
    """`pac peer --device` (here through $PAC_DEVICE, which the local peers inherit): each peer's phase 2 runs on
    the device, and its gradient buckets go through CPU copies to gloo, which reduces no such tensors (as on
    Apple silicon's MPS); the adapter is the one a single CPU device trains."""
    from launcher.main import main as launch

    _, cpu_weights = trained(tmp_path, "cpu", tiny_llama, topic_jsonl)
    monkeypatch.setenv("PAC_DEVICE", "lazy")
    out = tmp_path / "cluster"
    where = ["--model", str(tiny_llama), "--data", str(topic_jsonl), "--out", str(out), "--cache-dir", str(tmp_path)]
    argv = ["--local", "2", "--mode", "replicated", "--epochs", "1", "--val-size", "12", "--reduction", "4"]
    assert launch([*argv, *where, "--join-timeout", "90"]) == 0
    peers = json.loads((out / "summary.json").read_text())["peers"].values()
    assert sorted(p["summary"]["device"] for p in peers) == ["lazy", "lazy"]
    got = load_file(out / "adapter_model.safetensors")
    for name, weight in cpu_weights.items():
        torch.testing.assert_close(got[name], weight, rtol=1e-3, atol=1e-4, msg=name)
