"""`lungscreen export`: a run as ONNX (classifier + its lung U-Net) that predicts like the run, without torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lungscreen.errors import ConfigError, WeightsError
from lungscreen.inference.export import export_run
from lungscreen.inference.predict import Predictor, predict_paths
from lungscreen.models import InferenceSpec, create, save_checkpoint
from lungscreen.models.onnx import OnnxModel
from lungscreen.preprocessing import get_pipeline
from model_specs import spec_for

CLASSES = ["normal", "pneumonia", "COVID-19"]


def lung_model(path: Path, seed: int = 0) -> Path:
    """An untrained lung U-Net whose output bias says "lung" almost everywhere (so every image has lungs to crop
    to), its first channel's weights random: the masks still depend on the image."""
    torch.manual_seed(seed)
    model = create("lung_unet", num_classes=2, in_channels=1, channels=[4, 8, 16])
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)][-1]
    torch.nn.init.constant_(last.bias, 2.0)
    spec = InferenceSpec(input={"size": 64, "pipeline": get_pipeline("equalize").to_dict()},
                         heads=[{"kind": "segmentation", "name": "output",
                                 "classes": ["heart-excluded", "behind-heart-included"]}])
    return save_checkpoint(path, model, spec=spec)


@pytest.fixture(scope="module")
def run(tmp_path_factory, monkeypatch_module) -> Path:
    """A classifier whose pipeline crops to the lungs the U-Net draws (the shipped CXR recipe's `lungcrop`)."""
    folder = tmp_path_factory.mktemp("export")
    unet = lung_model(folder / "lung_unet.pt")
    monkeypatch_module.setenv("LUNGSCREEN_LUNG_MODEL", str(unet))
    pipeline = get_pipeline("lungcrop").to_dict()
    assert next(s for s in pipeline["steps"] if s["name"] == "segment_lungs")["method"] == "unet"
    torch.manual_seed(1)
    model = create("resnet18", num_classes=3, width=8)
    save_checkpoint(folder / "run" / "best.pt", model, spec=spec_for(CLASSES, pipeline=pipeline),
                    extra={"run": "export-test"})
    return folder / "run"


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    for i in range(6):
        pixels = rng.normal(0.5, 0.15, (80 + 7 * i, 72))
        pixels[15:60, 8:30] -= 0.3  # two dark "lungs"
        pixels[15:60, 42:64] -= 0.3
        Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(folder / f"cxr{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "covid.onnx"
    return export_run(run, out)


def test_the_export_holds_the_spec_and_pins_its_lung_model(exported, run):
    assert exported.model.is_file() and exported.lungs == exported.model.with_name("covid.lungs.onnx")
    assert exported.max_difference <= 1e-4 and exported.int8 is None
    model = OnnxModel(exported.model)
    assert model.spec.class_names == CLASSES and model.meta["extra"]["run"] == "export-test"
    step = next(s for s in model.spec.input.pipeline["steps"] if s["name"] == "segment_lungs")
    assert step["method"] == "onnx" and step["model"] == str(exported.lungs)  # found beside the model
    assert OnnxModel(exported.lungs).spec.head().kind == "segmentation"


def test_the_export_predicts_what_the_run_predicts(exported, run, images):
    torch_rows = predict_paths(run, [images])
    onnx_rows = predict_paths(exported.model, [images])
    assert list(onnx_rows.columns) == list(torch_rows.columns)
    scored = torch_rows["error"] == ""
    assert scored.sum() == 6 and (onnx_rows["error"] == "").sum() == 6
    assert "broken.png" in onnx_rows.loc[~scored, "path"].iloc[0]
    difference = np.abs(onnx_rows.loc[scored, CLASSES].to_numpy() - torch_rows.loc[scored, CLASSES].to_numpy())
    assert difference.max() <= 1e-4
    assert (onnx_rows["prediction"] == torch_rows["prediction"]).all()


def test_predicting_with_the_export_never_imports_torch(exported, images):
    script = ("import sys; from lungscreen.inference.predict import predict_paths; "
              f"rows = predict_paths({str(exported.model)!r}, [{str(images)!r}]); "
              "assert (rows['error'] == '').sum() == 6, rows; "
              "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_another_lung_model_beside_the_export_is_refused(exported, tmp_path, images):
    for path in (exported.model, exported.lungs):
        shutil.copy(path, tmp_path / path.name)
    other = export_run_of_lungs(tmp_path)
    shutil.copy(other, tmp_path / exported.lungs.name)
    rows = predict_paths(tmp_path / exported.model.name, [images / "cxr0.png"])
    assert "not the one this classifier was exported with" in rows["error"].iloc[0]


def export_run_of_lungs(folder: Path) -> Path:
    """Another lung U-Net's ONNX file (other weights)."""
    from lungscreen.models import load_checkpoint
    from lungscreen.models.onnx import export_checkpoint

    path = folder / "other.lungs.onnx"
    export_checkpoint(load_checkpoint(lung_model(folder / "other.pt", seed=5)), path)
    return path


def test_int8_export_calibrates_on_given_images_and_keeps_the_answers_close(run, images, tmp_path):
    done = export_run(run, tmp_path / "m.onnx", calibration=[images], calibration_images=8)
    assert done.int8 == tmp_path / "m.int8.onnx" and done.int8.is_file()
    fp32, int8 = (predict_paths(path, [images]) for path in (done.model, done.int8))
    scored = fp32["error"] == ""
    assert OnnxModel(done.int8).spec == OnnxModel(done.model).spec
    assert np.abs(int8.loc[scored, CLASSES].to_numpy() - fp32.loc[scored, CLASSES].to_numpy()).max() < 0.05


def test_what_export_refuses(run, tmp_path):
    with pytest.raises(ConfigError, match=r"\.onnx"):
        export_run(run, tmp_path / "model.pt")
    multitask = create("multichexnet_cpu", num_classes={"findings": 2, "boxes": 1, "mask": 1}, head_width=8)
    spec = InferenceSpec(input={"size": 64, "pipeline": {"name": "none", "steps": [{"name": "normalize"}]}},
                         heads=[{"kind": "multilabel", "name": "findings", "classes": ["a", "b"]},
                                {"kind": "detection", "name": "boxes", "classes": ["lung"]},
                                {"kind": "segmentation", "name": "mask", "classes": ["lungs"]}])
    save_checkpoint(tmp_path / "mt" / "best.pt", multitask, spec=spec)
    with pytest.raises(ConfigError, match="multi-task"):
        export_run(tmp_path / "mt", tmp_path / "mt.onnx")
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), foreign, dynamo=False)
    with pytest.raises(WeightsError, match="without lungscreen metadata"):
        Predictor(foreign)
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    with pytest.raises(WeightsError, match="not an ONNX model"):
        Predictor(tmp_path / "garbage.onnx")


