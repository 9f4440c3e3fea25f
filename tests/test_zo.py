"""`--method zo`: P-RGE's zeroth-order LoRA-FA on a tiny model. The batched estimate (2q copies in one forward)
equals the sequential one, each projected gradient is the directional derivative autograd finds, training never
builds a graph or fills a .grad, and the adapter is a peft LoRA that pac and peft load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import eval_on_validation, train_argv
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pac.cli import main
from pac.methods.base import loss_count
from pac.methods.registry import BuildContext, get_method
from pac.methods.zo import ZerothOrderOptions
from pac.methods.zo.step import ZerothOrderStep, direction, direction_seeds
from pac.runtime.step import lr_factor
from pac.runtime.trainer import TrainConfig, Trainer
from pac.workflow import load_for_inference


class Rows:
    """A few fixed rows of token ids (two of them padded), labelled for either task."""

    def __init__(self, task: str):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 60, (6, 10), generator=g)
        self.mask = torch.ones_like(self.ids)
        self.mask[1, 7:] = 0
        self.mask[4, 5:] = 0
        self.task = task

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        ids, mask = self.ids[indices], self.mask[indices]
        labels = torch.tensor(indices) % 3 if self.task == "classify" else ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _model_and_step(tiny_llama, task, **options):
    labels = ["a", "b", "c"] if task == "classify" else None
    torch.manual_seed(0)
    model = get_method("zo").build(ZerothOrderOptions(rank=4, **options), BuildContext(tiny_llama, task, labels, 0, 10))
    with torch.no_grad():  # B away from zero, so the adapters take part in every copy's output
        for layer in model.layers.values():
            layer.lora_B.normal_(0, 0.05)
    source = Rows(task)
    config = TrainConfig(epochs=1, batch_size=3, lr=1e-2)
    return model, source, ZerothOrderStep(model, source, config, perturbations=3, eps=1e-3)


@pytest.mark.parametrize("task", ["classify", "lm"])
def test_the_batched_estimate_equals_the_sequential_one_and_autograd(task, tiny_llama):
    model, source, step = _model_and_step(tiny_llama, task)
    batch = source.batch([0, 1, 4])
    with torch.no_grad():
        batched = step.losses(batch, step=7)
        step.batched = False
        sequential = step.losses(batch, step=7)
    torch.testing.assert_close(batched, sequential, rtol=1e-5, atol=1e-6)
    # without perturbation, a copy's loss is the model's own loss
    with torch.no_grad():
        alone = model.copy_loss_sums(batch, {name: t.unsqueeze(0) for name, t in model.trained().items()})
        count = loss_count(task, batch["labels"])
        torch.testing.assert_close(alone[0] / count, model.loss_batch(batch), rtol=1e-5, atol=1e-6)

    # each projected gradient is the directional derivative grad(L) . z_i (central differences)
    trained = model.trained()
    for t in trained.values():
        t.requires_grad_(True)
    model.loss_batch(batch).backward()
    projected = (batched[0::2] - batched[1::2]) / (2 * step.eps)
    for i, seed in enumerate(direction_seeds(step.config.seed, 7, step.q)):
        z = direction(trained, seed)
        exact = sum(float((t.grad * z[name]).sum()) for name, t in trained.items())
        assert float(projected[i]) == pytest.approx(exact, rel=0.02, abs=1e-3)


def test_a_step_moves_theta_along_its_directions_without_any_graph(tiny_llama, monkeypatch):
    model, source, step = _model_and_step(tiny_llama, "classify")
    monkeypatch.setattr(torch.Tensor, "backward", lambda *a, **k: pytest.fail("zeroth-order never runs backward"))
    before = {name: t.clone() for name, t in model.trained().items()}
    losses = step.losses(source.batch([0, 1, 2]), step=0)
    result = step([0, 1, 2], 0)
    projected = (losses[0::2] - losses[1::2]) / (2 * step.eps)
    update = step.update
    lr = step.config.lr * lr_factor(0, update.total, update.warmup, step.config.schedule)
    for name, theta in model.trained().items():
        expected = before[name].clone()
        for i, seed in enumerate(direction_seeds(0, 0, step.q)):
            expected -= lr * float(projected[i]) / step.q * direction(before, seed)[name]
        torch.testing.assert_close(theta, expected, rtol=1e-5, atol=1e-7)
    assert result.loss == pytest.approx(float(losses.mean()))
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft asks
@pytest.mark.parametrize("task", ["classify", "lm"])
def test_zo_trains_through_pac_and_saves_a_peft_lora(task, tiny_llama, topic_jsonl, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.Tensor, "backward", lambda *a, **k: pytest.fail("zeroth-order never runs backward"))
    out = tmp_path / "zo"
    argv = train_argv(tiny_llama, topic_jsonl, out, tmp_path / "cache", "--method", "zo", "--task", task)
    assert main([*argv, "--max-length", "32", "--zo-rank", "4", "--perturbations", "2", "--lr", "1e-2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "zo" and summary["forward_passes_per_step"] == 1
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    loaded = load_for_inference(out)
    assert loaded.kind == "zo"
    capsys.readouterr()
    assert main([*eval_on_validation(out, tiny_llama, topic_jsonl), "--task", task]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["loss"] == pytest.approx(summary["epochs"][-1]["val_loss"], rel=1e-4)
    if task == "lm":
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out)
        ids = torch.tensor([[3, 4, 5, 6]])
        torch.testing.assert_close(peft(input_ids=ids).logits, loaded.model.network(input_ids=ids).logits)
        moved = [n for n, p in peft.named_parameters() if "lora_B" in n and p.abs().max() > 0]
        assert moved  # B started at zero: the zeroth-order steps moved it
        argv = ["generate", "--adapter", str(out), "--prompt", "the market", "--no-chat", "--max-new-tokens", "4"]
        assert main(argv) == 0 and capsys.readouterr().out.strip()


def test_a_stopped_run_resumes_to_the_weights_of_an_unbroken_one(tiny_llama, tmp_path):
    """The checkpoint holds what the step moves (B and the head), though none of it requires a gradient."""
    method, source = get_method("zo"), Rows("classify")
    config = TrainConfig(epochs=2, batch_size=3, lr=1e-2)

    def trainer(out):
        options = ZerothOrderOptions(rank=4)
        model = method.build(options, BuildContext(tiny_llama, "classify", ["a", "b", "c"], 0, 10))
        step = method.step(options, model, "classify", source, config)
        return model, Trainer(model, "classify", source, config, out, train_step=step)

    whole, run = trainer(tmp_path / "whole")
    run.fit()
    _, cut = trainer(tmp_path / "cut")
    cut.fit(stop_after_steps=3)
    resumed, run = trainer(tmp_path / "cut")
    run.fit()
    assert run.names == list(whole.trained())
    for name, tensor in whole.trained().items():
        assert tensor.abs().max() > 0, name  # every B moved from zero
        torch.testing.assert_close(resumed.trained()[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft asks
@pytest.mark.parametrize("peers, task", [(2, "classify"), (3, "lm")])
def test_peers_pipelining_the_model_train_the_adapter_one_device_trains(
    peers, task, tiny_llama, topic_jsonl, tmp_path, capsys
):
    """`pac-launch --method zo`: each peer runs its layer range with their LoRA-FA adapters, forward only; the last
    sends the 2q losses, every stage updates its own B from the shared seeds: one device's adapter, and per step
    only hidden states and a few numbers on the wire."""
    from launcher.main import main as launch

    options = ["--method", "zo", "--task", task, "--zo-rank", "4", "--perturbations", "2", "--lr", "1e-2"]
    options += ["--max-length", "32", "--batch-size", "8"]
    single = tmp_path / "one"
    assert main(train_argv(tiny_llama, topic_jsonl, single, tmp_path / "cache", *options)) == 0
    out = tmp_path / "peers"
    argv = ["--local", str(peers), "--model", str(tiny_llama), "--data", str(topic_jsonl), "--out", str(out)]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--join-timeout", "90", "--epochs", "2", "--val-size", "12"]
    capsys.readouterr()
    assert launch([*argv, *options]) == 0
    assert "[pac-launch] the model pipelined forward-only, 2 micro-batches per batch" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "pipeline" and len(summary["plan"]) == peers
    files = ["adapter_model.safetensors"] + (["head.safetensors"] if task == "classify" else [])
    for file in files:
        expected, got = load_file(single / file), load_file(out / file)
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():  # the losses agree to float rounding, which 1/2eps (50) magnifies
            torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    ours, theirs = summary["epochs"], json.loads((single / "summary.json").read_text())["epochs"]
    for a, b in zip(ours, theirs, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert load_for_inference(out).kind == "zo"
    # What the steps sent: each stage but the last its hidden states, 2q copies x 8 rows x T tokens x 64 floats
    # (T at most --max-length 32); the last stage only the 2q losses to each other stage (headers included).
    by_rank = sorted((p["summary"]["rank"], p["summary"]) for p in summary["peers"].values())
    sent = [peer["step_bytes_sent"] / peer["steps_taken"] for _, peer in by_rank]
    hidden_per_token = 4 * 8 * 64 * 4
    assert all(hidden_per_token <= s <= 32 * hidden_per_token * 1.05 for s in sent[:-1]), sent
    assert sent[-1] < 400 * (peers - 1), sent


@pytest.mark.parametrize(
    "method, extra, refusal",
    [
        ("zo", ["--mode", "replicated"], "--method zo runs across devices as a forward-only pipeline"),
        ("zo", ["--zo-mode", "sequential"], "--zo-mode sequential and --zo-engine executorch run on one device"),
        ("zo", ["--zo-engine", "executorch"], "--zo-mode sequential and --zo-engine executorch run on one device"),
        ("zo", ["--mode", "pipeline", "--grad-compression", "fp16"], "pipeline mode all-reduces no gradients"),
        ("lora", ["--mode", "pipeline"], "this one runs backward through the whole model on each peer"),
        ("parallel-adapters", ["--mode", "pipeline"], "--method parallel-adapters trains from phase 1's cache"),
    ],
)
def test_the_pipeline_mode_is_for_forward_only_methods(
    method, extra, refusal, tiny_llama, topic_jsonl, tmp_path, capsys
):
    """Refused before any peer is waited for, saying what to use instead."""
    from launcher.main import main as launch

    argv = ["--local", "2", "--model", str(tiny_llama), "--data", str(topic_jsonl), "--out", str(tmp_path / "out")]
    assert launch([*argv, "--method", method, *extra]) == 2
    assert refusal in capsys.readouterr().err


def test_executorch_trains_the_adapter_pytorch_trains(tiny_llama, topic_jsonl, tmp_path):
    """`--zo-engine executorch`: the forward of the copies, exported once per batch shape and run by ExecuTorch's
    runtime, gives PyTorch's losses, so the steps and the adapter are PyTorch's. 48 training rows in batches of
    10 make two shapes, two programs, used in turn."""
    pytest.importorskip("executorch.runtime", reason="ExecuTorch is not installed (`pip install executorch`)")
    options = ["--method", "zo", "--zo-rank", "4", "--perturbations", "2", "--lr", "1e-2", "--max-length", "32"]
    options += ["--batch-size", "10", "--epochs", "1"]
    runs = {}
    for engine in ("eager", "executorch"):
        out = tmp_path / engine
        assert main(train_argv(tiny_llama, topic_jsonl, out, tmp_path / "cache", *options, "--zo-engine", engine)) == 0
        runs[engine] = load_file(out / "adapter_model.safetensors"), json.loads((out / "summary.json").read_text())
    (eager, _), (exported, summary) = runs["eager"], runs["executorch"]
    assert summary["engine_lowering_seconds"] > 0
    for name, tensor in eager.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
