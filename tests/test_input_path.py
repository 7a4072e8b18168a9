"""One path from pixels to prediction: the inference spec in every checkpoint, predict equal to the engine's
own test scores, geometry that maps back, masks and boxes that follow augmentation, and one engine for every
task (multi-label, multi-task)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from lungscreen.data.labels import TASKS
from lungscreen.data.phantoms import render_phantom
from lungscreen.errors import ConfigError, LungscreenError
from lungscreen.inference.predict import Predictor, predict_paths
from lungscreen.models import WeightsError, convert_v1, create, load_checkpoint, register_model, save_checkpoint
from lungscreen.models.registry import unregister_model
from lungscreen.preprocessing import Sample, get_pipeline
from lungscreen.preprocessing.model_input import prepare
from lungscreen.preprocessing.transforms import REFERENCE
from lungscreen.training.augment import AUGMENTATIONS, build_augment
from lungscreen.training.config import LossConfig, from_dict
from lungscreen.training.engine import train
from lungscreen.training.objectives import MultitaskObjective, build_objective
from model_specs import spec_for
from training_fixtures import make_manifest, make_phantom_manifest, tiny_recipe


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("synth"), per_class=12)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_phantom_manifest(tmp_path_factory.mktemp("phantoms"), per_label=8)


# --------------------------------------------------------------------------------------------------------
# predict = the engine's test evaluation
# --------------------------------------------------------------------------------------------------------

def test_predict_gives_the_probabilities_the_training_input_path_gives(manifest, tmp_path):
    """The engine feeds a model from its in-memory store (preprocessed once, resized per stage, augmented
    per item); predict decodes files one by one. Both must reach the same tensors: the probabilities of
    best.pt on the test images agree within 1e-5, and the engine's own test table says the same."""
    from lungscreen.training.data import ImageStore
    from lungscreen.training.objectives import build_objective
    from lungscreen.training.prepare import prepare
    from lungscreen.training.testing import score_checkpoint

    recipe = tiny_recipe(manifest)
    recipe["model"] = {"name": "squeezenet1_1"}
    recipe["data"]["pipeline"] = "covidnet"  # crops, so the geometry and the resize order matter
    recipe["stages"] = [{"name": "all", "epochs": 1, "image_size": 36, "train": "all"}]
    config = from_dict(recipe)
    run = train(config, out=tmp_path / "run", quiet=True).run_dir
    plan = prepare(config, build_model=False)
    rows = plan.stages[-1].frames["test"]
    store = ImageStore(rows, plan.stages[-1].pipeline, [36])
    store.load_all()
    objective = build_objective(plan.stages[-1].task, config.stages[-1].loss)
    kept, _ = score_checkpoint(run / "best.pt", store, plan.stages[-1].task, objective)
    classes = ["normal", "pneumonia", "COVID-19"]
    predicted = predict_paths(run, store.frame["image_path"].tolist(), batch_size=5).set_index("path")
    np.testing.assert_allclose(predicted.loc[store.frame["image_path"], classes].to_numpy(), kept["probs"],
                               atol=1e-5, rtol=0)
    tested = pd.read_csv(run / "test_predictions.csv").set_index("image_path")
    np.testing.assert_allclose(tested.loc[store.frame["image_path"], classes].to_numpy(), kept["probs"], atol=1e-5)
    spec = load_checkpoint(run / "best.pt").spec
    assert spec.input.size == 36 and spec.input.pipeline["name"] == "covidnet" and spec.class_names == classes
    assert spec.modality == "CXR" and spec.task == "covidx" and spec.heads[0].activation == "softmax"
    test = json.loads((run / "test.json").read_text())
    assert test["images"] == len(tested) and {entry["source"] for entry in test["per_source"]} == {"synth"}


# --------------------------------------------------------------------------------------------------------
# the inference spec: required, checked against the model, convertible from version 1
# --------------------------------------------------------------------------------------------------------

