"""`--method zo`: P-RGE's zeroth-order LoRA-FA on a tiny model. The batched estimate (2q copies in one forward)
equals the sequential one, each projected gradient is the directional derivative autograd finds, training never
builds a graph or fills a .grad, and the adapter is a peft LoRA that pac and peft load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import eval_on_validation, train_argv
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pac.cli import main
from pac.methods.registry import BuildContext, get_method
from pac.methods.zo import ZerothOrderOptions
from pac.methods.zo.step import ZerothOrderStep, direction, direction_seed
from pac.runtime.step import lr_factor
from pac.runtime.trainer import TrainConfig
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
        alone = model.copy_losses(batch, [t.unsqueeze(0) for t in model.trained()])
        torch.testing.assert_close(alone[0], model.loss_batch(batch), rtol=1e-5, atol=1e-6)

    # each projected gradient is the directional derivative grad(L) . z_i (central differences)
    trained = model.trained()
    for t in trained:
        t.requires_grad_(True)
    model.loss_batch(batch).backward()
    projected = (batched[0::2] - batched[1::2]) / (2 * step.eps)
    for i in range(step.q):
        z = direction(trained, direction_seed(step.config.seed, 7, i))
        exact = sum(float((t.grad * z_k).sum()) for t, z_k in zip(trained, z, strict=True))
        assert float(projected[i]) == pytest.approx(exact, rel=0.02, abs=1e-3)


def test_a_step_moves_theta_along_its_directions_without_any_graph(tiny_llama, monkeypatch):
    model, source, step = _model_and_step(tiny_llama, "classify")
    monkeypatch.setattr(torch.Tensor, "backward", lambda *a, **k: pytest.fail("zeroth-order never runs backward"))
    before = [t.clone() for t in model.trained()]
    losses = step.losses(source.batch([0, 1, 2]), step=0)
    result = step([0, 1, 2], 0)
    projected = (losses[0::2] - losses[1::2]) / (2 * step.eps)
    lr = step.config.lr * lr_factor(0, step.total, step.warmup, step.config.schedule)
    for k, (theta, start) in enumerate(zip(model.trained(), before, strict=True)):
        expected = start.clone()
        for i in range(step.q):
            expected -= lr * float(projected[i]) / step.q * direction(before, direction_seed(0, 0, i))[k]
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
