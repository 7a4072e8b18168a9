"""A model is not silently used outside what it learned: another modality is refused (or flagged with --force),
and an image far from the training inputs is flagged as out of distribution; multi-frame DICOM gives a row
per frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_images import dicom
from training_fixtures import make_manifest, tiny_recipe

from lungscreen.errors import ConfigError
from lungscreen.inference.predict import Predictor, predict_paths
from lungscreen.models import load_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from lungscreen.training.config import from_dict
    from lungscreen.training.engine import train

    root = tmp_path_factory.mktemp("guard")
    recipe = tiny_recipe(make_manifest(root / "data", per_class=8))
    recipe["model"] = {"name": "squeezenet1_1"}
    recipe["stages"] = [{"name": "all", "epochs": 1, "image_size": 32, "train": "all"}]
    return train(from_dict(recipe), out=root / "run", quiet=True).run_dir, root / "data"


def test_the_spec_records_what_the_training_inputs_looked_like(run):
    spec = load_checkpoint(run[0] / "best.pt").spec
    reference = spec.reference
    assert reference is not None and reference.images > 0 and len(reference.histogram) == 32
    assert sum(reference.histogram) == pytest.approx(1.0) and 0 < reference.threshold < 1
    assert spec.modality == "CXR" and "PA" in spec.views


def test_an_image_unlike_the_training_inputs_is_flagged(run, tmp_path):
    folder, data = run
    like = sorted(data.glob("*.png"))[:4]
    unlike = tmp_path / "halves.png"  # half black, half white: nothing like the noisy training films
    halves = np.zeros((40, 40), np.uint8)
    halves[:, 20:] = 255
    Image.fromarray(halves).save(unlike)
    frame = predict_paths(folder, [*like, unlike]).set_index("path")
    assert not frame.loc[[str(p) for p in like], "ood"].any()
    assert frame.loc[str(unlike), "ood"] and frame.loc[str(unlike), "ood_score"] > 1.0
    assert frame.loc[str(unlike), "prediction"] != ""  # still scored: the flag travels with the answer


def test_a_dicom_of_another_modality_is_refused_unless_forced(run, tmp_path):
    folder, _ = run
    ct = dicom(tmp_path / "slice.dcm", np.random.default_rng(1).integers(0, 4096, (48, 48)), Modality="CT")
    refused = predict_paths(folder, [ct]).iloc[0]
    assert "DICOM modality CT" in refused["error"] and "--force" in refused["error"] and refused["prediction"] == ""
    forced = predict_paths(Predictor(folder, force=True), [ct]).iloc[0]
    assert forced["error"] == "" and "scored with --force" in forced["note"] and forced["prediction"] != ""
    with pytest.raises(ConfigError, match="--modality: the inputs are CT"):
        Predictor(folder, modality="CT")


def test_a_multi_frame_dicom_gives_a_row_per_frame(run, tmp_path):
    folder, _ = run
    frames = np.stack([np.full((40, 40), value, np.uint16) + np.arange(40, dtype=np.uint16) * 50
                       for value in (100, 800, 1600)])
    path = dicom(tmp_path / "frames.dcm", frames[0], NumberOfFrames=3, Rows=40, Columns=40,
                 PixelData=frames.tobytes())
    frame = predict_paths(folder, [path])
    assert frame["frame"].tolist() == [0, 1, 2] and (frame["error"] == "").all()


def test_the_run_folder_and_a_copied_checkpoint_give_the_same_answers(run, tmp_path):
    folder, data = run
    copy = tmp_path / "model.pt"
    copy.write_bytes((folder / "best.pt").read_bytes())
    images = sorted(data.glob("*.png"))[:3]
    columns = ["normal", "pneumonia", "COVID-19"]
    np.testing.assert_array_equal(predict_paths(folder, images)[columns].to_numpy(),
                                  predict_paths(Path(copy), images)[columns].to_numpy())
