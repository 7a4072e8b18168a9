"""Weights: our checkpoint format, local files, head transfer, ImageNet via torchvision, unsafe files."""

from __future__ import annotations

import builtins
import json
import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from lungscreen.errors import ConfigError, LungscreenError
from lungscreen.models import (
    UnsafeWeightsError,
    WeightsError,
    create,
    list_models,
    load_checkpoint,
    model_info,
    save_checkpoint,
)
from model_specs import spec_for

PIPELINE = {"name": "equalize", "steps": [{"name": "equalize"}, {"name": "normalize"}]}
SIDE = {"conv8": 256}  # conv8 is checked with padding=1 (its option) to stay small


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def outputs(model: torch.nn.Module, side: int = 64, channels: int = 1) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.linspace(-1, 1, 2 * channels * side * side).reshape(2, channels, side, side))


# covidnet: 117 M parameters, too slow to save here; multi-task models: tests/test_multichexnet.py
@pytest.mark.parametrize("name", [name for name in list_models() if name != "covidnet"
                                  and model_info(name).task != "multitask"])
def test_checkpoint_round_trip_rebuilds_an_identical_model(name: str, tmp_path: Path) -> None:
    options = {"padding": 1} if name == "conv8" else {}
    model = create(name, num_classes=2, in_channels=1, **options)
    model.train()
    model(torch.randn(4, 1, SIDE.get(name, 32), SIDE.get(name, 32)))  # move BN running statistics off init
    kind = "segmentation" if model_info(name).task == "segmentation" else "multiclass"
    spec = spec_for(["negative", "COVID-19"], kind=kind, size=SIDE.get(name, 32), pipeline=PIPELINE)
    path = save_checkpoint(tmp_path / "model.pt", model, spec=spec, extra={"epoch": 3, "auc": 0.91})
    loaded = load_checkpoint(path)
    rebuilt, meta = loaded.model, loaded.meta
    assert type(rebuilt) is type(model) and not rebuilt.training
    torch.testing.assert_close(outputs(rebuilt, SIDE.get(name, 32)), outputs(model, SIDE.get(name, 32)),
                               rtol=0, atol=0)
    assert meta["name"] == name and meta["kwargs"] == options
    assert (meta["in_channels"], meta["num_classes"]) == (1, 2)
    assert loaded.spec == spec and meta["extra"] == {"epoch": 3, "auc": 0.91}


def test_checkpoint_records_architecture_options_and_holds_only_json_and_tensors(tmp_path: Path) -> None:
    model = create("covidnet_tiny", num_classes=3, in_channels=3, dropout=0.2, fc_width=64)
    path = save_checkpoint(tmp_path / "m.pt", model, spec=spec_for(["a", "b", "c"], channels=3))
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format", "version", "meta", "state_dict"}
    assert json.loads(raw["meta"])["kwargs"] == {"dropout": 0.2, "fc_width": 64}
    rebuilt = load_checkpoint(path).model
    assert rebuilt.fc[-2].out_features == 64 and rebuilt.stem[0].in_channels == 3


