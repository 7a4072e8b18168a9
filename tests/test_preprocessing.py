"""Preprocessing: transforms on tiny arrays, pipelines and their JSON form, the cache, bad inputs."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from lungscreen.data.manifest import load_manifest, new_row, save_manifest
from lungscreen.data.phantoms import render_phantom
from lungscreen.errors import ConfigError, ImageReadError, LungscreenError
from lungscreen.lungs.step import LungModelWarning, SegmentLungs
from lungscreen.preprocessing import (
    LUNGS,
    REFERENCE,
    Pipeline,
    PreprocessingError,
    Sample,
    get_pipeline,
    list_pipelines,
    preprocess_file,
    preprocess_manifest,
    transform_from_dict,
)
from lungscreen.preprocessing.transforms import (
    CLAHE,
    ApplyLungMask,
    CenterSquare,
    CropToLungs,
    Equalize,
    Normalize,
    Resize,
    TopCrop,
    blur_mask,
)


def process_file(pipeline, path, mask_path=None, cache_dir=None) -> np.ndarray:
    """The preprocessed picture as floats in [0, 1] (the 8-bit picture the cache stores, scaled)."""
    return preprocess_file(pipeline, path, mask_path, cache_dir=cache_dir).image / 255.0


@pytest.fixture(autouse=True)
def no_lung_model(tmp_path_factory, monkeypatch):
    """No trained lung model anywhere: pipelines that segment lungs use the classical fallback."""
    monkeypatch.setenv("LUNGSCREEN_LUNG_MODEL", str(tmp_path_factory.mktemp("models") / "absent.pt"))


def ramp(height: int = 12, width: int = 10) -> np.ndarray:
    return (np.arange(height * width, dtype=np.float32).reshape(height, width) / (height * width - 1)) * 0.6 + 0.2


def lungs_sample() -> Sample:
    mask = np.zeros((40, 60), bool)
    mask[8:32, 5:20] = mask[8:32, 40:55] = True
    return Sample(ramp(40, 60), {LUNGS: mask})


# --------------------------------------------------------------------------------------------------------
# transforms on tiny arrays
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("step", [Equalize(), CLAHE(clip_limit=2.0, tile_grid=2), Normalize()])
def test_intensity_steps_keep_shape_and_span_unit_range(step):
    out = step(Sample(ramp())).image
    assert out.shape == (12, 10) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    if not isinstance(step, CLAHE):
        assert out.min() == pytest.approx(0.0, abs=1e-6) and out.max() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("step", [Normalize(), CenterSquare(), Equalize()])
def test_idempotent_steps(step):
    once = step(Sample(ramp())).image
    twice = step(Sample(once)).image
    np.testing.assert_allclose(twice, once, atol=1 / 255 + 1e-6)  # equalization: up to one grey level


def test_geometric_steps_move_masks_and_boxes_with_the_image():
    mask = np.zeros((100, 80), bool)
    mask[50:60, 10:20] = True
    sample = Sample(ramp(100, 80), {REFERENCE: mask}, np.array([[10, 50, 20, 60], [0, 0, 80, 5]], np.float32),
                    ["lesion", "label-strip"])
    cropped = TopCrop(fraction=0.08)(sample)
    assert cropped.image.shape == (92, 80) and cropped.masks[REFERENCE].shape == (92, 80)
    assert cropped.box_labels == ["lesion"]  # the box inside the cropped strip is gone
    np.testing.assert_allclose(cropped.boxes[0], [10, 42, 20, 52])
    square = CenterSquare()(cropped)
    assert square.image.shape == (80, 80)
    resized = Resize(size=40)(square)
    assert resized.image.shape == (40, 40) and resized.masks[REFERENCE].dtype == bool
    ys, xs = np.nonzero(resized.masks[REFERENCE])
    x0, y0, x1, y1 = resized.boxes[0]
    assert x0 <= xs.min() + 1 and xs.max() <= x1 and y0 <= ys.min() + 1 and ys.max() <= y1


def test_apply_lung_mask_blurs_the_edge_and_keeps_only_lungs():
    sample = lungs_sample()
    out = ApplyLungMask(blur_radius=3.0)(sample).image
    assert out[20, 30] == pytest.approx(0.0, abs=1e-3)            # between the lungs, far from both edges
    assert out[20, 12] == pytest.approx(sample.image[20, 12], rel=0.02)  # 2.5 sigma inside a lung
    edge = out[20, 20] / sample.image[20, 20]
    assert 0.05 < edge < 0.95                                      # soft, not a sharp cut
    hard = ApplyLungMask(blur_radius=0)(sample).image
    assert set(np.unique(hard[sample.masks[LUNGS]] > 0)) == {True} and hard[~sample.masks[LUNGS]].max() == 0
    assert blur_mask(sample.masks[LUNGS], 3.0).max() <= 1.0


def test_crop_to_lungs_is_the_lung_box_plus_margin():
    out = CropToLungs(margin=0.0)(lungs_sample())
    assert out.image.shape == (24, 50) and out.masks[LUNGS].all(axis=0).sum() == 30
    assert CropToLungs(margin=0.1)(lungs_sample()).image.shape == (24 + 2 * 2, 60)  # clipped at the image edge


def test_lung_steps_need_segment_lungs_first():
    with pytest.raises(ConfigError, match="segment_lungs"):
        ApplyLungMask()(Sample(ramp()))


# --------------------------------------------------------------------------------------------------------
# pipelines and their JSON form
# --------------------------------------------------------------------------------------------------------

def phantom_image(index: int = 0, size: int = 96) -> np.ndarray:
    return render_phantom("normal", size=size, seed=0, index=index).image.astype(np.float32) / 255.0


@pytest.mark.parametrize("name", ["none", "covidnet", "equalize", "clahe", "tartaglione", "lungcrop"])
def test_every_named_pipeline_gives_a_unit_range_image(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LungModelWarning)
        pipeline = get_pipeline(name)
        out = pipeline(phantom_image())
        spec = json.loads(json.dumps(pipeline.to_dict()))  # plain JSON
    assert out.dtype == np.float32 and out.min() == pytest.approx(0) and out.max() == pytest.approx(1)
    if name == "covidnet":
        assert out.shape[0] == out.shape[1]
    rebuilt = Pipeline.from_dict(spec)
    np.testing.assert_allclose(rebuilt(phantom_image()), out, atol=1e-6)


def test_tartaglione_without_a_model_warns_loudly_and_records_the_classical_method():
    with pytest.warns(LungModelWarning, match="NO TRAINED LUNG MODEL"):
        spec = get_pipeline("tartaglione").to_dict()
    assert {"name": "segment_lungs", "method": "classical", "model": None, "convention": "heart-excluded",
            "weights_sha256": None, "min_area": 0.02} in spec["steps"]
    with pytest.raises(PreprocessingError, match="lungs train"):
        get_pipeline("tartaglione", {"segment_lungs.method": "unet"}).to_dict()


def test_overrides_and_bad_specs():
    pipeline = get_pipeline("tartaglione", ["apply_lung_mask.blur_radius=5", "segment_lungs.method=classical"])
    assert pipeline.steps[2] == ApplyLungMask(blur_radius=5)
    assert set(list_pipelines()) >= {"none", "covidnet", "equalize", "clahe", "tartaglione", "lungcrop"}
    for bad in ({"name": "nope"}, {"name": "clahe", "gamma": 2}, {"name": "clahe", "clip_limit": -1},
                {"name": "resize", "size": 2}, {"name": "top_crop", "fraction": 1.5}, "clahe"):
        with pytest.raises(ConfigError):
            transform_from_dict(bad)
    with pytest.raises(ConfigError, match="unknown pipeline"):
        get_pipeline("tartaglion")
    with pytest.raises(ConfigError, match="STEP.PARAM"):
        get_pipeline("clahe", ["clip_limit=3"])
    with pytest.raises(ConfigError):
        SegmentLungs(convention="whole-chest")


# --------------------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------------------

def test_all_white_image_is_refused_with_a_clear_error():
    with pytest.raises(PreprocessingError, match="blank image: every pixel is white"):
        get_pipeline("equalize")(np.ones((64, 64), np.float32))


def test_implausibly_small_lungs_are_refused_not_passed_on():
    with pytest.raises(PreprocessingError, match="lateral view"):
        SegmentLungs(method="classical", min_area=0.9)(Sample(phantom_image()))
    assert SegmentLungs(method="classical")(Sample(phantom_image())).masks[LUNGS].mean() > 0.1


def test_mask_of_the_wrong_size_is_refused():
    with pytest.raises(PreprocessingError, match="does not match the image size"):
        get_pipeline("none").apply(Sample(ramp(), {REFERENCE: np.ones((5, 5), bool)}))


def test_empty_lung_mask_is_refused():
    sample = Sample(ramp(40, 40), {LUNGS: np.zeros((40, 40), bool)})
    with pytest.raises(PreprocessingError, match="empty lung mask"):
        ApplyLungMask()(sample)


def test_reference_mask_of_another_aspect_ratio_is_refused(tmp_path):
    image, mask = tmp_path / "a.png", tmp_path / "a_mask.png"
    Image.fromarray((ramp(64, 48) * 255).astype(np.uint8)).save(image)
    Image.fromarray(np.full((32, 64), 255, np.uint8)).save(mask)
    with pytest.raises(LungscreenError, match="another aspect ratio"):  # recorded in the cache as a failure
        process_file("none", str(image), str(mask), cache_dir=tmp_path / "cache")
    with pytest.raises(ImageReadError, match="another aspect ratio"):
        process_file("none", str(image), str(mask))  # the same without a cache: the mask rides along, checked
    assert process_file("none", str(image)).shape == (64, 48)


# --------------------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------------------

def write_images(folder, count: int, size: int = 64):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        path = folder / f"img{index}.png"
        Image.fromarray(render_phantom("normal", size=size, seed=1, index=index).image).save(path)
        rows.append(new_row(path, "normal", f"p{index}", "phantom"))
    return pd.DataFrame(rows)


def test_process_file_cache_hits_and_invalidation(tmp_path):
    frame = write_images(tmp_path / "images", 1)
    path = frame["image_path"][0]
    cache = tmp_path / "cache"
    first = process_file("clahe", path, cache_dir=cache)
    files = sorted(cache.rglob("*.png"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    np.testing.assert_array_equal(process_file("clahe", path, cache_dir=cache), first)  # the same 8-bit picture
    np.testing.assert_array_equal(process_file("clahe", path), first)  # and the same without a cache
    assert files[0].stat().st_mtime_ns == stamp  # read, not recomputed
    process_file(get_pipeline("clahe", {"clahe.clip_limit": 4.0}), path, cache_dir=cache)
    assert len(list(cache.glob("clahe-*"))) == 2  # another parameter, another cache
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # the image file changed
    process_file("clahe", path, cache_dir=cache)
    assert len(list(cache.rglob("*.png"))) == 3


def test_failures_are_cached_and_reported(tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(blank)
    stamps = []
    for _ in range(2):
        with pytest.raises(PreprocessingError, match=f"{blank}: blank image"):
            process_file("equalize", str(blank), cache_dir=tmp_path / "cache")
        records = [p for p in (tmp_path / "cache").rglob("*.json") if p.name != "pipeline.json"]
        assert len(records) == 1 and json.loads(records[0].read_text())["ok"] is False
        stamps.append(records[0].stat().st_mtime_ns)
    assert stamps[0] == stamps[1]  # the second call read the recorded failure
    with pytest.raises(ImageReadError, match="no such file"):
        process_file("equalize", str(tmp_path / "absent.png"), cache_dir=tmp_path / "cache")


def test_preprocess_manifest_second_run_is_all_cache_and_a_parameter_change_recomputes(tmp_path):
    frame = write_images(tmp_path / "images", 5)
    blank = tmp_path / "images" / "blank.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(blank)
    frame = pd.concat([frame, pd.DataFrame([new_row(blank, "normal", "pb", "phantom")])], ignore_index=True)
    pipeline = get_pipeline("lungcrop", {"segment_lungs.method": "classical"})
    first = preprocess_manifest(frame, pipeline, tmp_path / "out", workers=1, progress=False)
    assert (first.computed, first.cached, len(first.failures)) == (6, 0, 1)
    assert "blank" in first.failures[0][1]
    written = load_manifest(first.manifest_path)
    assert len(written) == 5 and written["lung_mask_path"].map(os.path.isfile).all()
    assert (written["original_image_path"] == frame["image_path"][:5].map(str)).all()
    second = preprocess_manifest(frame, pipeline, tmp_path / "out", workers=1, progress=False)
    assert (second.computed, second.cached) == (0, 6)
    changed = get_pipeline("lungcrop", {"segment_lungs.method": "classical", "crop_to_lungs.margin": 0.2})
    third = preprocess_manifest(frame, changed, tmp_path / "out", workers=1, progress=False)
    assert (third.computed, third.cached) == (6, 0)


def test_preprocess_manifest_in_two_worker_processes(tmp_path):
    frame = write_images(tmp_path / "images", 20, size=48)
    result = preprocess_manifest(frame, "equalize", tmp_path / "out", workers=2, progress=False)
    assert result.computed == 20 and not result.failures
    np.testing.assert_allclose(
        np.asarray(Image.open(result.manifest["image_path"][3])) / 255.0,
        get_pipeline("equalize")(np.asarray(Image.open(frame["image_path"][3]), np.float32) / 255.0), atol=1 / 255)


def test_preprocess_command_runs_and_reuses_its_cache(tmp_path):
    from lungscreen.cli import _register, app

    _register()
    save_manifest(write_images(tmp_path / "images", 3), tmp_path / "m")
    runner = CliRunner()
    args = ["preprocess", str(tmp_path / "m.parquet"), "--pipeline", "tartaglione", "--out", str(tmp_path / "p"),
            "--workers", "1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "classical" in first.output and "3 computed" in first.output
    second = runner.invoke(app, args)
    assert "3 from the cache" in second.output
    refused = runner.invoke(app, args + ["--if-no-lung-model", "error"])
    assert refused.exit_code != 0 and "no lung model" in str(refused.exception)
