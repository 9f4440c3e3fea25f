"""`pac train / eval / generate` end to end on tiny real models, files and caches on disk."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import eval_on_validation, train_argv

from pac.cli import main


def _train(model, data, out, cache, *extra):
    return main(train_argv(model, data, out, cache, *extra))


def test_train_eval_and_reuse_the_cache(tiny_model, topic_jsonl, tmp_path, capsys):
    out, cache = tmp_path / "adapter", tmp_path / "cache"
    assert _train(tiny_model, topic_jsonl, out, cache, "--lr", "1e-2") == 0
    config = json.loads((out / "pac_adapter_config.json").read_text())
    assert config["peft_type"] == "PARALLEL_ADAPTERS" and config["reduction"] == 4
    assert config["base_model_fingerprint"] and config["label_names"] == ["business", "sport", "tech"]
    assert (out / "adapter_model.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cache_computed_samples"] == {"train": 48, "val": 12}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in r for r in records)
    assert "epoch 2/2:" in capsys.readouterr().out

    # A second run with other training settings reuses the cache: nothing is recomputed.
    again = tmp_path / "again"
    assert _train(tiny_model, topic_jsonl, again, cache, "--lr", "5e-3") == 0
    assert json.loads((again / "summary.json").read_text())["cache_computed_samples"] == {"train": 0, "val": 0}

    capsys.readouterr()
    argv = eval_on_validation(out, tiny_model, topic_jsonl)
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 12
    # Evaluating from raw text through the live backbone gives what training saw from the cache.
    assert result["accuracy"] == pytest.approx(summary["epochs"][-1]["val_accuracy"])


def test_corrupt_shard_is_rebuilt_not_trained_on(tiny_llama, topic_jsonl, tmp_path, caplog):
    cache = tmp_path / "cache"
    assert _train(tiny_llama, topic_jsonl, tmp_path / "a", cache, "--epochs", "1") == 0
    shard = sorted(cache.rglob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert _train(tiny_llama, topic_jsonl, tmp_path / "b", cache, "--epochs", "1") == 0
    computed = json.loads((tmp_path / "b" / "summary.json").read_text())["cache_computed_samples"]
    assert 0 < sum(computed.values()) <= 32
    assert any("checksum" in r.getMessage() or "corrupt" in r.getMessage().lower() for r in caplog.records)


def test_language_modelling_and_generation(tiny_llama, topic_jsonl, tmp_path, capsys, caplog):
    out = tmp_path / "lm"
    assert _train(tiny_llama, topic_jsonl, out, tmp_path / "cache", "--task", "lm", "--lr", "1e-2") == 0
    summary = json.loads((out / "summary.json").read_text())
    ppl = [e["val_perplexity"] for e in summary["epochs"]]
    assert ppl[-1] < ppl[0]
    # The LM default mixes in a memory of the training tokens, fit on training text: this corpus repeats itself.
    assert json.loads((out / "pac_adapter_config.json").read_text())["retrieval"]["neighbours"] > 0
    retrieval = summary["retrieval"]
    assert retrieval["weight"] > 0 and retrieval["val_perplexity"] < ppl[-1]
    assert retrieval["tokens"] > 0 and (out / "retrieval.safetensors").stat().st_size > 0
    assert 0 < summary["training_peak_rss_mb"] <= summary["peak_rss_mb"]  # the peak before the memory's fit
    assert "with retrieval from" in capsys.readouterr().out
    argv = eval_on_validation(out, tiny_llama, topic_jsonl)
    # Through the live backbone, with and without the memory: what training measured from the cache.
    assert main([*argv, "--task", "lm"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(retrieval["val_perplexity"], rel=1e-3)
    assert main([*argv, "--task", "lm", "--no-retrieval"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(ppl[-1], rel=1e-4)
    assert main([*argv, "--task", "lm", "--split", "all"]) == 0  # scores the text the memory holds: said so
    assert "memory holds their text" in caplog.text
    argv = ["generate", "--adapter", str(out), "--model", str(tiny_llama), "--prompt", "the market", "--no-chat"]
    assert main([*argv, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    # An adapter copied without its memory says what is missing and how to go on.
    (out / "retrieval.safetensors").rename(tmp_path / "elsewhere.safetensors")
    assert main([*argv, "--max-new-tokens", "5"]) == 2
    assert "retrieval.safetensors is missing" in capsys.readouterr().err
    assert main([*argv, "--max-new-tokens", "5", "--no-retrieval"]) == 0


def test_language_modelling_on_shortlists(tiny_llama, topic_jsonl, tmp_path, capsys, caplog):
    """Training on shortlists learns; every reported perplexity still scores the whole vocabulary."""
    out = tmp_path / "lm"
    train_argv = ["--task", "lm", "--lr", "1e-2", "--shortlist", "8", "--no-retrieval"]
    assert _train(tiny_llama, topic_jsonl, out, tmp_path / "cache", *train_argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    ppl = [e["val_perplexity"] for e in summary["epochs"]]
    assert ppl[-1] < ppl[0]
    assert summary["shortlist"]["size"] == 8 and summary["shortlist"]["mb"] > 0
    assert summary["shortlist"]["built_files"] > 0
    assert "shortlists of 8 words per training token" in capsys.readouterr().out
    argv = eval_on_validation(out, tiny_llama, topic_jsonl)
    assert main([*argv, "--task", "lm"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(ppl[-1], rel=1e-4)
    # They live beside the cache: the next run reuses them, and one cut short is rebuilt, not trained on.
    files = sorted((tmp_path / "cache").glob("*/shortlists-8/*.safetensors"))
    assert files
    assert _train(tiny_llama, topic_jsonl, tmp_path / "again", tmp_path / "cache", *train_argv) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["shortlist"]["built_files"] == 0 and [e["val_perplexity"] for e in again["epochs"]] == ppl
    files[0].write_bytes(files[0].read_bytes()[:-100])
    assert _train(tiny_llama, topic_jsonl, tmp_path / "cut", tmp_path / "cache", *train_argv) == 0
    assert "rebuilding" in caplog.text and "cannot be read back" in caplog.text
    rebuilt = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert rebuilt["shortlist"]["built_files"] == 1 and [e["val_perplexity"] for e in rebuilt["epochs"]] == ppl


def test_lora_baseline_is_one_flag_away(tiny_llama, topic_jsonl, tmp_path, capsys):
    out = tmp_path / "lora"
    assert _train(tiny_llama, topic_jsonl, out, tmp_path / "cache", "--method", "lora", "--epochs", "1") == 0
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    capsys.readouterr()
    argv = eval_on_validation(out, tiny_llama, topic_jsonl)
    assert main(argv) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1


def test_bad_inputs_get_clear_errors(tiny_llama, topic_jsonl, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": "no label here"}\n{"text": "x", "label": "b"}\n')
    assert _train(tiny_llama, bad, tmp_path / "o", tmp_path / "c") == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "label" in err
    assert main(["train", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert main(["eval", "--adapter", str(tmp_path)]) == 2
    assert "is not a pac adapter" in capsys.readouterr().err
    negative_width = ["--task", "lm", "--readout-hidden", "-1"]
    assert _train(tiny_llama, topic_jsonl, tmp_path / "o", tmp_path / "c", *negative_width) == 2
    assert "argument --readout-hidden: must be a whole number >= 0, not -1" in capsys.readouterr().err
    assert _train(tiny_llama, topic_jsonl, tmp_path / "o", tmp_path / "c", "--retrieval") == 2  # classify
    assert "--retrieval is for --method parallel-adapters --task lm" in capsys.readouterr().err
    assert _train(tiny_llama, topic_jsonl, tmp_path / "o", tmp_path / "c", "--shortlist", "8") == 2  # classify
    assert "--shortlist is for --method parallel-adapters --task lm" in capsys.readouterr().err
    with_mlp = ["--task", "lm", "--shortlist", "8", "--readout-hidden", "16"]
    assert _train(tiny_llama, topic_jsonl, tmp_path / "o", tmp_path / "c", *with_mlp) == 2
    assert "--shortlist trains the plain side network" in capsys.readouterr().err


def _rows(path, count: int):
    lines = [{"text": "market shares rose", "label": "business"}, {"text": "team won the cup", "label": "sport"}]
    path.write_text("".join(json.dumps(lines[i % 2]) + "\n" for i in range(count)))
    return path


@pytest.mark.parametrize("method, task", [("parallel-adapters", "classify"), ("lora", "classify"), ("lora", "lm")])
def test_three_rows_train_with_nothing_to_validate_on(method, task, tiny_llama, tmp_path, capsys, caplog):
    """10% of 3 rows is 0 rows: the run trains on all 3, says so, and makes up no validation figures."""
    out, data = tmp_path / "out", _rows(tmp_path / "three.jsonl", 3)
    argv = ["train", "--model", str(tiny_llama), "--data", str(data), "--out", str(out)]
    assert main([*argv, "--cache-dir", str(tmp_path / "c"), "--method", method, "--task", task, "--epochs", "1"]) == 0
    assert "nothing to validate on: the default 10% of 3 rows is 0 rows" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["train_samples"], summary["val_samples"]) == (3, 0)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in summary["epochs"]] == [1] and "train_loss" in records[-1]
    assert not [k for r in [*records, *summary["epochs"]] for k in r if k.startswith("val_")]
    shown = capsys.readouterr().out
    assert "epoch 1/1: train loss" in shown and "val_" not in shown


def test_parallel_adapters_lm_on_three_rows_keep_the_memory_without_a_val_score(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_llama), "--data", str(_rows(tmp_path / "three.jsonl", 3)), "--out", str(out)]
    assert main([*argv, "--cache-dir", str(tmp_path / "c"), "--task", "lm", "--epochs", "1"]) == 0
    retrieval = json.loads((out / "summary.json").read_text())["retrieval"]
    assert retrieval["tokens"] > 0 and not [k for k in retrieval if k.startswith("val_")]
    assert "with retrieval from" in capsys.readouterr().out and (out / "retrieval.safetensors").exists()


def test_sizes_that_leave_nothing_to_train_on_are_refused_before_training(tiny_llama, tmp_path, capsys):
    cache = tmp_path / "c"
    assert _train(tiny_llama, _rows(tmp_path / "one.jsonl", 1), tmp_path / "o", cache, "--val-size", "1") == 2
    assert "leaves none to train on" in capsys.readouterr().err
    # --early-stopping holds out 10% of the training rows to pick the best epoch: of 3 rows, none
    early = ["--val-size", "0.1", "--early-stopping", "1"]
    assert _train(tiny_llama, _rows(tmp_path / "three.jsonl", 3), tmp_path / "o", cache, *early) == 2
    assert "--holdout 0.1 of 3 training rows is 0 rows" in capsys.readouterr().err
    assert not cache.exists() and not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_tapped_layers_and_gate_temperature_from_flags(tiny_llama, topic_jsonl, tmp_path, capsys):
    from pac.cli import layer_list

    assert layer_list("0, 15-17,30") == [0, 15, 16, 17, 30]
    out = tmp_path / "last-half"
    argv = ["--taps", "3-4", "--gate-temperature", "0.5", "--epochs", "1"]
    assert _train(tiny_llama, topic_jsonl, out, tmp_path / "cache", *argv) == 0
    config = json.loads((out / "pac_adapter_config.json").read_text())
    assert config["taps"] == [0, 3, 4] and config["gate_temperature"] == 0.5  # 0 and L always tapped
    assert _train(tiny_llama, topic_jsonl, out, tmp_path / "cache", "--taps", "last-half") == 2
    assert "not a layer list" in capsys.readouterr().err


def test_console_scripts_teach():
    out = subprocess.run([sys.executable, "-m", "pac.cli", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--model", "--data", "--task", "--method", "--epochs", "--max-length", "--reduction", "--cache-dir"):
        assert flag in out.stdout
    assert "JSONL" in out.stdout


def test_every_command_s_help_prints(capsys):
    """argparse formats a help text only when asked: a stray % in one (a format directive) fails then alone."""
    import argparse

    from launcher.main import build_parser as launch_parser
    from pac.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in [("pac", parser), *commands.items(), ("pac-launch", launch_parser())]:
        assert sub.format_help().startswith("usage:"), name


def test_training_seed_does_not_change_the_split(tiny_llama, topic_jsonl, tmp_path):
    """Seeds vary initialisation and order only, so runs of several seeds share one split and one cache;
    zero epochs (the API's, which `pac train` refuses) build the cache and report the untrained starting point."""
    from pac.workflow import CacheOptions, DataOptions, OptimOptions, TrainOptions, train

    cache = tmp_path / "cache"
    data = DataOptions(data=str(topic_jsonl), val_size=12)
    opts = TrainOptions(
        model=str(tiny_llama),
        data=data,
        out=str(tmp_path / "s0"),
        cache=CacheOptions(str(cache)),
        optim=OptimOptions(0),
    )
    train(opts)
    start = json.loads((tmp_path / "s0" / "summary.json").read_text())
    assert start["epochs"][0]["epoch"] == 0 and "val_accuracy" in start["epochs"][0]
    assert _train(tiny_llama, topic_jsonl, tmp_path / "s1", cache, "--seed", "1") == 0
    assert json.loads((tmp_path / "s1" / "summary.json").read_text())["cache_computed_samples"] == {
        "train": 0,
        "val": 0,
    }


def test_early_stopping_holds_out_part_of_the_training_data(tiny_llama, topic_jsonl, tmp_path, capsys):
    out = tmp_path / "early"
    assert _train(tiny_llama, topic_jsonl, out, tmp_path / "cache", "--early-stopping", "1", "--epochs", "3") == 0
    summary = json.loads((out / "summary.json").read_text())
    # 60 rows - 12 validation = 48 training rows, of which 10% (5) are held out and never trained on;
    # the training cache still holds all 48 (the holdout samples are read from it).
    assert (summary["train_samples"], summary["holdout_samples"]) == (43, 5)
    assert summary["cache_computed_samples"] == {"train": 48, "val": 12}
    assert all("holdout_loss" in e for e in summary["epochs"]) and 1 <= summary["best_epoch"] <= 3
    assert f"kept epoch {summary['best_epoch']}" in capsys.readouterr().out


def test_an_interrupted_cache_build_resumes_where_it_stopped(tiny_llama, topic_jsonl, tmp_path, monkeypatch):
    from pac.cache import CacheWriter

    real_write, calls = CacheWriter.write, []

    def crash_after_first_shard(self, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # the user pressed Ctrl-C (or the device lost power) mid-build
        calls.append(1)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(CacheWriter, "write", crash_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_llama, topic_jsonl, tmp_path / "a", tmp_path / "cache")
    monkeypatch.setattr(CacheWriter, "write", real_write)
    assert _train(tiny_llama, topic_jsonl, tmp_path / "b", tmp_path / "cache", "--epochs", "1") == 0
    computed = json.loads((tmp_path / "b" / "summary.json").read_text())["cache_computed_samples"]
    assert computed == {"train": 48 - 32, "val": 12}  # the first shard of 32 samples was kept


def test_zero_shot_evaluation(tiny_llama, tiny_bert, topic_jsonl, capsys):
    base = ["eval", "--zero-shot", "--data", str(topic_jsonl), "--val-size", "6", "--split", "val"]
    assert main([*base, "--model", str(tiny_llama), "--task", "lm"]) == 0
    lm = json.loads(capsys.readouterr().out)
    assert lm["samples"] == 6 and lm["perplexity"] > 1
    assert main([*base, "--model", str(tiny_llama)]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1
    assert main([*base, "--model", str(tiny_bert)]) == 2
    assert "use a decoder" in capsys.readouterr().err