def test_checkpoint_rejects_bad_metadata(tmp_path: Path) -> None:
    model = create("squeezenet1_1", num_classes=2)
    with pytest.raises(ConfigError, match=r"heads\.0\.classes names 3 class\(es\) but the model has 2 output"):
        save_checkpoint(tmp_path / "m.pt", model, spec=spec_for(["a", "b", "c"]))
    with pytest.raises(ConfigError, match=r"input\.channels is 3 but the model reads 1"):
        save_checkpoint(tmp_path / "m.pt", model, spec=spec_for(["a", "b"], channels=3))
    with pytest.raises(ConfigError, match="JSON"):
        save_checkpoint(tmp_path / "m.pt", model, spec=spec_for(["a", "b"]), extra={"fn": print})
    assert not (tmp_path / "m.pt").exists()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(WeightsError, match="not a lungscreen checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    path = save_checkpoint(tmp_path / "m.pt", model, spec=spec_for(["a", "b"]))
    raw = torch.load(path, weights_only=True)
    torch.save({**raw, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(WeightsError, match="newer lungscreen"):
        load_checkpoint(tmp_path / "future.pt")


class RunsCode:
    """Unpickling this object calls exec(): what a crafted checkpoint does to an unsafe loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def test_a_checkpoint_crafted_to_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    # the payload really works on an unsafe loader ...
    pickle.loads(pickle.dumps(RunsCode(marker)))
    assert marker.exists()
    marker.unlink()
    # ... in a file shaped like our checkpoint, in a torch.save archive, and as a bare pickle
    shaped = tmp_path / "shaped.pt"
    state = create("squeezenet1_1").state_dict()
    torch.save({"format": "lungscreen-checkpoint", "version": 1, "meta": RunsCode(marker), "state_dict": state}, shaped)
    archive = tmp_path / "archive.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": RunsCode(marker)}, archive)
    bare = tmp_path / "bare.pkl"
    bare.write_bytes(pickle.dumps(RunsCode(marker)))
    for path in (shaped, archive, bare):
        with pytest.raises(UnsafeWeightsError, match="refused") as caught:
            load_checkpoint(path)
        assert isinstance(caught.value, LungscreenError) and str(path) in str(caught.value)
        with pytest.raises(UnsafeWeightsError):
            create("squeezenet1_1", weights=path)
    assert not marker.exists()


def test_unreadable_weights_are_reported(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        create("resnet18", weights=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(WeightsError, match="not a readable"):
        create("resnet18", weights=tmp_path / "junk.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="no state_dict"):
        create("resnet18", weights=tmp_path / "list.pt")


def test_plain_and_prefixed_state_dicts_load(tmp_path: Path) -> None:
    source = create("covidnet_tiny", num_classes=3)
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}, "epoch": 2},
               tmp_path / "lightning.ckpt")
    for path in (tmp_path / "plain.pt", tmp_path / "lightning.ckpt"):
        torch.testing.assert_close(outputs(create("covidnet_tiny", weights=path)), outputs(source))


def test_head_mismatch_is_named_and_reset_on_request(tmp_path: Path) -> None:
    pretrained = create("resnet18", num_classes=2)
    torch.save(pretrained.state_dict(), tmp_path / "two_classes.pt")
    with pytest.raises(ConfigError) as caught:
        create("resnet18", num_classes=3, weights=tmp_path / "two_classes.pt")
    message = str(caught.value)
    assert "classifier.2.weight is (2, 256) in the file but (3, 256) in the model" in message
    assert "classifier.2.bias" in message and "reset_head=True" in message

    torch.manual_seed(1)
    fresh = create("resnet18", num_classes=3)
    torch.manual_seed(1)
    transferred = create("resnet18", num_classes=3, weights=tmp_path / "two_classes.pt", reset_head=True)
    for key, value in pretrained.state_dict().items():
        if key.startswith("body."):
            torch.testing.assert_close(transferred.state_dict()[key], value)
    for key, value in fresh.state_dict().items():  # same seed: the head is the fresh initialisation
        if key.startswith("classifier."):
            torch.testing.assert_close(transferred.state_dict()[key], value)


def test_body_mismatch_is_an_error_even_with_reset_head(tmp_path: Path) -> None:
    torch.save(create("resnet18").state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ConfigError, match=r"does not fit model 'resnet50'.*body\.layer1\.0\.conv1\.weight") as caught:
        create("resnet50", weights=tmp_path / "r18.pt", reset_head=True)
    assert "missing from the file" in str(caught.value)


def test_rgb_weights_are_summed_into_a_one_channel_model(tmp_path: Path) -> None:
    rgb = create("resnet18", num_classes=2, in_channels=3)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    gray = create("resnet18", num_classes=2, in_channels=1, weights=tmp_path / "rgb.pt")
    torch.testing.assert_close(gray.body.conv1.weight, rgb.body.conv1.weight.sum(dim=1, keepdim=True))
    image = torch.rand(2, 1, 64, 64)
    rgb.eval(), gray.eval()
    with torch.no_grad():  # a gray image as R = G = B gives the same answer
        torch.testing.assert_close(gray(image), rgb(image.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch cache: torchvision must download, which fails here (no network)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_imagenet_without_network_fails_with_a_clear_message(torch_home: Path, monkeypatch) -> None:
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # offline even on a machine with network
    with pytest.raises(WeightsError) as caught:
        create("resnet18", pretrained="imagenet")
    message = str(caught.value)
    assert "could not download the ImageNet weights ResNet18_Weights.IMAGENET1K_V1" in message
    assert "weights='/path/to/resnet18-f37072fd.pth'" in message and str(torch_home) in message


def test_models_without_imagenet_weights_say_so() -> None:
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        create("covidnet_tiny", pretrained="imagenet")
    with pytest.raises(ConfigError, match="either"):
        create("resnet18", pretrained="imagenet", weights="x.pt")


def _torchvision_file(directory: Path, weights_name: str, model: torch.nn.Module) -> Path:
    """Write ``model``'s state_dict where torchvision caches ``weights_name`` (what a user copies there)."""
    url = torchvision.models.get_weight(weights_name).url
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / Path(url).name
    torch.save(model.state_dict(), path)
    return path


def test_imagenet_weights_from_torchvisions_cache(torch_home: Path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    path = _torchvision_file(torch_home, "ResNet18_Weights.IMAGENET1K_V1", reference)
    model = create("resnet18", num_classes=2, in_channels=1, pretrained="imagenet")
    torch.testing.assert_close(model.body.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.body.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    # the same file passed by hand loads the same way
    by_hand = create("resnet18", num_classes=2, in_channels=1, weights=path)
    torch.testing.assert_close(by_hand.body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)


def test_a_torchvision_file_of_another_network_is_refused(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ConfigError, match="holds no weights for the body of model 'squeezenet1_1'"):
        create("squeezenet1_1", weights=tmp_path / "resnet18.pth")
    with pytest.raises(ConfigError, match=r"'resnet50': shapes differ for body\.layer1\.0\.conv1\.weight"):
        create("resnet50", weights=tmp_path / "resnet18.pth")


def test_imagenet_squeezenet_and_light_ct_share_torchvisions_fire_weights(torch_home: Path) -> None:
    reference = torchvision.models.squeezenet1_1(weights=None)
    _torchvision_file(torch_home, "SqueezeNet1_1_Weights.IMAGENET1K_V1", reference)
    vanilla = create("squeezenet1_1", in_channels=3, pretrained="imagenet")
    light = create("squeezenet_ct", in_channels=3, pretrained="imagenet")
    for model in (vanilla, light):
        torch.testing.assert_close(model.body[12].expand3x3.weight, reference.features[12].expand3x3.weight)
        torch.testing.assert_close(model.body[0].weight, reference.features[0].weight)


def test_imagenet_densenet_old_key_names_are_converted(torch_home: Path) -> None:
    reference = torchvision.models.densenet121(weights=None)
    # torchvision's published file uses the old names "norm.1" / "conv.2"
    old = {k.replace("norm1", "norm.1").replace("conv1", "conv.1").replace("norm2", "norm.2").replace(
        "conv2", "conv.2") if "denselayer" in k else k: v for k, v in reference.state_dict().items()}
    url = torchvision.models.get_weight("DenseNet121_Weights.IMAGENET1K_V1").url
    torch_home.mkdir(parents=True)
    torch.save(old, torch_home / Path(url).name)
    model = create("densenet121", num_classes=14, in_channels=3, pretrained="imagenet")
    torch.testing.assert_close(model.body.denseblock4.denselayer16.conv2.weight,
                               reference.features.denseblock4.denselayer16.conv2.weight)