def write_v1(path: Path, model: nn.Module, class_names: list[str], extra: dict) -> Path:
    """A checkpoint as lungscreen 0.1 wrote it: no spec, the input size in free-form ``extra``."""
    meta = {"name": model.lungscreen_spec.name, "kwargs": {}, "in_channels": 1, "num_classes": len(class_names),
            "class_names": class_names, "preprocessing": {"pipeline": {"name": "none", "steps": [{"name": "normalize"}]},
                                                          "base_size": 48}, "extra": extra}
    torch.save({"format": "lungscreen-checkpoint", "version": 1, "meta": json.dumps(meta),
                "state_dict": model.state_dict()}, path)
    return path


def test_a_checkpoint_without_a_spec_is_refused_with_the_conversion_command(tmp_path):
    model = create("squeezenet1_1", num_classes=2)
    old = write_v1(tmp_path / "old.pt", model, ["non-COVID", "COVID-19"], {"image_size": 48})
    with pytest.raises(WeightsError, match=r"no inference spec .*lungscreen models convert .*old\.pt NEW\.pt"):
        Predictor(old)
    spec = convert_v1(old, tmp_path / "new.pt")
    assert spec.input.size == 48 and spec.class_names == ["non-COVID", "COVID-19"] and spec.modality == "CXR"
    loaded = load_checkpoint(tmp_path / "new.pt")
    x = torch.rand(2, 1, 48, 48)
    torch.testing.assert_close(loaded.model(x), model.eval()(x))


@pytest.mark.parametrize("change, field", [
    ({"input": {"size": 32, "channels": 3, "pipeline": {"name": "none", "steps": []}}}, "input.channels"),
    ({"heads": [{"kind": "multiclass", "classes": ["a", "b", "c"]}]}, "heads.0.classes"),
    ({"heads": [{"kind": "segmentation", "classes": ["a", "b"]}]}, "heads.0.kind"),
    ({"heads": [{"kind": "multiclass", "classes": ["a", "a"]}]}, "heads.0"),
    ({"input": {"size": 2, "pipeline": {"name": "none", "steps": []}}}, "input.size"),
])
def test_a_spec_that_contradicts_its_model_is_refused_naming_the_field(tmp_path, change, field):
    model = create("squeezenet1_1", num_classes=2)
    path = save_checkpoint(tmp_path / "m.pt", model, spec=spec_for(["a", "b"]))
    raw = torch.load(path, weights_only=True)
    meta = json.loads(raw["meta"])
    meta["spec"].update(change)
    torch.save({**raw, "meta": json.dumps(meta)}, tmp_path / "bad.pt")
    missing_images = tmp_path / "never-read"
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        predict_paths(tmp_path / "bad.pt", [missing_images])  # refused before any input is looked at


# --------------------------------------------------------------------------------------------------------
# geometry, and masks and boxes through augmentation
# --------------------------------------------------------------------------------------------------------

def test_the_recorded_geometry_maps_a_heat_map_back_onto_the_original():
    image = np.random.default_rng(0).random((120, 100), dtype=np.float32)
    spec = spec_for(["a", "b"], size=40, pipeline=get_pipeline("covidnet").to_dict())
    sample = prepare(image, spec.input)
    assert sample.image.shape == (40, 40)
    # top 8 % (9.6 -> 10 rows) cropped, then the centred 100 x 100 square of the remaining 110 rows
    x0, y0, x1, y1 = sample.geometry.box
    assert (x0, x1) == (0, 100) and y1 - y0 == pytest.approx(100) and y0 == pytest.approx(10 + 5)
    back = sample.geometry.to_original(np.ones((40, 40), np.float32))
    assert back.shape == (120, 100) and back[:15].sum() == 0 and back[15:115].min() == 1 and back[115:].sum() == 0


