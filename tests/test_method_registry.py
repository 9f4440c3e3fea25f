"""A method is one module and a registration: a toy method ("train only the head and a copy of the final norm",
from the activation cache of the last layer) is defined and registered here, in the test module alone, then
trained, saved, loaded and evaluated through the `pac` command's own entry point, without a line of pac changed.
The registry's own promises — options generated from the method's dataclass, foreign options refused, adapters
from before the registry still loading — are checked beside it."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from launcher.main import main as launch
from pac.argtypes import number
from pac.cli import build_parser, main
from pac.errors import PacError
from pac.methods.base import MethodModel, load_adapter, save_adapter
from pac.methods.registry import (
    METHOD_KEY,
    PLUGINS_ENV,
    BuildContext,
    Loaded,
    Method,
    adapter_config,
    data_parallel_only,
    get_method,
    method_option,
    register_method,
    unregister_method,
)
from pac.models.backbone import load_backbone, load_config
from pac.models.heads import ClassificationHead
from pac.runtime.step import BackpropStep
from pac.workflow import load_for_inference

TOY = "toy-head-norm"


@dataclass
class HeadNormOptions:
    norm_scale: float = method_option(
        1.0, "scale the trainable final norm starts at (default 1)", parse=number(float, above=0)
    )
    pooling: str = method_option("mean", "classification read-out (default mean)", choices=["mean", "last"])


class HeadNorm(MethodModel):
    """A trainable copy of the final norm and a head, over the frozen last layer's output (cached)."""

    def __init__(self, top: Any, num_layers: int, task: str, label_names: list[str] | None, options: HeadNormOptions):
        super().__init__()
        self.top, self.task, self.taps = top, task, [num_layers]
        self.norm = copy.deepcopy(top.norm).requires_grad_(True)
        with torch.no_grad():
            self.norm.weight.mul_(options.norm_scale)
        self.head = ClassificationHead(top.hidden_size, len(label_names), options.pooling) if label_names else None

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.norm(batch["taps"][:, -1])
        return self.head(hidden, batch["attention_mask"]) if self.head is not None else self.top.logits(hidden)

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}


def _model(model_dir: Path, task: str, labels: list[str] | None, options: HeadNormOptions, full: bool) -> HeadNorm:
    num_layers = load_config(model_dir).num_hidden_layers
    # Training reads cached taps, so it needs only the top; loaded for evaluation, the whole backbone feeds it.
    backbone = load_backbone(model_dir) if full else load_backbone(model_dir, num_layers, num_layers, with_head=True)
    return HeadNorm(backbone, num_layers, task, labels if task == "classify" else None, options)


def build(options: HeadNormOptions, ctx: BuildContext) -> HeadNorm:
    torch.manual_seed(ctx.seed)
    return _model(ctx.model_dir, ctx.task, ctx.label_names, options, full=False)


def save(options: HeadNormOptions, model: HeadNorm, out: Path, meta: dict[str, Any], name: str) -> dict[str, Any]:
    config = {**meta, "norm_scale": options.norm_scale, "pooling": options.pooling, METHOD_KEY: name}
    save_adapter(out, config, model.trainable())
    return {"trainable_params": sum(t.numel() for t in model.trainable().values())}


def load(adapter_dir: Path, config: dict[str, Any], model_dir: Path, retrieval: bool) -> Loaded:
    options = HeadNormOptions(norm_scale=config["norm_scale"], pooling=config["pooling"])
    model = _model(model_dir, config["task"], config["label_names"], options, full=True)
    model.load_state_dict(load_adapter(adapter_dir)[1], strict=False)
    return Loaded(model.eval(), model.top, config["task"], config["max_length"], config["label_names"])


def toy(name: str, collaborative: Any = None) -> Method:
    return Method(
        name=name,
        title="head and norm",
        summary="only a head and a copy of the final norm, from the cached last layer",
        options=HeadNormOptions,
        build=build,
        save=functools.partial(save, name=name),
        load=load,
        default_lr=lambda task: 1e-2,
        taps=lambda options, task, num_layers: [num_layers],
        generates=False,
        collaborative=collaborative,
    )


# The same method, declaring that pac-launch may run it data-parallel.
CLUSTER_TOY = "toy-head-norm-cluster"
CLUSTER_TOY_METHOD = toy(CLUSTER_TOY, collaborative=data_parallel_only)


def register_cluster_toy() -> None:
    """What each `pac peer` process calls, named in $PAC_METHODS, to know the method too."""
    register_method(CLUSTER_TOY_METHOD)


@pytest.fixture
def toy_method():
    yield register_method(toy(TOY))
    unregister_method(TOY)