def test_export_and_predict_commands(cli, run, images, tmp_path):
    code, _, err = cli("export", str(run), "--onnx", str(tmp_path / "out" / "m.onnx"), "--mkdir")
    assert code == 0, err
    assert "m.lungs.onnx" in err
    code, _, err = cli("predict", str(tmp_path / "out" / "m.onnx"), str(images), "--out", str(tmp_path / "p.csv"))
    assert code == 0, err
    assert "6 of 7 image(s) scored" in err


def test_the_viewer_serves_the_export_without_a_heat_map(exported, images):
    from fastapi.testclient import TestClient

    from lungscreen.serve import create_app

    client = TestClient(create_app(Predictor(exported.model)))
    assert client.get("/model").json()["classes"] == CLASSES
    answer = client.post("/predict", files={"file": ("c.png", (images / "cxr1.png").read_bytes(), "image/png")})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert any("no Grad-CAM" in note for note in body["notes"]) and body["pictures"]


def test_prefetch_keeps_the_order_and_overlaps_the_work():
    import threading
    import time

    from lungscreen.inference.predict import prefetched

    seen_threads = set()

    def slow_square(value: int) -> int:
        seen_threads.add(threading.current_thread().name)
        time.sleep(0.01 * (value % 3))
        return value * value

    assert list(prefetched(slow_square, range(20), workers=2, ahead=4)) == [v * v for v in range(20)]
    assert seen_threads and all(name.startswith("lungscreen-decode") for name in seen_threads)

    def fails(value: int) -> int:
        raise ValueError(f"bad {value}")

    with pytest.raises(ValueError, match="bad 0"):
        list(prefetched(fails, range(3), workers=1, ahead=2))
