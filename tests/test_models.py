"""The zoo's contract, model by model: shapes, gradients, embeddings, CAM layer, layer groups, sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from lungscreen.errors import ConfigError
from lungscreen.models import complexity, count_parameters, create, list_models, model_info

# Two input sides per model: its minimum and a small training size. Conv8 keeps the authors' unpadded
# convolutions (>= 766 px); squeezenet_ct at 35 px needs no resize before its skip concat, at 64 px it does.
SIZES = {
    "conv8": (766, 800),
    "squeezenet1_0": (21, 64),
    "squeezenet1_0_bypass": (21, 64),
    "squeezenet1_1": (17, 64),
    "squeezenet1_1_bypass": (17, 64),
    "squeezenet_ct": (35, 64),
}
CLASSIFIERS = list_models(task="classification") + list_models(task="multilabel")
CHEAP = [name for name in CLASSIFIERS if name != "covidnet"]  # the 117 M-parameter one is checked apart


def sizes(name: str) -> tuple[int, int]:
    return SIZES.get(name, (32, 64))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", CHEAP)
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_and_backward_at_two_sizes(name: str, channels: int) -> None:
    model = create(name, num_classes=3, in_channels=channels)
    for side in sizes(name):
        model.zero_grad(set_to_none=True)
        logits = model(torch.randn(2, channels, side, side))
        assert logits.shape == (2, 3)
        assert torch.isfinite(logits).all()
        logits.square().mean().backward()
        no_gradient = [n for n, p in model.named_parameters() if p.grad is None]
        assert not no_gradient, f"{name} at {side}px: parameters outside the graph: {no_gradient[:5]}"


@pytest.mark.parametrize("name", CHEAP)
def test_features_feed_the_classifier_and_cam_layer_is_spatial(name: str) -> None:
    model = create(name, num_classes=4).eval()
    seen: list[torch.Tensor] = []
    handle = model.cam_layer.register_forward_hook(lambda module, args, output: seen.append(output))
    side = sizes(name)[1]
    x = torch.randn(2, 1, side, side + 8)  # any height and width above the minimum
    with torch.no_grad():
        embedding = model.features(x)
        logits = model(x)
    handle.remove()
    assert embedding.dim() == 2 and embedding.shape[0] == 2
    torch.testing.assert_close(model.classifier(embedding), logits)
    assert any(module is model.cam_layer for module in model.modules())
    maps = seen[0]
    assert maps.dim() == 4 and maps.shape[0] == 2 and maps.shape[-1] >= 1


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_layer_groups_partition_the_parameters_and_end_with_the_head(name: str) -> None:
    with torch.device("meta"):
        model = create(name)
    groups = model.layer_groups()
    assert len(groups) >= 3 and groups[-1] is model.classifier
    ids = [id(p) for group in groups for p in group.parameters()]
    assert len(ids) == len(set(ids)), "a parameter sits in two groups"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter sits in no group"


@pytest.mark.parametrize("name", ["squeezenet1_0", "squeezenet1_1", "squeezenet_ct", "covidnet_tiny"])
def test_min_input_size_is_the_smallest_that_works(name: str) -> None:
    model = create(name).eval()
    side = model.min_input_size
    assert side == model_info(name).min_input_size
    with torch.no_grad():
        assert model(torch.zeros(1, 1, side, side)).shape == (1, 3)
        if name != "covidnet_tiny":  # squeezenets are exact; covidnet rounds up to its stride, 32
            with pytest.raises(RuntimeError):
                model(torch.zeros(1, 1, side - 1, side - 1))


def test_conv8_minimum_follows_its_padding() -> None:
    padded = create("conv8", padding=1).eval()
    assert padded.min_input_size == 256
    with torch.no_grad():
        assert padded(torch.zeros(1, 1, 256, 256)).shape == (1, 3)
        with pytest.raises(RuntimeError):
            padded(torch.zeros(1, 1, 255, 255))
        with pytest.raises(RuntimeError):
            create("conv8").eval()(torch.zeros(1, 1, 765, 765))


def test_covidnet_as_published_size_and_one_small_forward() -> None:
    cost = complexity("covidnet", in_channels=3, num_classes=3)
    assert abs(cost.parameters - 117.4e6) / 117.4e6 < 0.10
    assert abs(cost.macs - 2.26e9) / 2.26e9 < 0.10
    model = create("covidnet", num_classes=3, in_channels=1).eval()
    assert model.pool.output_size == 7 and model.fc[2].in_features == 7 * 7 * 2048
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 3)
        assert model.features(torch.randn(1, 1, 40, 48)).shape == (1, 1024)


def test_covidnet_variants_are_small_enough_for_a_cpu() -> None:
    small, tiny = complexity("covidnet_small"), complexity("covidnet_tiny")
    assert tiny.parameters < small.parameters < 10e6
    assert tiny.macs < small.macs < 1e9


def test_light_ct_cnn_is_near_the_papers_count() -> None:
    # paper 002, Table 7: 1.26 M; the transposed conv's width is not published (see the module docstring)
    count = complexity("squeezenet_ct", in_channels=3, num_classes=2).parameters
    assert abs(count - 1.26e6) / 1.26e6 < 0.02


@pytest.mark.parametrize("version", ["1_0", "1_1"])
def test_squeezenet_body_is_torchvisions(version: str) -> None:
    reference = getattr(torchvision.models, f"squeezenet{version}")(weights=None)
    ours = create(f"squeezenet{version}", num_classes=1000, in_channels=3)
    assert count_parameters(ours) == count_parameters(reference)
    assert count_parameters(ours.body) == count_parameters(reference.features)


def test_bypass_adds_identity_shortcuts_to_fires_3_5_7_9() -> None:
    model = create("squeezenet1_1_bypass")
    fires = [layer for layer in model.body if hasattr(layer, "bypass")]
    assert [fire.bypass for fire in fires] == [False, True, False, True, False, True, False, True]
    fire = fires[1].eval()
    x = torch.randn(1, 128, 9, 9)
    fire.bypass = False
    plain = fire(x)
    fire.bypass = True
    torch.testing.assert_close(fire(x), plain + x)


def test_light_ct_fire_modules_have_batch_norm_before_elu() -> None:
    model = create("squeezenet_ct")
    fire2 = model.body[3]
    assert isinstance(fire2.squeeze_activation[0], nn.BatchNorm2d)
    assert isinstance(fire2.squeeze_activation[1], nn.ELU) and isinstance(fire2.expand3x3_activation, nn.ELU)
    assert not any(isinstance(module, nn.ReLU) for module in model.modules())
    assert model.upsample.stride == (4, 4) and model.mix[0].out_channels == 128


def test_paper_heads() -> None:
    covid_resnet = create("covid_resnet", num_classes=4)
    linears = [m for m in covid_resnet.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4096, 512), (512, 4)]
    assert [type(m).__name__ for m in covid_resnet.classifier] == [
        "BatchNorm1d", "Dropout", "Linear", "ReLU", "BatchNorm1d", "Dropout", "Linear"]
    assert len(covid_resnet.layer_groups()) == 3  # fastai's split behind the paper's discriminative rates
    assert abs(count_parameters(covid_resnet) - 25.6e6) < 0.05e6  # paper 003, Table 1: 25.6 M

    resnet18 = create("resnet18", num_classes=2)
    assert resnet18.body.conv1.in_channels == 1
    assert [(m.in_features, m.out_features) for m in resnet18.classifier if isinstance(m, nn.Linear)] == [
        (512, 256), (256, 2)]

    densenet = create("densenet121", num_classes=14)
    assert model_info("densenet121").task == "multilabel" and densenet.classifier.out_features == 14


def test_resnet_width_scales_every_stage_and_keeps_the_contract() -> None:
    narrow = create("resnet18", num_classes=3, width=32)
    stage_widths = [layer[-1].conv2.out_channels for layer in (narrow.body.layer1, narrow.body.layer2,
                                                                narrow.body.layer3, narrow.body.layer4)]
    assert stage_widths == [32, 64, 128, 256] and narrow.body.conv1.out_channels == 32
    assert narrow.features(torch.zeros(2, 1, 64, 64)).shape == (2, 256)
    # a quarter of the convolution weights (the head is fixed-size)
    assert 2.7e6 < count_parameters(narrow) < 2.9e6 and 11.2e6 < count_parameters(create("resnet18")) < 11.4e6
    conv = narrow.body.layer3[0].conv1.weight  # torchvision's He-normal (fan-out) initialisation
    assert abs(conv.std().item() - (2.0 / (conv.shape[0] * 9)) ** 0.5) < 0.05 * conv.std().item()
    assert create("resnet50", num_classes=2, width=16).features(torch.zeros(1, 1, 64, 64)).shape == (1, 512)
    with pytest.raises(ConfigError, match="width must be >= 1"):
        create("resnet18", width=0)


def test_imagenet_weights_need_the_published_width(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ConfigError, match="shapes differ"):
        create("resnet18", width=32, weights=tmp_path / "resnet18.pth")