def phantom_with_a_marked_lesion() -> Sample:
    """A phantom with one bright square lesion, its mask and its box: the three must stay aligned."""
    image = render_phantom("normal", size=96, seed=1).image.astype(np.float32) / 255.0 * 0.4
    mask = np.zeros((96, 96), bool)
    mask[30:50, 56:74] = True
    image[mask] = 1.0
    return Sample((image * 255).astype(np.uint8), {REFERENCE: mask}, np.array([[56, 30, 74, 50]], np.float32),
                  ["lesion"])


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_every_augmentation_moves_the_mask_and_the_box_with_the_image(name):
    from lungscreen.training.data import ManifestDataset

    class OneSample:
        frame = pd.DataFrame([{"target": 0, "patient_id": "p", "source": "s", "image_path": "x.png"}])

        def sample(self, index, size):
            return phantom_with_a_marked_lesion()

    dataset = ManifestDataset(OneSample(), 96, spec_for(["a"], size=96).input, TASKS["lungs"], build_augment(name))
    for seed in range(12):
        image, masks, boxes = dataset._augmented(phantom_with_a_marked_lesion(), seed)
        pixels, mask = gaussian_filter(image[0].numpy(), 1.5), masks[0].numpy() > 0
        assert mask.sum() > 100, (name, seed)
        # The lesion is the brightest area: as many of the brightest (smoothed) pixels as the mask holds - a rank,
        # so the gamma, contrast and noise of the acquisition augmentation do not move a fixed threshold (its
        # worst of 300 seeds: 0.84; a mask left behind by a geometric transform overlaps near 0).
        bright = pixels >= np.sort(pixels, axis=None)[-int(mask.sum())]
        overlap = (bright & mask).sum() / (bright | mask).sum()
        assert overlap > 0.8, (name, seed, overlap)  # the mask covers the pixels the lesion moved to
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = boxes[0].tolist()
        assert abs(x0 - xs.min()) <= 2 and abs(y0 - ys.min()) <= 2, (name, seed)
        assert abs(x1 - (xs.max() + 1)) <= 2 and abs(y1 - (ys.max() + 1)) <= 2, (name, seed)


# --------------------------------------------------------------------------------------------------------
# one engine for every task
# --------------------------------------------------------------------------------------------------------

def test_a_multilabel_recipe_trains_densenet121_on_phantom_findings(phantoms, tmp_path):
    recipe = {
        "name": "findings", "seed": 0, "threads": 2, "precision": "32",
        "data": {"manifest": str(phantoms), "task": "findings", "batch_size": 8, "augment": "light"},
        "model": {"name": "densenet121", "options": {"drop_rate": 0.0}},
        "stages": [{"name": "all", "epochs": 2, "image_size": 32, "train": "all",
                    "optimizer": {"name": "adam", "lr": 1e-3}}],
    }
    config = from_dict(recipe)
    assert config.monitor_metric() == ("val/macro_auc", "max")
    result = train(config, out=tmp_path / "run", quiet=True)
    history = result.history
    assert {"val/auc/pneumonia", "val/auc/COVID-19", "val/macro_auc"} <= set(history.columns)
    assert np.isfinite(history["val/loss"]).all() and history["train/loss"].iloc[-1] < history["train/loss"].iloc[0]
    spec = load_checkpoint(result.run_dir / "best.pt").spec
    assert spec.head().kind == "multilabel" and spec.head().activation == "sigmoid"
    assert spec.class_names == ["pneumonia", "COVID-19"]
    assert "macro_auc" in result.summary["test"]["figures"]


def test_a_segmentation_recipe_refuses_a_classifier_and_a_classifier_loss(phantoms):
    recipe = {"name": "x", "data": {"manifest": str(phantoms), "task": "lungs"}, "model": {"name": "squeezenet1_1"},
              "stages": [{"epochs": 1, "image_size": 32}]}
    from lungscreen.training.prepare import prepare

    with pytest.raises(ConfigError, match="data.task: model squeezenet1_1 is a classification model; it cannot "
                                          "learn the segmentation task"):
        prepare(from_dict(recipe))
    recipe["model"] = {"name": "lung_unet"}
    recipe["stages"][0]["loss"] = {"name": "ce"}
    with pytest.raises(ConfigError, match=r"stages\.0\.loss\.name: 'ce' cannot train a segmentation task"):
        from_dict(recipe)


