"""`pac profile`: what a training step of a method costs before training. FLOPs from torch's FlopCounterMode, memory by
category from torch's MemTracker (a private API, checked here on the torch pac runs with), parameters per layer type,
and a predicted peak that a real training process's peak resident memory must match within 15%."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from pac.cli import main
from pac.methods.vision_model import VisionModel, VisionSettings
from pac.models.vision import build_network, parse_network
from pac.runconfig import DataOptions, OptimOptions, TrainOptions
from pac.runtime.memtrack import peak_by_category
from pac.runtime.step_profile import (
    flop_counter,
    in_fresh_process,
    measured_training_steps,
    parameters_by_layer_type,
    profile_in_this_process,
    with_method,
)

MB = 2**20
# ResNet-18's forward at 224 pixels: 1.814 G multiply-adds per image; at 32 pixels every map is 1/49 of the size.
RESNET18_FLOPS_PER_IMAGE_32 = 2 * 1.814e9 / 49


def test_memtracker_attributes_a_step_to_parameters_gradients_optimizer_state_and_activations():
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512))
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(4096, 512)  # activations larger than the weights: the peak falls in backward

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    peak = peak_by_category(model, optimizer, step)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert peak["parameters"] == weights
    assert 2 * weights <= peak["optimizer_state"] <= 2 * weights + 4 * 8  # two moments, and a step count per tensor
    assert peak["gradients"] <= weights and peak["activations"] >= 4096 * 1024 * 4  # the hidden layer's output
    assert peak["total"] == sum(v for k, v in peak.items() if k != "total")


def test_memtracker_takes_frozen_weights_beside_trainable_ones():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    model[0].requires_grad_(False)  # as beside an adapter: torch refuses a gradient hook on these
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(torch.randn(4, 64)).sum().backward()
        optimizer.step()

    peak = peak_by_category(model, optimizer, step)
    assert peak["gradients"] <= (64 * 8 + 8) * 4 and peak["optimizer_state"] >= 2 * (64 * 8 + 8) * 4


def _image_run(method: str, batch: int, model: str = "resnet18", data: str | None = None) -> TrainOptions:
    base = TrainOptions(
        model=model, data=DataOptions(task="image-classify", data=data), optim=OptimOptions(batch_size=batch)
    )
    return with_method(base, method, {})


def test_flops_split_into_forward_backward_and_optimizer_as_the_shapes_say():
    full = profile_in_this_process(_image_run("full", 8))["flops"]
    assert full["forward"] / 8 == pytest.approx(RESNET18_FLOPS_PER_IMAGE_32, rel=0.02)
    # backward: the input's and the weights' gradients, each about a forward (the first convolution's input needs none)
    assert 1.8 < full["backward"] / full["forward"] < 2.0
    assert full["optimizer"] == pytest.approx(12 * 11_181_642, rel=0.01)  # Adam's elementwise work, no products
    lora = profile_in_this_process(_image_run("lora", 8))["flops"]
    assert 1.0 < lora["backward"] / lora["forward"] < 1.15  # the frozen weights need no gradient: a pass less
    depthwise = profile_in_this_process(_image_run("full", 8, model="mobilenet_v2"))["flops"]
    assert 1.8 < depthwise["backward"] / depthwise["forward"] < 2.1  # torch alone counts 20x (grouped weight grads)
    galore = profile_in_this_process(_image_run("galore", 8))["flops"]
    assert galore["optimizer"] > full["optimizer"]  # the projections in and out are matrix products


@pytest.mark.parametrize("groups", [1, 4, 64])
def test_a_grouped_convolutions_backward_counts_its_weight_gradient_per_group(groups):
    conv = nn.Conv2d(64, 64, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(8, 64, 16, 16, requires_grad=True)
    forward = 2 * 8 * 16 * 16 * 9 * 64 * (64 // groups)  # multiply-adds x 2 per output element
    y = conv(x)
    with flop_counter() as counter:
        y.sum().backward()
    assert counter.get_total_flops() == 2 * forward  # the input's gradient and the weights', a forward each


def test_parameters_per_layer_type_show_a_depthwise_lora_pair_outgrowing_its_layer(tmp_path):
    checkpoint = tmp_path / "mobilenet_v2.pth"
    torch.save(build_network("mobilenet_v2", 5).state_dict(), checkpoint)
    spec, labels = parse_network(f"mobilenet_v2:{checkpoint}"), [str(i) for i in range(5)]
    frozen = parameters_by_layer_type(VisionModel(spec, labels, VisionSettings("lora", r=4)))
    tuned = parameters_by_layer_type(VisionModel(spec, labels, VisionSettings("lora", r=4, depthwise="lora")))
    full = VisionModel(spec, labels, VisionSettings("full"))
    assert sum(c["total"] for c in parameters_by_layer_type(full).values()) == sum(p.numel() for p in full.parameters())
    assert frozen["depthwise"]["layers"] == 17 and frozen["depthwise"]["trainable"] == 0
    assert frozen["pointwise"]["trainable"] < 0.05 * frozen["pointwise"]["total"]
    assert tuned["depthwise"]["trainable"] > 10 * tuned["depthwise"]["total"]  # A alone is r x C x 3 x 3, r >= C


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_predicted_peak_matches_a_real_training_process_within_15_percent(method, tmp_path):
    run = _image_run(method, 64, model="resnet18", data="digits:pretrain")
    if method == "lora":  # an adapter needs a trained start: a torchvision-format checkpoint of fresh weights
        torch.save(build_network("resnet18", 5).state_dict(), tmp_path / "r18.pth")
        run.model = f"resnet18:{tmp_path / 'r18.pth'}"
    predicted = in_fresh_process(profile_in_this_process, run)
    measured = in_fresh_process(measured_training_steps, run)
    assert predicted["predicted_peak_rss_mb"] == pytest.approx(measured["peak_rss_mb"], rel=0.15)
    tracked = sum(v for k, v in predicted["memory_mb"].items() if k not in ("runtime_floor", "untracked"))
    assert tracked == pytest.approx(predicted["tracked_peak_mb"])
    trainable_mb = predicted["trainable_params"] * 4 / MB  # Adam's two moments of every trainable weight
    assert predicted["memory_mb"]["optimizer_state"] == pytest.approx(2 * trainable_mb, rel=0.01)


def test_pac_profile_compares_methods_in_a_table_json_and_chart(tmp_path, capsys):
    out = tmp_path / "profile"
    argv = ["profile", "--task", "image-classify", "--model", "mobilenet_v2", "--compare", "lora,head-bn"]
    assert main([*argv, "--batch-size", "4", "--lora-r", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| lora |" in printed and "| head-bn | depthwise | 17 |" in printed
    profiles = json.loads((out / "profile.json").read_text())
    assert [p["method"] for p in profiles] == ["lora", "head-bn"] and profiles[0]["model"] == "mobilenet_v2"
    assert profiles[0]["trainable_params"] > profiles[1]["trainable_params"] > 0
    with Image.open(out / "profile.png") as chart:
        assert chart.size[0] > 800
    assert "## Parameters per layer type" in (out / "profile.md").read_text()


def test_pac_profile_refuses_a_method_that_does_not_train_the_task(capsys):
    assert main(["profile", "--task", "image-classify", "--compare", "lora,parallel-adapters"]) == 2
    assert "--method parallel-adapters does not train --task image-classify" in capsys.readouterr().err
    assert main(["profile", "--compare", "lora,sparse"]) == 2
    assert "--method must be one of" in capsys.readouterr().err