@pytest.fixture
def cluster_toy(monkeypatch):
    """Registered here, and in the peers that pac-launch starts (they import this module through $PAC_METHODS)."""
    monkeypatch.setenv(PLUGINS_ENV, f"{__name__}:register_cluster_toy")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    register_cluster_toy()
    yield CLUSTER_TOY_METHOD
    unregister_method(CLUSTER_TOY)


def _train_argv(model: Path, data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--cache-dir", str(cache),
            "--epochs", "2", "--val-size", "12", *extra]  # fmt: skip


def test_a_method_defined_in_a_test_module_trains_saves_loads_and_evaluates(
    toy_method, tiny_llama, topic_jsonl, tmp_path, capsys
):
    out = tmp_path / "toy"
    argv = _train_argv(tiny_llama, topic_jsonl, out, tmp_path / "cache", "--method", TOY, "--norm-scale", "0.5")
    assert main(argv) == 0
    assert f"{TOY} on 48 samples" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == TOY and summary["options"]["norm_scale"] == 0.5 and len(summary["epochs"]) == 2
    assert summary["cache_computed_samples"] == {"train": 48, "val": 12}  # phase 1 cached the one tap it asked for
    method, config = adapter_config(out)
    assert method is toy_method and config[METHOD_KEY] == TOY and config["norm_scale"] == 0.5

    loaded = load_for_inference(out)
    assert loaded.kind == TOY and isinstance(loaded.model, HeadNorm)
    assert main(["eval", "--adapter", str(out), "--data", str(topic_jsonl), "--split", "val", "--val-size", "12"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["samples"] == 12 and scored["accuracy"] == pytest.approx(summary["epochs"][-1]["val_accuracy"])
    # As a language model too; it declared that it cannot generate, so pac says so instead of failing inside it.
    lm = tmp_path / "toy-lm"
    assert main(_train_argv(tiny_llama, topic_jsonl, lm, tmp_path / "cache", "--method", TOY, "--task", "lm")) == 0
    assert json.loads((lm / "summary.json").read_text())["epochs"][-1]["val_perplexity"] > 1
    assert main(["generate", "--adapter", str(lm), "--prompt", "hi"]) == 2
    assert f"generation with {TOY} adapters is not supported" in capsys.readouterr().err
    # Nor did it declare collaborative support: pac-launch refuses it before starting any peer.
    assert launch(["--local", "2", "--model", str(tiny_llama), "--data", str(topic_jsonl), "--method", TOY]) == 2
    assert f"--method {TOY} does not run across devices yet" in capsys.readouterr().err


def test_a_method_that_declares_collaborative_support_trains_across_devices_as_on_one(
    cluster_toy, tiny_llama, topic_jsonl, tmp_path, capsys
):
    single, cluster, cache = tmp_path / "single", tmp_path / "cluster", tmp_path / "cache"
    toy_options = ["--method", CLUSTER_TOY, "--norm-scale", "0.5"]
    assert main(_train_argv(tiny_llama, topic_jsonl, single, cache, *toy_options)) == 0
    where = ["--local", "2", "--model", str(tiny_llama), "--data", str(topic_jsonl), "--cache-dir", str(cache)]
    run = [*where, "--epochs", "2", "--val-size", "12", "--join-timeout", "90", *toy_options]
    assert launch([*run, "--out", str(cluster)]) == 0
    expected, got = load_file(single / "adapter_model.safetensors"), load_file(cluster / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)
    ours, theirs = (json.loads((d / "summary.json").read_text())["epochs"] for d in (cluster, single))
    assert [e["val_accuracy"] for e in ours] == pytest.approx([e["val_accuracy"] for e in theirs])
    assert load_for_inference(cluster).kind == CLUSTER_TOY
    capsys.readouterr()
    # Its registration said it has no pipelined stage: side-pipeline is refused before any peer starts.
    assert launch([*run, "--out", str(tmp_path / "piped"), "--mode", "side-pipeline"]) == 2
    assert "this method has no pipelined stage: use --mode shuffle or replicated" in capsys.readouterr().err


class NormOnlyStep(BackpropStep):
    """A masked update: backprop, but only the norm's entries move (the head gets no gradient)."""

    def gradients(self, indices: list[int], step: int) -> tuple[float, float]:
        loss = self.loss(self.source.batch(indices))
        loss.backward()
        for name, p in self.model.named_parameters():
            if p.requires_grad and not name.startswith("norm."):
                p.grad.zero_()
        return loss.item(), self.clip()


@pytest.fixture
def norm_only_method():
    name = "toy-norm-only-step"
    method = register_method(
        dataclasses.replace(
            toy(name), step=lambda options, model, task, source, config: NormOnlyStep(model, task, source, config)
        )
    )
    yield method
    unregister_method(name)


def test_a_method_s_own_step_is_what_pac_train_runs(norm_only_method, tiny_llama, topic_jsonl, tmp_path):
    out = tmp_path / "norm-only"
    argv = _train_argv(tiny_llama, topic_jsonl, out, tmp_path / "cache", "--method", norm_only_method.name)
    assert main([*argv, "--weight-decay", "0"]) == 0
    trained = load_file(out / "adapter_model.safetensors")
    start = norm_only_method.build(HeadNormOptions(), BuildContext(tiny_llama, "classify", ["a", "b", "c"], 0, 32))
    for name, weight in start.trainable().items():
        moved = not torch.equal(trained[name], weight)
        assert moved == name.startswith("norm."), name


def test_a_plug_in_method_that_cannot_load_says_so(monkeypatch, capsys):
    monkeypatch.setenv(PLUGINS_ENV, "no_such_pac_plugin:register")
    assert main(["train", "--help"]) == 2
    err = capsys.readouterr().err
    assert "$PAC_METHODS names 'no_such_pac_plugin:register', which could not be loaded" in err
    assert launch(["--local", "2"]) == 2 and "no_such_pac_plugin" in capsys.readouterr().err


def test_method_options_are_generated_grouped_and_refused_for_other_methods(toy_method, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    assert f"--method {TOY} options:" in shown and "--norm-scale NORM_SCALE" in shown
    assert "--method parallel-adapters options:" in shown and "--method boundary options:" in shown
    # --pooling, listed once (argparse may break the line inside a hyphenated name)
    assert "[also--methodlora,dora,boundary,taskedge,zo,galore,full,toy-head-norm]" in "".join(shown.split())
    # An option of one method given to another is refused before anything loads, naming its owner.
    assert main(["train", "--method", "lora", "--norm-scale", "2"]) == 2
    assert "--norm-scale is an option of --method toy-head-norm, not of lora" in capsys.readouterr().err
    assert main(["train", "--method", TOY, "--norm-scale", "-1"]) == 2  # bounds from the field's metadata
    assert "--norm-scale: must be a number > 0" in capsys.readouterr().err


def test_an_unknown_method_name_in_an_adapter_is_a_clear_error(tiny_llama, topic_jsonl, tmp_path):
    out = tmp_path / "a"
    save_adapter(out, {METHOD_KEY: "no-such-method", "task": "classify"}, {"w": torch.zeros(1)})
    with pytest.raises(PacError, match="saved by method 'no-such-method', which this pac does not have"):
        adapter_config(out)
    with pytest.raises(PacError, match="is not a pac adapter"):
        adapter_config(tmp_path / "empty")


def test_adapters_saved_before_the_registry_still_load(tiny_llama, topic_jsonl, tmp_path):
    """Before the registry, parallel-adapter and boundary configs named the method by peft_type only, and LoRA's
    pac settings were in pac_lora.json: such directories load as the same method."""
    for method in ("parallel-adapters", "boundary", "lora"):
        out = tmp_path / method
        argv = _train_argv(tiny_llama, topic_jsonl, out, tmp_path / "cache", "--method", method, "--epochs", "1")
        assert main(argv) == 0
        config_file = out / "pac_adapter_config.json"
        config = json.loads(config_file.read_text())
        del config[METHOD_KEY]
        if method == "lora":  # as pac wrote it then
            config_file.unlink()
            (out / "pac_lora.json").write_text(json.dumps({**config, "peft_type_pac": "lora"}))
        else:
            config_file.write_text(json.dumps(config))
        before = load_for_inference(out)
        assert before.kind == method == get_method(method).name


def test_a_method_name_registers_once(toy_method):
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method(**{**toy_method.__dict__, "summary": "another"}))


def test_the_run_configuration_travels_field_by_field_and_refuses_what_it_does_not_know():
    from pac.methods.parallel_adapters import ParallelAdapterOptions
    from pac.runconfig import DataOptions, TrainOptions, run_config_from_wire, run_config_to_wire

    opts = TrainOptions(data=DataOptions(task="lm"), method_options=ParallelAdapterOptions(reduction=4, taps=[3]))
    wire = run_config_to_wire(opts)
    assert run_config_from_wire(wire) == opts
    extra = {**wire, "train": {**wire["train"], "new_flag": 1}}
    with pytest.raises(PacError, match=r"unknown fields \['new_flag'\], missing fields \[\]"):
        run_config_from_wire(extra)
    gone = {**wire, "method_options": {k: v for k, v in wire["method_options"].items() if k != "reduction"}}
    with pytest.raises(PacError, match=r"--method parallel-adapters options: unknown fields \[\], missing .*reduction"):
        run_config_from_wire(gone)
    with pytest.raises(PacError, match="run configuration of version 99"):
        run_config_from_wire({**wire, "version": 99})
