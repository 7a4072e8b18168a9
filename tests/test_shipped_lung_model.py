"""The lung U-Net ships with the package: on a fresh install `lungcrop` (the shipped CXR recipe's pipeline) draws
the lungs with it, pinned by the SHA-256 of its training record; the user's own `lungs train` model replaces
it; damaged weights are an error naming the fix, never a quiet fall back to the classical segmenter."""

from __future__ import annotations

import json
import shutil

import pytest

import lungscreen.lungs  # noqa: F401  (registers segment_lungs)
from lungscreen.io.files import file_sha256
from lungscreen.lungs import segmenter
from lungscreen.preprocessing import get_pipeline
from lungscreen.preprocessing.transforms import PreprocessingError
from lungscreen.training.config import load_config


@pytest.fixture
def fresh_install(monkeypatch, tmp_path):
    """No $LUNGSCREEN_LUNG_MODEL and no model of the user's own: what a new user has."""
    monkeypatch.delenv("LUNGSCREEN_LUNG_MODEL", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data-home"))
    return tmp_path


def lung_step(pipeline_name: str):
    return get_pipeline(pipeline_name).resolved().lung_step


def test_the_shipped_weights_match_their_training_record():
    record = json.loads(segmenter.SHIPPED_RECORD.read_text())
    assert file_sha256(segmenter.SHIPPED_MODEL) == record["sha256"]
    assert record["validation_dice"]["mean"] >= 0.9 and "lungs train" in record["command"]


def test_the_shipped_recipe_segments_with_the_shipped_unet_on_a_fresh_install(fresh_install):
    pipeline = load_config("covid-resnet-cpu").data.pipeline
    step = lung_step(pipeline)
    assert (pipeline, step.method, step.weights_sha256) == (
        "lungcrop", "unet", json.loads(segmenter.SHIPPED_RECORD.read_text())["sha256"])


def test_a_model_of_the_users_own_replaces_the_shipped_one(fresh_install):
    own = fresh_install / "data-home" / "lungscreen" / "lung_unet.pt"
    own.parent.mkdir(parents=True)
    own.write_bytes(segmenter.SHIPPED_MODEL.read_bytes() + b"\0")  # another file: another hash
    step = lung_step("lungcrop")
    assert step.model == str(own.resolve()) and step.weights_sha256 == file_sha256(own)


def test_damaged_shipped_weights_are_an_error_naming_the_fix(fresh_install, monkeypatch):
    copy = fresh_install / "weights" / "lung_unet.pt"
    copy.parent.mkdir()
    shutil.copy(segmenter.SHIPPED_RECORD, copy.with_suffix(".json"))
    copy.write_bytes(segmenter.SHIPPED_MODEL.read_bytes()[:-10])
    monkeypatch.setattr(segmenter, "SHIPPED_MODEL", copy)
    monkeypatch.setattr(segmenter, "SHIPPED_RECORD", copy.with_suffix(".json"))
    with pytest.raises(PreprocessingError, match="reinstall lungscreen.*lungs train.*method=classical"):
        lung_step("lungcrop")
