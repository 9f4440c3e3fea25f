"""`--method taskedge`: the selection's pure functions, the sparse update's gradient, and runs through `pac train`
on a tiny model: only the selected entries ever change (bit for bit), the trainable state is sized to the
selection, the adapter loads merged, evaluates, generates and exports a merged model transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import eval_on_validation, train_argv
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pac.cli import main
from pac.errors import PacError
from pac.methods.base import ADAPTER_WEIGHTS
from pac.methods.registry import BuildContext, data_parallel_only, get_method
from pac.methods.taskedge import TaskEdgeOptions, nm_pattern
from pac.methods.taskedge.select import global_top, importance, layer_shares, nm_limited, per_row, select
from pac.methods.taskedge.sparse import SparseDelta, selected_gradient
from pac.methods.transformers_model import TransformersModel
from pac.workflow import load_for_inference


# ----------------------------------------------------------------------------------------------- selection
def test_importance_is_weight_magnitude_times_input_norm():
    weight = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    sq_sums = torch.tensor([4.0, 9.0], dtype=torch.float64)  # ||X_0|| = 2, ||X_1|| = 3
    assert importance(weight, sq_sums).tolist() == [[2.0, 6.0], [1.0, 9.0]]


def test_every_row_gets_its_share_and_the_remainder_goes_to_the_best_next_scores():
    scores = torch.tensor([[9.0, 1.0, 0.0], [8.0, 7.0, 0.0], [5.0, 4.0, 3.0]])
    # 4 entries over 3 rows: one each, and the extra to row 1, whose second-best (7) beats 1 and 4
    assert per_row(scores, 4).tolist() == [0, 3, 4, 6]
    # fewer entries than rows: the rows with the best top score
    assert per_row(scores, 2).tolist() == [0, 3]
    with pytest.raises(PacError, match="allows 3: lower --budget-percent"):
        per_row(scores, 10)


def test_layer_shares_follow_the_layer_sizes_and_add_up():
    shares = layer_shares({"a": 100, "b": 300, "c": 7}, 41)
    assert sum(shares.values()) == 41 and shares["b"] == 30 and shares["a"] == 10


def test_nm_keeps_at_most_n_of_every_m_inputs():
    scores = torch.arange(16.0).reshape(2, 8).flip(1)
    limited = nm_limited(scores, 2, 4)
    assert torch.isfinite(limited).reshape(2, 2, 4).sum(-1).eq(2).all()
    chosen = per_row(limited, 8)  # 4 per row: 2 in each block
    cols = (chosen % 8).reshape(2, 4)
    assert ((cols // 4) == torch.tensor([0, 0, 1, 1])).all()
    with pytest.raises(PacError, match="whole blocks of 4"):
        nm_limited(torch.zeros(2, 6), 2, 4)
    assert nm_pattern("2:4") == (2, 4) and nm_pattern("none") is None


def test_global_top_k_may_leave_a_layer_empty_where_the_spread_does_not():
    scores = {"small": torch.full((2, 2), 0.1), "big": torch.full((2, 2), 5.0)}
    assert global_top(scores, 3)["small"].numel() == 0
    spread = select("taskedge", scores.__getitem__, {name: (2, 2) for name in scores}, 4)
    assert spread["small"].numel() == 2 and spread["big"].numel() == 2


# ----------------------------------------------------------------------------------------------- the update
@pytest.mark.parametrize("rank", [0, 3])
def test_the_sparse_update_equals_a_masked_dense_one_and_only_its_entries_get_gradients(rank):
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5, bias=True).requires_grad_(False)
    index = torch.tensor([0, 7, 8, 20, 29])
    delta = SparseDelta(linear, index, rank=rank)
    with torch.no_grad():
        for p in delta.parameters():
            if p.requires_grad:
                p.normal_()
    x = torch.randn(2, 4, 6, requires_grad=True)
    got = delta(x)
    dense = torch.zeros(30).index_put((index,), delta.delta()).view(5, 6)
    expected = torch.nn.functional.linear(x, linear.weight + dense, linear.bias)
    torch.testing.assert_close(got, expected)
    (got.square().sum()).backward()
    x_grad = x.grad.clone()
    x.grad = None
    weight = linear.weight.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x, weight + dense.detach(), linear.bias).square().sum().backward()
    torch.testing.assert_close(x_grad, x.grad)
    assert linear.weight.grad is None
    if not rank:  # the packed values' gradient is the dense weight gradient read at the entries
        torch.testing.assert_close(delta.values.grad, weight.grad.view(-1)[index])
        summed = selected_gradient(torch.ones(3, 5), torch.ones(3, 6), index, 6)
        torch.testing.assert_close(summed, torch.full((5,), 3.0))


# ----------------------------------------------------------------------------------------------- pac train
def _trained(tiny_llama, topic_jsonl, tmp_path, task, *extra):
    out = tmp_path / "taskedge"
    argv = train_argv(tiny_llama, topic_jsonl, out, tmp_path / "cache", "--method", "taskedge", "--task", task)
    assert main([*argv, "--max-length", "32", "--budget-percent", "1", "--lr", "1e-2", *extra]) == 0
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("task", ["classify", "lm"])
def test_taskedge_changes_only_its_selected_entries_and_its_adapter_scores_as_training_reported(
    task, tiny_llama, topic_jsonl, tmp_path, capsys
):
    out, summary = _trained(tiny_llama, topic_jsonl, tmp_path, task)
    labels = ["business", "sport", "tech"] if task == "classify" else None
    base = TransformersModel(tiny_llama, task, "mean", labels)
    backbone = sum(p.numel() for p in base.network.parameters())
    assert summary["method"] == "taskedge" and "cache_computed_samples" not in summary
    assert summary["selected_weights"] == round(0.01 * backbone)
    head = sum(p.numel() for p in base.head.parameters()) if base.head is not None else 0
    assert summary["trainable_params"] == summary["selected_weights"] + head  # the state is sized to the selection
    assert summary["calibration_seconds"] > 0
    assert f"pac export --adapter {out}" in (out / "README.md").read_text()  # the model card says how to merge

    loaded = load_for_inference(out)
    assert loaded.kind == "taskedge" and loaded.backbone is None
    saved = load_file(out / ADAPTER_WEIGHTS)
    moved = 0
    for name, weight in base.network.named_parameters():
        after = dict(loaded.model.network.named_parameters())[name]
        changed = (after != weight).view(-1).nonzero().view(-1)
        key = name.removesuffix(".weight") + ".index"
        allowed = saved[key].long() if key in saved else torch.zeros(0, dtype=torch.long)
        assert set(changed.tolist()) <= set(allowed.tolist()), name  # every other entry bit for bit the same
        moved += changed.numel()
    assert moved > 0.5 * summary["selected_weights"]

    capsys.readouterr()
    assert main([*eval_on_validation(out, tiny_llama, topic_jsonl), "--task", task]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["loss"] == pytest.approx(summary["epochs"][-1]["val_loss"], rel=1e-5)
    if task == "lm":
        argv = ["generate", "--adapter", str(out), "--prompt", "the market", "--no-chat", "--max-new-tokens", "4"]
        assert main(argv) == 0 and capsys.readouterr().out.strip()
        # a merged model that transformers loads and that gives the adapter's logits
        assert main(["export", "--adapter", str(out), "--out", str(tmp_path / "merged")]) == 0
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        ids = torch.tensor([[3, 4, 5, 6]])
        torch.testing.assert_close(exported(input_ids=ids).logits, loaded.model.network(input_ids=ids).logits)


def test_nm_and_sparse_lora_variants_keep_their_structure(tiny_llama, topic_jsonl, tmp_path):
    out, summary = _trained(tiny_llama, topic_jsonl, tmp_path, "classify", "--nm", "2:4", "--selection", "magnitude")
    saved = load_file(out / ADAPTER_WEIGHTS)
    for key, index in saved.items():
        if key.endswith(".index"):
            in_features = 128 if "down_proj" in key else 64
            rows, cols = index.long() // in_features, index.long() % in_features
            blocks = rows * (in_features // 4) + cols // 4
            assert torch.bincount(blocks).max() <= 2, key
    out, lora = _trained(tiny_llama, topic_jsonl, tmp_path / "lora", "classify", "--sparse-lora-r", "2")
    assert lora["selected_weights"] == summary["selected_weights"]
    assert lora["trainable_params"] > lora["selected_weights"]  # B and A: more numbers, the same touched entries
    assert main(["train", "--method", "taskedge", "--nm", "3"]) == 2  # refused as it is parsed


def test_target_modules_that_name_no_linear_map_are_refused_with_the_names_there_are(tiny_llama, topic_jsonl, tmp_path):
    out = tmp_path / "typo"
    argv = train_argv(
        tiny_llama, topic_jsonl, out, tmp_path / "cache", "--method", "taskedge", "--target-modules", "qproj"
    )
    with pytest.raises(PacError, match="names none of this model's linear maps: pick from .*q_proj"):
        get_method("taskedge").build(
            TaskEdgeOptions(target_modules=["qproj"]), BuildContext(tiny_llama, "lm", None, 0, 16)
        )
    assert main(argv) == 2


def test_taskedge_is_listed_and_runs_data_parallel_only():
    method = get_method("taskedge")
    assert method.collaborative is data_parallel_only and method.merged is not None
    with pytest.raises(PacError, match="use one of the two"):
        method.resolved(TaskEdgeOptions(nm=(2, 4), sparse_lora_r=4), "classify")


def test_no_frozen_weight_takes_a_gradient(tiny_llama, topic_jsonl):
    ctx = BuildContext(tiny_llama, "lm", None, 0, 16)
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}

    class Source:
        def __len__(self):
            return 4

        def batch(self, indices):
            return {k: v.repeat(len(indices), 1) for k, v in batch.items()}

    ctx.train_source = Source()
    model = get_method("taskedge").build(TaskEdgeOptions(budget_percent=1), ctx)
    model.loss_batch({**batch, "labels": batch["input_ids"]}).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".values") for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_two_peers_train_the_weights_one_device_trains(tiny_llama, topic_jsonl, tmp_path):
    """`pac-launch --method taskedge`: every peer holds the whole model, calibrates on the same samples of the
    whole training set (so all choose the same entries), and DDP all-reduces the packed values and the head
    alone; the sum of the peers' shares is one device's batch, so the weights match one device's."""
    from launcher.main import main as launch

    options = ["--method", "taskedge", "--budget-percent", "1", "--lr", "1e-2", "--max-length", "32"]
    single, _ = _trained(tiny_llama, topic_jsonl, tmp_path / "one", "classify", "--batch-size", "8")
    out = tmp_path / "two"
    argv = ["--local", "2", "--model", str(tiny_llama), "--data", str(topic_jsonl), "--out", str(out)]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--join-timeout", "90", "--epochs", "2", "--val-size", "12"]
    assert launch([*argv, "--batch-size", "8", *options]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "replicated"
    assert summary["trainable_params"] == json.loads((single / "summary.json").read_text())["trainable_params"]
    expected, got = load_file(single / ADAPTER_WEIGHTS), load_file(out / ADAPTER_WEIGHTS)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        if name.endswith(".index"):
            assert torch.equal(got[name], tensor), name  # the same entries chosen
        else:
            torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_export_merges_lora_and_full_adapters_and_refuses_a_side_network(
    method, tiny_llama, topic_jsonl, tmp_path, capsys
):
    out = tmp_path / method
    argv = train_argv(tiny_llama, topic_jsonl, out, tmp_path / "cache", "--method", method, "--task", "lm")
    assert main([*argv, "--max-length", "32", "--epochs", "1", "--lr", "1e-2"]) == 0
    assert main(["export", "--adapter", str(out), "--out", str(tmp_path / "merged")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    loaded = load_for_inference(out)
    ids = torch.tensor([[3, 4, 5, 6]])
    expected = get_method(method).lm_logits(loaded, ids, torch.ones_like(ids))
    torch.testing.assert_close(exported(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)

    side = tmp_path / "side"
    assert main([*train_argv(tiny_llama, topic_jsonl, side, tmp_path / "cache"), "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["export", "--adapter", str(side), "--out", str(tmp_path / "no")]) == 2
    assert "parallel-adapters adapters are not merged into the model's weights" in capsys.readouterr().err
