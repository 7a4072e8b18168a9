"""The registry (names, options, task contracts, outside registrations) and `lungscreen models list`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

from lungscreen.cli.models import app
from lungscreen.errors import ConfigError
from lungscreen.models import (
    ModelInfo,
    create,
    list_models,
    load_checkpoint,
    model_info,
    register_model,
    save_checkpoint,
    unregister_model,
)
from model_specs import spec_for

ZOO = ["conv8", "covid_resnet", "covidnet", "covidnet_small", "covidnet_tiny", "densenet121", "lung_unet",
       "multichexnet", "multichexnet_cpu", "resnet18", "resnet50", "squeezenet1_0", "squeezenet1_0_bypass", "squeezenet1_1", "squeezenet1_1_bypass",
       "squeezenet_ct"]


def test_list_models_filters_with_shell_patterns_and_tasks() -> None:
    assert list_models() == ZOO
    assert list_models("squeeze*") == ["squeezenet1_0", "squeezenet1_0_bypass", "squeezenet1_1",
                                       "squeezenet1_1_bypass", "squeezenet_ct"]
    assert list_models("covidnet_*") == ["covidnet_small", "covidnet_tiny"]
    assert list_models(task="multilabel") == ["densenet121"]
    assert list_models(task="segmentation") == ["lung_unet"]
    assert list_models(task="multitask") == ["multichexnet", "multichexnet_cpu"]
    assert list_models("nothing*") == []


def test_model_info_describes_the_paper_configuration() -> None:
    info = model_info("covidnet")
    assert isinstance(info, ModelInfo)
    assert (info.paper, info.input_size, info.min_input_size, info.task) == ("004 COVID-Net", 224, 32,
                                                                             "classification")
    assert dict(info.defaults) == {"width": 1.0, "pooling": "flatten", "fc_width": 1024, "dropout": 0.0}
    assert model_info("covidnet_tiny").defaults["pooling"] == "avg"
    assert model_info("covid_resnet").imagenet == "ResNet50_Weights.IMAGENET1K_V1"


def test_bad_requests_are_config_errors_naming_the_problem() -> None:
    with pytest.raises(ConfigError, match="unknown model 'resnet19'; did you mean resnet18"):
        create("resnet19")
    with pytest.raises(ConfigError, match=r"no option widht .*options: dropout, fc_width, pooling, width"):
        create("covidnet_tiny", widht=0.5)
    with pytest.raises(ConfigError, match="width must be positive"):
        create("covidnet_tiny", width=-1.0)
    with pytest.raises(ConfigError, match="num_classes"):
        create("resnet18", num_classes=0)
    with pytest.raises(ConfigError, match="pretrained"):
        create("resnet18", pretrained="chexpert")


def test_create_records_how_the_model_was_built() -> None:
    model = create("squeezenet1_1_bypass", num_classes=5, in_channels=3, dropout=0.25)
    spec = model.lungscreen_spec
    assert (spec.name, spec.num_classes, spec.in_channels, spec.kwargs) == ("squeezenet1_1_bypass", 5, 3,
                                                                            {"dropout": 0.25})
    assert model.classifier[0].p == 0.25 and model.body[0].in_channels == 3


class TinyUNet(nn.Module):
    """A segmentation model as the lung engineer registers it: no classifier, no features()."""

    min_input_size = 8

    def __init__(self, num_classes: int, in_channels: int, width: int = 4) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(self.down(x)))


@pytest.fixture
def segmentation_model():
    @register_model("test_unet", paper="test", input_size=64, min_input_size=8, task="segmentation",
                    description="tiny U-Net for tests", defaults={"width": 4})
    def test_unet(*, num_classes: int, in_channels: int, width: int = 4) -> TinyUNet:
        return TinyUNet(num_classes, in_channels, width)

    yield "test_unet"
    unregister_model("test_unet")


def test_a_segmentation_model_registers_without_classifier_semantics(segmentation_model: str,
                                                                     tmp_path: Path) -> None:
    assert list_models(task="segmentation") == ["lung_unet", segmentation_model]
    model = create(segmentation_model, num_classes=2, in_channels=1, width=6)
    assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 2, 16, 16)
    path = save_checkpoint(tmp_path / "unet.pt", model, spec=spec_for(["left lung", "right lung"], kind="segmentation",
                                                                    size=16))
    loaded = load_checkpoint(path)
    rebuilt, meta = loaded.model, loaded.meta
    assert meta["kwargs"] == {"width": 6}
    x = torch.rand(1, 1, 16, 16)
    torch.testing.assert_close(rebuilt(x), model.eval()(x))
    # transfer to another number of output channels resets its `head`
    with pytest.raises(ConfigError, match=r"head\.weight .*reset_head=True"):
        create(segmentation_model, num_classes=3, width=6, weights=path)
    transferred = create(segmentation_model, num_classes=3, width=6, weights=path, reset_head=True)
    torch.testing.assert_close(transferred.down[0].weight, model.down[0].weight)


def test_registration_errors_are_programming_errors(segmentation_model: str) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model(segmentation_model, paper="-", input_size=8, min_input_size=8, description="-")
    with pytest.raises(ValueError, match="task"):
        register_model("x", paper="-", input_size=8, min_input_size=8, description="-", task="detection")

    @register_model("test_broken", paper="-", input_size=8, min_input_size=8, description="no features")
    def broken(*, num_classes: int, in_channels: int) -> nn.Module:
        return TinyUNet(num_classes, in_channels)

    try:
        with pytest.raises(TypeError, match="lacks features, classifier, cam_layer, layer_groups"):
            create("test_broken")
    finally:
        unregister_model("test_broken")


def test_cli_json_lists_every_model_with_parameters_and_macs() -> None:
    result = CliRunner().invoke(app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert list(rows) == ZOO
    assert abs(rows["covidnet"]["parameters"] - 117.4e6) / 117.4e6 < 0.10
    assert rows["covidnet"]["macs"] > 1e9 and rows["conv8"]["input_size"] == 1024
    assert rows["squeezenet1_1"]["min_input_size"] == 17
    assert rows["covidnet"]["paper"] == "004 COVID-Net" and rows["covidnet"]["description"].startswith("COVID-Net")


@pytest.fixture
def console_100(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command prints to a 100-column terminal (the console is made once, at import)."""
    import lungscreen.cli.models as models_cli

    monkeypatch.setattr(models_cli, "out", Console(width=100))


