"""`--method full`, the full fine-tuning baseline, through `pac train`'s entry point on a tiny model: every weight
trains and moves, the saved weights load back and score what training reported (and refuse a model they do not
fit), a language model generates."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import eval_on_validation, train_argv
from safetensors.torch import load_file, save_file

from pac.cli import build_parser, main
from pac.errors import PacError
from pac.methods.base import ADAPTER_WEIGHTS
from pac.methods.defaults import FULL_LR
from pac.methods.full import FullOptions
from pac.methods.registry import BuildContext, data_parallel_only, get_method
from pac.methods.transformers_model import TransformersModel
from pac.workflow import load_for_inference


@pytest.mark.parametrize("task", ["classify", "lm"])
def test_full_fine_tuning_trains_every_weight_and_its_adapter_scores_as_training_reported(
    task, tiny_llama, topic_jsonl, tmp_path, capsys
):
    out, short = tmp_path / "full", ["--epochs", "1", "--max-length", "32"]  # the rows are shorter than 32 tokens
    argv = train_argv(tiny_llama, topic_jsonl, out, tmp_path / "cache", "--method", "full", "--task", task, *short)
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "full" and summary["options"]["lr"] == FULL_LR
    assert "cache_computed_samples" not in summary  # it trains on token ids: no phase 1

    labels = ["business", "sport", "tech"] if task == "classify" else None
    start = get_method("full").build(FullOptions(), BuildContext(tiny_llama, task, labels, 0, 32))
    assert all(p.requires_grad for p in start.parameters())
    assert summary["trainable_params"] == sum(p.numel() for p in start.parameters())
    saved = load_file(out / ADAPTER_WEIGHTS)
    assert saved.keys() == dict(start.named_parameters()).keys()
    for name, weight in start.network.named_parameters():  # the pretrained weights, every one of them moved
        assert not torch.equal(saved[f"network.{name}"], weight), name

    loaded = load_for_inference(out)
    assert loaded.kind == "full" and isinstance(loaded.model, TransformersModel) and loaded.backbone is None
    capsys.readouterr()
    assert main([*eval_on_validation(out, tiny_llama, topic_jsonl), "--task", task]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["samples"] == 12 and scored["loss"] == pytest.approx(summary["epochs"][-1]["val_loss"], rel=1e-5)
    if task == "lm":  # decoded by transformers' own generate
        argv = ["generate", "--adapter", str(out), "--prompt", "the market", "--no-chat", "--max-new-tokens", "4"]
        assert main(argv) == 0 and capsys.readouterr().out.strip()

    # Weights that do not fit the base model (another model's, a damaged file) are refused, saying what to do.
    save_file({n: w for n, w in saved.items() if not n.endswith("embed_tokens.weight")}, out / ADAPTER_WEIGHTS)
    with pytest.raises(PacError, match="its weights do not fit .* pass the base model it was trained on"):
        load_for_inference(out)


def test_full_fine_tuning_is_listed_and_may_run_data_parallel(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    shown = "".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    assert "{parallel-adapters,lora,dora,boundary,taskedge,zo,galore,head-bn,full" in shown
    assert "full:everyweightofthemodelandtheheadtrains" in shown and "full2e-05" in shown  # --method, --lr
    assert get_method("full").collaborative is data_parallel_only


def test_galore_trains_a_language_model_with_low_rank_adam_state_and_loads_as_full_does(
    tiny_llama, topic_jsonl, tmp_path, capsys
):
    from pac.methods.galore.optimizer import MatrixProjector

    out = tmp_path / "galore"
    argv = train_argv(tiny_llama, topic_jsonl, out, tmp_path / "cache", "--method", "galore", "--galore-rank", "2")
    assert main([*argv, "--epochs", "1", "--max-length", "32", "--checkpoint-every", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "galore" and summary["epochs"][-1]["train_loss"] > 0
    state = torch.load(sorted((out / "checkpoints").glob("step-*"))[-1] / "state.pt", weights_only=False)
    projected = [s for s in state["optimizer"]["state"].values() if isinstance(s.get("projector"), MatrixProjector)]
    assert projected and all(2 in s["exp_avg"].shape for s in projected)  # rank-2 moments of every projected matrix
    loaded = load_for_inference(out)
    assert loaded.kind == "galore" and isinstance(loaded.model, TransformersModel)
    capsys.readouterr()
    assert main([*eval_on_validation(out, tiny_llama, topic_jsonl), "--task", "classify"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["loss"] == pytest.approx(summary["epochs"][-1]["val_loss"], rel=1e-5)
