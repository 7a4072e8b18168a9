"""`lungscreen explain`: raw class-activation maps, the lung attention ratio, overlays on the original image
(mapped back through a cropping pipeline) and the command end to end."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lungscreen.audit.cams import CAM_METHODS, class_activation_maps, lung_attention_ratio
from lungscreen.audit.explain import explain_images
from lungscreen.errors import ConfigError
from lungscreen.inference.predict import Predictor
from lungscreen.preprocessing.model_input import to_tensor
from training_fixtures import make_manifest, tiny_recipe

SIZE = 64  # squeezenet1_1 has a 3 x 3 last feature map at 64 px (1 x 1 at 32: every map flat)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A squeezenet trained for one epoch at 64 px through the cropping ``covidnet`` pipeline."""
    from lungscreen.training.config import from_dict
    from lungscreen.training.engine import train

    root = tmp_path_factory.mktemp("explain")
    recipe = tiny_recipe(make_manifest(root / "data", per_class=6))
    recipe["model"] = {"name": "squeezenet1_1"}
    recipe["data"]["pipeline"] = "covidnet"
    recipe["stages"] = [{"name": "all", "epochs": 1, "image_size": SIZE, "train": "all"}]
    return train(from_dict(recipe), out=root / "run", quiet=True).run_dir, root / "data"


@pytest.fixture(scope="module")
def predictor(run):
    return Predictor(run[0])


@pytest.fixture
def wide(tmp_path):
    """A 90 x 60 image (another size and aspect ratio than the model's 64 x 64)."""
    pixels = np.random.default_rng(4).normal(0.4, 0.1, (60, 90))
    pixels[15:45, 20:40] += 0.4
    path = tmp_path / "wide.png"
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def test_every_method_gives_raw_non_negative_maps_at_the_input_size(run, predictor):
    images = sorted(run[1].glob("*.png"))[:3]
    samples = [predictor.prepare(np.asarray(Image.open(p), np.float32) / 255) for p in images]
    inputs = to_tensor([s.image for s in samples], predictor.spec.input)
    peaks = []
    for method in CAM_METHODS:
        maps = class_activation_maps(predictor.model, inputs, [0, 1, 2], method)
        assert maps.shape == (3, SIZE, SIZE) and maps.dtype == np.float32 and (maps >= 0).all(), method
        peaks += [float(m.max()) for m in maps]
    assert any(p > 0 and abs(p - 1) > 1e-3 for p in peaks)  # not min-max scaled per image
    # ... and it is the library's own map: min-max scaling it gives exactly what GradCAM returns
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    raw = class_activation_maps(predictor.model, inputs, [2, 2, 2], "gradcam")
    with GradCAM(predictor.model, [predictor.model.cam_layer]) as library:
        scaled = library(inputs, [ClassifierOutputTarget(2)] * 3)
    low = raw.min(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose((raw - low) / (raw.max(axis=(1, 2), keepdims=True) - low + 1e-7), scaled, atol=1e-4)
    predictor.model.zero_grad(set_to_none=True)
    assert not predictor.model.training and all(p.grad is None for p in predictor.model.parameters())


def test_bad_methods_classes_and_models_are_refused(predictor):
    inputs = torch.zeros(1, 1, SIZE, SIZE)
    with pytest.raises(ConfigError, match="unknown CAM method 'lime'; known: gradcam, gradcam\\+\\+"):
        class_activation_maps(predictor.model, inputs, [0], "lime")
    with pytest.raises(ConfigError, match="target_classes"):
        class_activation_maps(predictor.model, inputs, [7])
    with pytest.raises(ConfigError, match="no cam_layer"):
        class_activation_maps(torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Flatten()), inputs, [0])


def test_the_lung_attention_ratio_is_one_for_a_uniform_map_and_above_one_inside_the_lungs():
    lungs = np.zeros((40, 40), bool)
    lungs[10:30, 5:18] = lungs[10:30, 22:35] = True
    assert lung_attention_ratio(np.full((40, 40), 3.0), lungs) == pytest.approx(1.0)
    inside = np.where(lungs, 2.0, 0.0)
    assert lung_attention_ratio(inside, lungs) == pytest.approx(1 / lungs.mean())
    outside = np.where(lungs, 0.0, 1.0)
    assert lung_attention_ratio(outside, lungs) == 0.0
    assert np.isnan(lung_attention_ratio(np.zeros((40, 40)), lungs))


def test_overlays_are_drawn_on_the_original_image_and_zero_where_the_crop_removed_it(predictor, wide, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no lung model in tests: the classical fallback warns
        table = explain_images(predictor, [wide, tmp_path / "missing.png"], tmp_path / "out",
                               methods=("gradcam", "eigencam"), save_maps=True)
    done = table[table["error"] == ""]
    assert list(done["method"]) == ["gradcam", "eigencam"]
    assert set(done["class"]) <= set(predictor.class_names) and done["probability"].between(0, 1).all()
    assert done["faithfulness"].between(-0.5, 0.5).all()
    for _, row in done.iterrows():
        assert Image.open(row["file"]).size == (90, 60)
        values = np.load(row["map_file"])
        assert values.shape == (60, 90) and (values.max() > 0 or row["method"] == "gradcam")  # Grad-CAM may be all 0
        # covidnet drops the top 8 % of rows, then keeps the centre square (60 - 5 rows high): the map is 0 there
        assert (values[:4] == 0).all() and (values[:, :15] == 0).all() and (values[:, -15:] == 0).all()
    failed = table[table["error"] != ""]
    assert failed["path"].str.endswith("missing.png").all() and failed["error"].iloc[0] == "no such file"


def test_the_command_writes_the_table_and_refuses_bad_options(run, wide, tmp_path, cli):
    out, broken = tmp_path / "explained", tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    code, _, err = cli("explain", run[0], wide, broken, "--out", out,
                           "--method", "gradcam++", "--method", "scorecam", "--no-faithfulness")
    assert code == 0, err
    table = pd.read_csv(out / "explanations.csv", keep_default_na=False)
    assert sorted(table["method"]) == ["", "gradcam++", "scorecam"] and (out / "wide.gradcampp.png").is_file()
    assert table.loc[table["method"] == "", "path"].iloc[0] == str(broken) and "1 image(s) failed" in err
    code, _, err = cli("explain", run[0], wide, "--out", out, "--method", "lime")
    assert code == 2 and "--method: unknown CAM method 'lime'; known: gradcam" in err
    code, _, err = cli("explain", run[0], wide, "--out", out, "--target", "cat")
    assert code == 2 and "--target: unknown class 'cat'" in err and "COVID-19" in err
    code, _, err = cli("explain", run[0], wide, "--out", tmp_path / "a" / "b")
    assert code == 2 and "--mkdir" in err