class TwoHeads(nn.Module):
    """A small encoder with a classification head and a segmentation head (the MultiCheXNet shape)."""

    min_input_size = 8

    def __init__(self, num_classes: dict[str, int], in_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                  nn.ReLU())
        self.classify = nn.Linear(8, num_classes["findings"])
        self.segment = nn.Conv2d(8, num_classes["lungs"], 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x)
        return {"findings": self.classify(features.mean(dim=(2, 3))), "lungs": self.segment(features)}


@pytest.fixture
def two_heads():
    register_model("test_two_heads", paper="-", input_size=32, min_input_size=8, task="multitask",
                   description="test")(lambda *, num_classes, in_channels: TwoHeads(num_classes, in_channels))
    yield "test_two_heads"
    unregister_model("test_two_heads")


def test_a_missing_label_adds_no_loss_and_no_gradient():
    objective = build_objective({"findings": TASKS["covidx"], "lungs": TASKS["lungs"]}, LossConfig())
    assert isinstance(objective, MultitaskObjective)
    lung = np.zeros((8, 8), bool)
    lung[2:6, 2:6] = True
    target, known, labelled = TASKS["lungs"].segmentation_targets(0, lung)
    batch = {"findings": {"label": torch.tensor([2, 0]), "present": torch.tensor([True, True])},
             "lungs": {"mask": torch.from_numpy(np.stack([target, target])),
                       "known": torch.from_numpy(np.stack([known, known])),
                       "labelled": torch.from_numpy(np.stack([labelled, labelled])),
                       "present": torch.tensor([True, False])}}
    outputs = {"findings": torch.zeros(2, 3, requires_grad=True), "lungs": torch.zeros(2, 2, 8, 8, requires_grad=True)}
    objective.loss(outputs, batch).backward()
    assert outputs["lungs"].grad[1].abs().max() == 0 and outputs["lungs"].grad[0].abs().max() > 0
    batch["findings"]["present"] = torch.tensor([False, False])
    outputs = {name: value.detach().requires_grad_(True) for name, value in outputs.items()}
    loss = objective.loss(outputs, batch)
    loss.backward()
    assert outputs["findings"].grad is None  # not even in the graph: no gradient at all
    single = build_objective(TASKS["lungs"], LossConfig()).loss(outputs["lungs"][:1], {
        key: value[:1] for key, value in batch["lungs"].items() if key != "present"})
    assert float(loss.detach()) == pytest.approx(float(single.detach()))  # only the labelled image's mask counted


def test_a_multitask_model_trains_on_disjointly_labelled_rows(phantoms, two_heads, tmp_path):
    recipe = {
        "name": "two-heads", "seed": 0, "threads": 1, "precision": "32",
        "data": {"manifest": str(phantoms), "task": {"heads": {"findings": "covidx", "lungs": "lungs"}},
                 "batch_size": 6, "augment": "light"},
        "model": {"name": two_heads},
        "monitor": {"metric": "val/lungs/dice"},
        "stages": [{"name": "all", "epochs": 2, "image_size": 32, "train": "all", "optimizer": {"lr": 3e-3}}],
    }
    result = train(from_dict(recipe), out=tmp_path / "run", quiet=True)
    history = result.history
    assert {"val/findings/accuracy", "val/lungs/dice", "val/loss"} <= set(history.columns)
    spec = load_checkpoint(result.run_dir / "best.pt").spec
    assert [(h.name, h.kind) for h in spec.heads] == [("findings", "multiclass"), ("lungs", "segmentation")]
    figures = result.summary["test"]["figures"]
    assert "findings/accuracy" in figures and "lungs/dice" in figures
    with pytest.raises(LungscreenError, match="multi-head"):
        Predictor(result.run_dir)
