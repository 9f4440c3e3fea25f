"""pac's MobileNetV2 and ResNet-18: torchvision's parameter names and shapes (so its checkpoints load), their
reference sizes, and clear refusals of checkpoints that do not fit."""

from __future__ import annotations

import pytest
import torch

from pac.errors import ModelError
from pac.models.vision import MobileNetV2, ResNet18, build_network, load_torchvision_weights

# torchvision's own figures for the ImageNet models (1,000 classes): parameters and state-dict entries.
REFERENCE = {"mobilenet_v2": (3_504_872, 314), "resnet18": (11_689_512, 122)}
# A few entries of torchvision's layouts, with their shapes.
LAYOUT = {
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),  # t = 1: the block starts depthwise
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.1.running_var": (1280,),
        "classifier.1.weight": (1000, 1280),
    },
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer4.1.bn2.running_var": (512,),
        "fc.weight": (1000, 512),
    },
}


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_the_networks_have_torchvisions_names_shapes_and_sizes(name):
    model = build_network(name, 1000)
    state = model.state_dict()
    assert (sum(p.numel() for p in model.parameters()), len(state)) == REFERENCE[name]
    for key, shape in LAYOUT[name].items():
        assert tuple(state[key].shape) == shape, key
    assert build_network(name, 10).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_torchvision_checkpoint_loads_all_but_a_head_of_another_size(tmp_path):
    imagenet = MobileNetV2(1000).eval()
    torch.save(imagenet.state_dict(), tmp_path / "mobilenet_v2.pth")
    digits = MobileNetV2(10).eval()
    fresh = load_torchvision_weights(digits, tmp_path / "mobilenet_v2.pth")
    assert fresh == ["classifier.1.bias", "classifier.1.weight"]
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(digits.features(images), imagenet.features(images))
    same = ResNet18(1000)
    torch.save({"state_dict": same.state_dict()}, tmp_path / "wrapped.pth")  # a training checkpoint's wrapping
    assert load_torchvision_weights(ResNet18(1000), tmp_path / "wrapped.pth") == []


def test_a_checkpoint_that_does_not_fit_is_refused_by_name(tmp_path):
    torch.save(ResNet18(10).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ModelError, match=r"not a torchvision MobileNetV2 state dict \(unknown: bn1\.bias"):
        load_torchvision_weights(MobileNetV2(10), tmp_path / "resnet.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "resnet.pth").read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot read .*cut.pth as a PyTorch state dict"):
        load_torchvision_weights(ResNet18(10), tmp_path / "cut.pth")
    with pytest.raises(ModelError, match="unknown network 'vgg16': pac defines mobilenet_v2, resnet18"):
        build_network("vgg16", 10)
