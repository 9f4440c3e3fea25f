"""Fine-tuning edge CNNs through the method registry (`pac train --task image-classify`): full fine-tuning pretrains
on digits 0-4, then LoRA, DoRA, GaLore and head + BatchNorm adapt the saved network to unseen digits or corrupted
ones, each saved, loaded and scored again as every other method's adapter is."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file
from torch import nn

from pac.cli import main
from pac.data.images import read_image_data
from pac.errors import PacError
from pac.methods.galore.optimizer import MatrixProjector
from pac.methods.registry import BuildContext
from pac.methods.vision_model import VisionModel, VisionSettings, low_rank_targets
from pac.models.vision import build_network, parse_network
from pac.runtime.trainer import TrainConfig, Trainer
from pac.workflow import DataOptions, OptimOptions, TrainOptions, evaluate_adapter, load_for_inference, train

SMALL = {"train_size": 80, "val_size": 40}


def _train(out, method, data, model, epochs=1, **method_options):
    from pac.methods.registry import get_method

    options = get_method(method).options(**method_options) if method_options else None
    opts = TrainOptions(
        model=model,
        data=DataOptions(data=data, task="image-classify", **SMALL),
        method=method,
        method_options=options,
        optim=OptimOptions(epochs=epochs, batch_size=16),
        out=str(out),
    )
    return train(opts)


@pytest.fixture(scope="module", params=["mobilenet_v2", "resnet18"])
def pretrained(request, tmp_path_factory):
    """A network pretrained on digits 0-4 by `pac train --method full` (the CLI, as a user runs it)."""
    out = tmp_path_factory.mktemp(request.param) / "pretrain"
    argv = ["train", "--task", "image-classify", "--data", "digits:pretrain", "--model", request.param]
    argv += ["--method", "full", "--epochs", "2", "--batch-size", "32", "--train-size", "200", "--out", str(out)]
    assert main(argv) == 0
    return request.param, out


@pytest.mark.parametrize("method", ["lora", "dora", "galore", "head-bn"])
def test_each_method_adapts_the_pretrained_network_and_its_adapter_loads_back(pretrained, method, tmp_path):
    network, start = pretrained
    summary = _train(tmp_path / method, method, "digits:unseen", f"{network}:{start}")
    trained = summary["trainable_params"]
    total = sum(p.numel() for p in build_network(network, 5).parameters())
    if method == "galore":
        assert trained == total  # every weight trains; only the optimizer state is low-rank
    else:
        assert 0 < trained < total * (0.35 if network == "mobilenet_v2" else 0.05)
    loaded = load_for_inference(tmp_path / method)
    scored = evaluate_adapter(loaded, DataOptions(data="digits:unseen", task="image-classify", **SMALL), split="val")
    assert scored["accuracy"] == pytest.approx(summary["epochs"][-1]["val_accuracy"])
    assert scored["samples"] == summary["val_samples"]


def test_low_rank_methods_change_only_their_pairs_and_the_head(pretrained, tmp_path, capsys):
    network, start = pretrained
    _train(tmp_path / "lora", "lora", "digits:shift", f"{network}:{start}")
    base = load_file(start / "adapter_model.safetensors")
    adapter = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert all("lora_" in name or name.startswith(("classifier.", "fc.")) for name in adapter)
    loaded = load_for_inference(tmp_path / "lora").model.network.state_dict()
    for name, value in base.items():  # every weight and BatchNorm statistic of the base, bit for bit
        if not name.startswith(("classifier.", "fc.")):
            wrapped = name if name in loaded else name.replace(".weight", ".base_layer.weight")
            assert torch.equal(loaded[wrapped], value), name
    assert main(["eval", "--adapter", str(tmp_path / "lora"), "--data", "digits:shift"]) == 0
    scored = capsys.readouterr()
    assert "the validation split" in scored.err and 0 <= json.loads(scored.out)["accuracy"] <= 1
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "library_name: pac" in card
    assert "PeftModel" not in card and "pac export" not in card and "--max-length" not in card
    assert main(["export", "--adapter", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")]) == 2
    assert "an image adapter's network is a torch module" in capsys.readouterr().err
    config = json.loads((tmp_path / "lora" / "pac_adapter_config.json").read_text())
    assert (
        config["label_names"] == ["0", "1", "2", "3", "4"] and config["base_model_name_or_path"] == f"{network}:{start}"
    )


def test_the_shift_task_keeps_the_pretrained_head_and_unseen_classes_draw_a_fresh_one(pretrained):
    network, start = pretrained
    spec, head = (
        parse_network(f"{network}:{start}"),
        "classifier.1.weight" if network == "mobilenet_v2" else "fc.weight",
    )
    saved = load_file(start / "adapter_model.safetensors")[head]
    same = VisionModel(spec, ["0", "1", "2", "3", "4"], VisionSettings("head-bn"))
    other = VisionModel(spec, ["5", "6", "7", "8", "9"], VisionSettings("head-bn"))
    assert torch.equal(same.network.state_dict()[head], saved) and same.fresh == []
    assert not torch.equal(other.network.state_dict()[head], saved) and head in other.fresh


def test_depthwise_layers_take_lora_only_at_a_multiple_of_their_channels_and_then_outgrow_the_layer():
    network = build_network("mobilenet_v2", 5)
    frozen_targets, _ = low_rank_targets(network, 4, "frozen")
    targets, ranks = low_rank_targets(network, 4, "lora")
    depthwise = {n for n, m in network.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert len(depthwise) == 17 and not depthwise & set(frozen_targets) and depthwise <= set(targets)
    assert ranks["features.1.conv.0.0"] == 32 and ranks["features.17.conv.1.0"] == 960  # groups = channels
    layer = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False))
    inject_adapter_in_model(LoraConfig(r=32, target_modules=["0"]), layer)
    pair = sum(p.numel() for n, p in layer.named_parameters() if "lora_" in n)
    assert pair == 32 * 32 * 9 + 32 and pair > 32 * 9 * 30  # A: r x C x 3 x 3; the layer has 288 weights


def test_galore_projects_convolution_gradients_as_matrices_and_keeps_low_rank_moments(pretrained, tmp_path):
    network, start = pretrained
    data = read_image_data("digits:shift", seed=0, val_size=40, train_size=64)
    ctx = BuildContext(
        None, "image-classify", data["train"].label_names, 0, 0, network=parse_network(f"{network}:{start}")
    )
    from pac.methods.galore import GaloreOptions
    from pac.methods.galore.run import build, step

    model = build(GaloreOptions(rank=4), ctx)
    before = {n: p.detach().clone() for n, p in model.network.named_parameters()}
    trainer = Trainer(
        model,
        "image-classify",
        data["train"],
        TrainConfig(epochs=1, batch_size=16),
        tmp_path,
        train_step=step(
            GaloreOptions(rank=4), model, "image-classify", data["train"], TrainConfig(epochs=1, batch_size=16)
        ),
    )
    trainer.fit()
    optimizer = trainer.train_step.optimizer
    convs = [m.weight for m in model.network.modules() if isinstance(m, nn.Conv2d) and m.weight[0].numel() > 4]
    for weight in convs:
        state = optimizer.state[weight]
        assert isinstance(state["projector"], MatrixProjector)
        assert 4 in state["exp_avg"].shape and state["exp_avg"].dim() == 2  # (out, 4) or (4, in*k*k)
        assert state["exp_avg"].numel() < weight.numel()
    changed = [n for n, p in model.network.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every weight moved


def test_full_fine_tuning_resumes_exactly_with_its_batchnorm_statistics(tmp_path):
    # One thread: with two, ResNet-18's CPU kernels are not bitwise reproducible even between two uninterrupted
    # runs on some machines (an AVX-512 Xeon under load gave different weights twice in three runs), and a resume
    # can only be as exact as a rerun.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _resume_exactly(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _resume_exactly(tmp_path):
    data = read_image_data("digits:pretrain", seed=0, val_size=20, train_size=64)
    ctx = BuildContext(None, "image-classify", data["train"].label_names, 0, 0, network=parse_network("resnet18"))
    config = TrainConfig(epochs=2, batch_size=16)

    def trainer(out):
        torch.manual_seed(0)
        model = VisionModel(ctx.network, ctx.label_names, VisionSettings("full"))
        return model, Trainer(model, "image-classify", data["train"], config, out, val=data["val"])

    whole, straight = trainer(tmp_path / "straight")
    straight.fit()
    _, cut = trainer(tmp_path / "cut")
    cut.fit(stop_after_steps=5)
    resumed, again = trainer(tmp_path / "cut")
    again.fit()
    assert "bn1.running_mean" in resumed.trained_weights()
    for (name, a), b in zip(whole.network.state_dict().items(), resumed.network.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_image_tasks_refuse_what_cannot_work_and_say_what_to_do(pretrained, tmp_path):
    network, start = pretrained
    with pytest.raises(PacError, match="--model resnet18 is untrained: start from a checkpoint"):
        _train(tmp_path / "a", "lora", "digits:unseen", "resnet18")
    with pytest.raises(PacError, match="does not train --task image-classify: the methods that do are lora, dora"):
        _train(tmp_path / "b", "parallel-adapters", "digits", "resnet18")
    with pytest.raises(PacError, match="fine-tunes one of pac's CNNs: --model mobilenet_v2 or resnet18"):
        _train(tmp_path / "c", "full", "digits", "vgg16")
    other = "resnet18" if network == "mobilenet_v2" else "mobilenet_v2"
    with pytest.raises(PacError, match=f"holds a {network}, not a {other}"):
        _train(tmp_path / "d", "lora", "digits:shift", f"{other}:{start}")
    with pytest.raises(PacError, match="does not train --task classify"):
        train(TrainOptions(method="head-bn", out=str(tmp_path / "e")))
    _train(tmp_path / "f", "head-bn", "digits:unseen", f"{network}:{start}")
    with pytest.raises(PacError, match="does not hold a whole network to start from: pretrain with --method full"):
        _train(tmp_path / "g", "lora", "digits:unseen", f"{network}:{tmp_path / 'f'}")
    loaded = load_for_inference(tmp_path / "f")
    with pytest.raises(PacError, match="tells apart 5, 6, 7, 8, 9, and these images are labelled 0, 1, 2, 3, 4"):
        evaluate_adapter(loaded, DataOptions(data="digits:pretrain", task="image-classify"))


def test_pac_launch_refuses_an_image_task_naming_pac_train(tmp_path, capsys):
    from launcher.main import main as launch

    argv = ["--local", "2", "--task", "image-classify", "--data", "digits", "--model", "resnet18", "--method", "full"]
    assert launch([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "an edge CNN trains on one device: pac train --task image-classify" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_low_rank_pairs_on_depthwise_layers_train_at_peft_s_rank(method, tmp_path):
    checkpoint = tmp_path / "mobilenet_v2.pth"
    torch.save(build_network("mobilenet_v2", 5).state_dict(), checkpoint)
    spec = parse_network(f"mobilenet_v2:{checkpoint}")
    model = VisionModel(spec, [str(i) for i in range(5)], VisionSettings(method, r=2, depthwise="lora"))
    depthwise = model.network.features[1].conv[0][0]  # 32 channels in 32 groups
    assert depthwise.lora_A["default"].weight.shape == (32, 32, 3, 3)  # rank 2 rounded up to the groups
    model.train()
    loss = model.loss_batch({"images": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 3])})
    loss.backward()
    assert depthwise.lora_B["default"].weight.grad.abs().sum() > 0  # B starts at zero: its gradient comes first
    assert depthwise.base_layer.weight.grad is None  # the layer itself stays frozen