def _lines(output: str) -> list[str]:
    return [line.rstrip() for line in output.splitlines() if line.strip()]


def test_cli_table_is_quick_and_fits_100_columns(console_100: None) -> None:
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["list"])
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    assert seconds < 10, f"models list took {seconds:.1f} s (it builds no model)"  # a sanity bound, not a benchmark
    lines = _lines(result.output)
    assert max(len(line) for line in lines) <= 100
    rows = {line.split()[0]: line for line in lines if line.split()[0] in ZOO}
    assert list(rows) == ZOO and len(lines) == len(ZOO) + 4  # title, header, rule, caption: nothing wraps
    assert "DenseNet-121 (CheXNet)" in rows["densenet121"] and rows["densenet121"].endswith("…")
    assert "224 (32)" in rows["covidnet"]


def test_cli_table_counts_on_request_and_wraps_when_wide(console_100: None) -> None:
    counted = CliRunner().invoke(app, ["list", "squeeze*", "--macs"])
    assert counted.exit_code == 0, counted.output
    lines = _lines(counted.output)
    assert max(len(line) for line in lines) <= 100
    assert "squeezenet_ct" in counted.output and "1.27 M" in counted.output and "covidnet" not in counted.output

    wide = CliRunner().invoke(app, ["list", "squeezenet_ct", "--wide"])
    assert wide.exit_code == 0, wide.output
    assert max(len(line) for line in _lines(wide.output)) <= 100
    text = " ".join(line.split("  ")[-1].strip() for line in _lines(wide.output))
    assert "1x1x128, GAP" in text and "…" not in wide.output


def test_cli_reports_an_empty_pattern_as_a_config_error() -> None:
    result = CliRunner().invoke(app, ["list", "nothing*"])
    assert isinstance(result.exception, ConfigError)
