"""Quality levers of the side network: pruned init, tap norm, trainable final norm, vocab bias,
and the factored LM head (exactly equal to the plain one)."""

from __future__ import annotations

import pytest
import torch
from conftest import eval_on_validation

from pac.methods.parallel_adapters import ParallelAdapterConfig, ParallelAdapterModel, initialize_pruned
from pac.models.backbone import load_backbone, load_config
from pac.models.prune import kept_head_dims, select_channels
from pac.models.side import SideNetwork


def _taps(backbone, taps, length=10):
    ids = torch.randint(3, backbone.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad():
        out = backbone(ids, mask)
    return torch.stack([out.taps[t] for t in taps], 1), mask, out


def _lm_batch(backbone, taps):
    """Taps of random ids with next-token labels (-100 on padding), as the cache's batches look."""
    taps, mask, _ = _taps(backbone, taps)
    labels = torch.where(mask.bool(), torch.randint(3, 100, mask.shape), torch.full_like(mask, -100))
    return {"taps": taps, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, loss_fn):
    """The loss `loss_fn()` gives and the gradients it leaves on `model`'s parameters."""
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class OneBatch:
    """A batch source (pac.runtime.trainer.BatchSource) over the samples of one batch."""

    def __init__(self, batch):
        self.samples = batch

    def __len__(self):
        return self.samples["labels"].shape[0]

    def batch(self, indices):
        return {k: v[indices] for k, v in self.samples.items()}


def test_factored_lm_head_equals_the_plain_one(tiny_llama):
    backbone = load_backbone(tiny_llama)
    model = ParallelAdapterModel(backbone, ParallelAdapterConfig(task="lm", reduction=4, tap_norm=True))
    with torch.no_grad():
        model.side.up.weight.normal_(0, 0.3)
        model.side.up.bias.normal_(0, 0.3)
    taps, mask, out = _taps(backbone, model.taps)
    plain = backbone.logits(backbone.final_norm(out.hidden) + model.side(taps, mask))
    torch.testing.assert_close(model(taps, mask), plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side_network", [True, False])
def test_readout_mlp_starts_as_the_backbone_and_corrects_at_full_rank(tiny_llama, side_network):
    backbone = load_backbone(tiny_llama)
    config = ParallelAdapterConfig(task="lm", reduction=4, readout_hidden=24, side_network=side_network)
    model = ParallelAdapterModel(backbone, config)
    taps, mask, out = _taps(backbone, model.taps)
    base = backbone.final_norm(out.hidden)
    torch.testing.assert_close(model(taps, mask), backbone.logits(base), rtol=0, atol=0)
    with torch.no_grad():
        model.readout_mlp.out.weight.normal_(0, 0.3)
        side_state = model.side.state(taps, mask) if side_network else None
        correction = model.readout_mlp(side_state, base)
    # Up(s) spans at most d/r = 16 directions of the 64-wide hidden space; the MLP's correction more.
    assert torch.linalg.matrix_rank(correction.reshape(-1, 64)) > 16
    torch.testing.assert_close(model(taps, mask), backbone.logits(base + correction), rtol=1e-4, atol=1e-4)


def test_side_heads_make_fewer_wider_heads(tiny_llama):
    from pac.errors import PacError

    config = load_config(tiny_llama)  # 64 wide, 4 heads, 2 key/value heads
    side = SideNetwork(config, taps=[0, 2, 4], reduction=2, heads=1)
    attention = side.blocks[0].self_attn
    assert (side.config.num_attention_heads, side.config.head_dim, side.config.num_key_value_heads) == (1, 32, 1)
    assert attention.q_proj.weight.shape == (32, 32) and attention.k_proj.weight.shape == (32, 32)
    taps = torch.randn(2, 3, 5, 64)
    assert side(taps, torch.ones(2, 5, dtype=torch.long)).shape == (2, 5, 64)
    with pytest.raises(PacError, match="side_heads"):
        ParallelAdapterConfig(task="lm", side_init="pruned", side_heads=1)


def test_readout_mlp_refuses_the_side_only_readout():
    from pac.errors import PacError

    with pytest.raises(PacError, match="readout=sum"):
        ParallelAdapterConfig(task="classify", label_names=["a", "b"], readout="side", readout_hidden=8)


def test_pruned_init_keeps_step0_and_copies_the_backbone(tiny_llama):
    backbone = load_backbone(tiny_llama)
    model = ParallelAdapterModel(backbone, ParallelAdapterConfig(task="lm", reduction=4, side_init="pruned"))
    taps, mask, out = _taps(backbone, model.taps)
    channels = initialize_pruned(model, tiny_llama, taps)
    assert len(channels) == 16 and channels.unique().numel() == 16
    # Down_i selects the kept channels; the first block's q_proj is the backbone's, pruned.
    torch.testing.assert_close(model.side.down_weight[0] @ taps[0, 0, 0], taps[0, 0, 0, channels])
    q_rows = kept_head_dims(4, 16, 4)
    expected = backbone.layers[0].self_attn.q_proj.weight[q_rows][:, channels]
    torch.testing.assert_close(model.side.blocks[0].self_attn.q_proj.weight, expected)
    logits = model(taps, mask)  # Up is still zero: the model answers like the backbone
    torch.testing.assert_close(logits, backbone.logits(backbone.final_norm(out.hidden)), rtol=0, atol=1e-5)


def test_kept_head_dims_keep_the_rope_frequencies(tiny_llama):
    config = load_config(tiny_llama)
    side = SideNetwork(config, taps=[0, 4], reduction=4)
    backbone = load_backbone(tiny_llama)
    kept = kept_head_dims(1, config.head_dim, side.config.head_dim)  # dims of one head
    half = side.config.head_dim // 2
    # the side head's frequency k belongs to backbone dim kept[k] (pairs (j, j + head_dim/2) stay together)
    assert torch.equal(kept[half:], kept[:half] + config.head_dim // 2)
    torch.testing.assert_close(side.rotary.inv_freq, backbone.rotary.inv_freq[kept[:half]])


def test_channel_selection_skips_massive_outliers():
    mean_abs = torch.tensor([5.0, 1.0, 900.0, 2.0, 3.0, 0.5])
    max_abs = torch.tensor([9.0, 2.0, 29000.0, 4.0, 5.0, 1.0])
    assert select_channels(mean_abs, max_abs, width=3, outliers=1).tolist() == [0, 3, 4]


def test_final_norm_and_vocab_bias_train_and_are_saved(tiny_llama):
    top = load_backbone(tiny_llama, 4, 4, with_head=True)
    config = ParallelAdapterConfig(task="lm", reduction=4, train_final_norm=True, vocab_bias=True, dropout=0.1)
    model = ParallelAdapterModel(top, config)
    saved = model.trainable_state_dict()
    assert "final_norm.weight" in saved and saved["vocab_bias"].shape == (top.config.vocab_size,)
    assert not any(k.startswith("top.") for k in saved)
    assert model.final_norm.weight.requires_grad and not top.norm.weight.requires_grad
    with pytest.raises(Exception, match="side_init"):
        ParallelAdapterConfig(task="lm", side_init="magic")
    with pytest.raises(Exception, match="readout=side"):
        ParallelAdapterConfig(task="lm", readout="side")


def test_side_only_readout_ignores_the_backbone_output(tiny_llama):
    top = load_backbone(tiny_llama, 4, 4, with_head=True)
    torch.manual_seed(0)
    config = ParallelAdapterConfig(task="classify", reduction=4, readout="side", label_names=["a", "b"])
    model = ParallelAdapterModel(top, config)
    taps = torch.randn(2, len(model.taps), 6, top.hidden_size)
    mask = torch.ones(2, 6, dtype=torch.long)
    changed = taps.clone()
    changed[:, -1] += 5.0  # h_L moves, the side network's own input h_L too: only the sum readout sees it directly
    torch.nn.init.normal_(model.side.up.weight)
    assert not torch.equal(model(taps, mask), model(changed, mask))
    model.side.up.weight.data.zero_()
    model.side.up.bias.data.zero_()
    # With Up at zero the side output is 0 whatever the taps, so the side-only head sees no input at all.
    torch.testing.assert_close(model(taps, mask), model(changed, mask))
    summed = ParallelAdapterModel(top, ParallelAdapterConfig(task="classify", reduction=4, label_names=["a", "b"]))
    assert not torch.equal(summed(taps, mask), summed(changed, mask))  # the default reads h_L itself


def test_baselines_without_side_network(tiny_llama, topic_jsonl, tmp_path):
    """Linear probe (head only) and head + final norm: the same cache and trainer, no side network."""
    from pac.cli import main

    argv = ["train", "--model", str(tiny_llama), "--data", str(topic_jsonl), "--val-size", "12", "--epochs", "1"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--no-side-network"]
    assert main([*argv, "--out", str(tmp_path / "probe")]) == 0
    assert main([*argv, "--out", str(tmp_path / "norm"), "--train-final-norm"]) == 0
    import json

    probe = json.loads((tmp_path / "probe" / "summary.json").read_text())
    norm = json.loads((tmp_path / "norm" / "summary.json").read_text())
    assert probe["trainable_params"] == 64 * 3 + 3  # the head only
    assert norm["trainable_params"] == probe["trainable_params"] + 64
    assert json.loads((tmp_path / "probe" / "pac_adapter_config.json").read_text())["side_network"] is False


def test_boundary_variant_caches_one_layer_and_trains_lora_above_it(tiny_llama, topic_jsonl, tmp_path, capsys):
    import json

    from pac.cli import main

    out = tmp_path / "boundary"
    argv = ["train", "--model", str(tiny_llama), "--data", str(topic_jsonl), "--val-size", "12", "--epochs", "2"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--method", "boundary", "--boundary-layer", "2", "--lr", "5e-3"]
    assert main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cache_bytes_per_sample"] < 2 * 128 * 64 * 2  # one tap (h_2) of 64 channels in fp16
    saved = json.loads((out / "pac_adapter_config.json").read_text())
    assert saved["peft_type"] == "BOUNDARY_LORA" and saved["boundary_layer"] == 2
    capsys.readouterr()
    assert main(eval_on_validation(out, tiny_llama, topic_jsonl)) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(summary["epochs"][-1]["val_accuracy"])


@pytest.mark.parametrize(("train_final_norm", "readout_hidden"), [(False, 0), (True, 0), (False, 24), (True, 24)])
def test_chunked_lm_loss_equals_the_plain_loss_and_its_gradients(tiny_llama, train_final_norm, readout_hidden):
    from pac.methods.base import task_loss

    backbone = load_backbone(tiny_llama)
    config = ParallelAdapterConfig(
        task="lm", reduction=4, vocab_bias=True, train_final_norm=train_final_norm, readout_hidden=readout_hidden
    )
    model = ParallelAdapterModel(backbone, config)
    with torch.no_grad():
        model.side.up.weight.normal_(0, 0.3)
        model.vocab_bias.normal_(0, 0.3)
        if readout_hidden:
            model.readout_mlp.out.weight.normal_(0, 0.3)
    batch = _lm_batch(backbone, model.taps)
    labels = batch["labels"]

    plain, plain_grads = _loss_and_grads(model, lambda: task_loss("lm", model.forward_batch(batch), labels))
    chunked, chunked_grads = _loss_and_grads(model, lambda: model.loss_batch(batch))
    torch.testing.assert_close(chunked, plain)
    assert plain_grads.keys() == chunked_grads.keys() and "side.up.weight" in plain_grads
    assert ("final_norm.weight" in plain_grads) == train_final_norm
    assert ("readout_mlp.inp.weight" in plain_grads) == bool(readout_hidden)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # Evaluation uses the same lean loss: its sums equal the plain metrics of the full logits.
    from pac.methods.base import batch_metrics, summarize
    from pac.runtime.trainer import evaluate

    with torch.no_grad():
        expected = summarize("lm", batch_metrics("lm", model.forward_batch(batch), labels))
    result = evaluate(model, OneBatch(batch), "lm")
    assert result == pytest.approx(expected, rel=1e-5)


def test_bf16_training_steps_match_fp32_and_keep_float32_weights(tiny_llama, tmp_path):
    """--precision bf16: the lean LM loss under autocast is the plain loss's bf16 twin (close to fp32),
    and a real training step leaves weights, gradients and optimizer state in float32."""
    from pac.runtime.step import autocast
    from pac.runtime.trainer import TrainConfig, Trainer

    backbone = load_backbone(tiny_llama)
    model = ParallelAdapterModel(backbone, ParallelAdapterConfig(task="lm", reduction=4))
    with torch.no_grad():
        model.side.up.weight.normal_(0, 0.3)
    batch = _lm_batch(backbone, model.taps)

    def loss_in(precision):
        with autocast(precision):
            return model.loss_batch(batch)

    exact, exact_grads = _loss_and_grads(model, lambda: loss_in("fp32"))
    low, low_grads = _loss_and_grads(model, lambda: loss_in("bf16"))
    assert low.dtype == torch.float32 and low != exact  # really computed in bf16
    torch.testing.assert_close(low, exact, rtol=2e-2, atol=0)
    for name, grad in exact_grads.items():
        assert low_grads[name].dtype == torch.float32, name
        cosine = torch.nn.functional.cosine_similarity(low_grads[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))

    trainer = Trainer(model, "lm", OneBatch(batch), TrainConfig(epochs=2, batch_size=2, precision="bf16"), tmp_path)
    epochs = trainer.fit()
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    optimizer = trainer.train_step.optimizer  # the default step's, pac.runtime.step.BackpropStep
    assert all(v.dtype == torch.float32 for st in optimizer.state.values() for v in st.values() if v.dim())
    with pytest.raises(ValueError, match="unknown precision"):
        autocast("fp8")


def _train_boundary_lm(tiny_llama, topic_jsonl, tmp_path, capsys, options: list[str]) -> tuple[dict, dict]:
    """`pac train --method boundary --boundary-layer 2 --reduction 4` on LM with `options`; checks that
    `pac eval` of the saved adapter gives the last epoch's validation loss; returns its config and tensors."""
    import json

    from pac.cli import main
    from pac.methods.base import load_adapter

    out = tmp_path / "boundary"
    argv = ["--model", str(tiny_llama), "--data", str(topic_jsonl), "--val-size", "12", "--task", "lm"]
    train = ["train", *argv, "--epochs", "2", "--cache-dir", str(tmp_path / "cache"), "--method", "boundary"]
    train += ["--boundary-layer", "2", "--reduction", "4", *options, "--lr", "5e-3", "--out", str(out)]
    assert main(train) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), *argv, "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(summary["epochs"][-1]["val_loss"], rel=1e-4)
    return load_adapter(out)


def test_boundary_side_network_starts_as_plain_boundary_and_trains_beside_lora(
    tiny_llama, topic_jsonl, tmp_path, capsys
):
    """With a side network beside layers k..L: at step 0 the logits are those of LoRA alone (Up is
    zero), the side network gets the parallel adapters' learning rate, and the saved adapter evaluates
    to the figure training reported."""

    from pac.methods.boundary import SIDE_LR_RATIO, BoundaryModel

    num_layers = load_config(tiny_llama).num_hidden_layers
    h_k = torch.randn(2, 1, 10, 64)
    batch = {"taps": h_k, "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    models = []
    for side in (None, 4):
        torch.manual_seed(0)
        upper = load_backbone(tiny_llama, 2, num_layers, with_head=True)
        models.append(BoundaryModel(upper, "lm", None, "mean", r=4, side_reduction=side).eval())
    with torch.no_grad():
        torch.testing.assert_close(models[1].forward_batch(batch), models[0].forward_batch(batch))
    lora_group, side_group = models[1].param_groups(1e-3)
    assert side_group["lr"] == pytest.approx(SIDE_LR_RATIO * 1e-3) and lora_group["lr"] == 1e-3
    assert {id(p) for p in side_group["params"]} == {id(p) for p in models[1].side.parameters()}

    config, tensors = _train_boundary_lm(tiny_llama, topic_jsonl, tmp_path, capsys, ["--boundary-side"])
    assert config["side_reduction"] == 4
    assert tensors["side.up.weight"].abs().sum() > 0  # the side network trained
    assert any("lora_B" in name and t.abs().sum() > 0 for name, t in tensors.items())  # and so did LoRA


def test_boundary_side_network_below_feeds_h_k_through_the_frozen_top_layers(tiny_llama, topic_jsonl, tmp_path, capsys):
    """A side network over layers 0..k adds its output to h_k: at step 0 the model is the backbone
    itself (Up is zero); with --lora-r 0 only the side network trains, and its gradient comes back
    through the frozen top layers; the saved adapter evaluates to the figure training reported."""

    from pac.errors import PacError
    from pac.methods.boundary import BoundaryModel

    backbone = load_backbone(tiny_llama)
    num_layers = backbone.num_layers
    upper = load_backbone(tiny_llama, 2, num_layers, with_head=True)
    model = BoundaryModel(upper, "lm", None, "mean", r=0, below_reduction=4)
    assert model.taps == [0, 1, 2]
    taps, mask, out = _taps(backbone, model.taps)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_batch({"taps": taps, "attention_mask": mask}),
            backbone.logits(backbone.final_norm(out.hidden)),
            rtol=1e-4,
            atol=1e-4,
        )
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"below"}
    with pytest.raises(PacError, match="beside the top layers or below"):
        BoundaryModel(upper, "lm", None, "mean", r=4, side_reduction=4, below_reduction=4)
    with pytest.raises(PacError, match="lora-r"):
        BoundaryModel(upper, "lm", None, "mean", r=0)

    below = ["--boundary-side-below", "--lora-r", "0"]
    config, tensors = _train_boundary_lm(tiny_llama, topic_jsonl, tmp_path, capsys, below)
    assert config["below_reduction"] == 4 and config["r"] == 0
    assert tensors["below.up.weight"].abs().sum() > 0 and not any("lora_" in name for name in tensors)
