"""Lung segmentation: post-processing on drawn shapes, masks and conventions, the loss, a smoke train on real
pairs, the classical fallback, evaluation and the command line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lungscreen.data.manifest import new_row, save_manifest
from lungscreen.data.sources import Skips, get_source
from lungscreen.data.sources.common import BEHIND_HEART, HEART_EXCLUDED
from lungscreen.data.phantoms import render_phantom
from lungscreen.errors import LeakageError, ManifestError
from lungscreen.lungs import (
    ClassicalSegmenter,
    UNetSegmenter,
    classical_lung_mask,
    clean_mask,
    fill_holes,
    keep_largest_components,
    load_pair,
    mask_rows,
    read_reference_mask,
)
from lungscreen.lungs.evaluate import dice_iou, evaluate_segmenter, evaluation_rows
from lungscreen.lungs.train import ConventionLoss, LungTrainConfig, train_lung_model
from lungscreen.models import create
from lungscreen.preprocessing import PreprocessingError, get_pipeline

# --------------------------------------------------------------------------------------------------------
# post-processing on drawn shapes
# --------------------------------------------------------------------------------------------------------


def two_lungs(size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[10:54, 6:26] = True
    mask[10:54, 38:58] = True
    return mask


def test_keep_largest_components_drops_specks_and_third_regions():
    mask = two_lungs()
    noisy = mask.copy()
    noisy[0:2, 0:2] = True          # a speck
    noisy[58:63, 28:36] = True      # a third, larger blob, still far smaller than a lung
    assert (keep_largest_components(noisy) == mask).all()
    one_lung = np.zeros_like(mask)
    one_lung[10:54, 6:26] = True
    one_lung[60:62, 60:62] = True   # the only other region is a speck: under 10 % of the lung, dropped
    assert keep_largest_components(one_lung).sum() == 44 * 20
    assert keep_largest_components(one_lung, min_relative_size=0).sum() == 44 * 20 + 4
    assert not keep_largest_components(np.zeros((8, 8), bool)).any()


def test_fill_holes_and_clean_mask():
    mask = two_lungs()
    holed = mask.copy()
    holed[20:30, 10:20] = False     # an opacity the network missed
    assert (fill_holes(holed) == mask).all()
    holed[0, 0] = True
    assert (clean_mask(holed) == mask).all()


def test_dice_iou():
    a, b = two_lungs(), two_lungs()
    assert dice_iou(a, b) == (1.0, 1.0)
    b[:, 38:] = False
    dice, iou = dice_iou(a, b)
    assert dice == pytest.approx(2 / 3) and iou == pytest.approx(0.5)
    ignore = np.zeros_like(a)
    ignore[:, 32:] = True           # the disagreement is in an "Ignore" area: not counted
    assert dice_iou(a, b, ignore) == (1.0, 1.0)
    assert dice_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == (1.0, 1.0)


# --------------------------------------------------------------------------------------------------------
# masks, conventions, bad pairs
# --------------------------------------------------------------------------------------------------------

def save_gray(path, pixels: np.ndarray) -> str:
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return str(path)


def test_reference_mask_reads_ignore_grey_and_resizes_nearest(tmp_path):
    values = np.zeros((32, 32), np.uint8)
    values[4:28, 4:14] = 255
    values[4:28, 18:28] = 127       # v7labs "Ignore"
    reference = read_reference_mask(save_gray(tmp_path / "m.png", values), (64, 64))
    assert reference.lung.shape == (64, 64) and reference.lung.sum() == 48 * 20
    assert reference.ignore.sum() == 48 * 20 and not (reference.lung & reference.ignore).any()
    zero_one = read_reference_mask(save_gray(tmp_path / "z.png", values // 255), (32, 32))
    assert zero_one.lung.sum() == 24 * 10


def test_bad_pairs_are_refused_with_clear_errors(tmp_path):
    image = save_gray(tmp_path / "i.png", render_phantom(size=64).image)
    empty = save_gray(tmp_path / "empty.png", np.zeros((64, 64)))
    with pytest.raises(PreprocessingError, match="empty lung mask"):
        load_pair(image, empty, HEART_EXCLUDED, 64)
    wide = save_gray(tmp_path / "wide.png", np.full((32, 64), 255))
    with pytest.raises(PreprocessingError, match="does not fit an image of size 64x64"):
        load_pair(image, wide, HEART_EXCLUDED, 64)
    white = save_gray(tmp_path / "white.png", np.full((64, 64), 255))
    with pytest.raises(PreprocessingError, match="blank image"):
        load_pair(white, save_gray(tmp_path / "m.png", two_lungs() * 255), HEART_EXCLUDED, 64)
    with pytest.raises(PreprocessingError, match="unknown mask convention"):
        load_pair(image, save_gray(tmp_path / "m2.png", two_lungs() * 255), "lungs", 64)


def test_mask_rows_refuse_rows_without_a_convention():
    frame = pd.DataFrame([new_row("a.png", "normal", "p1", "x", mask_path="a_mask.png"),
                          new_row("b.png", "normal", "p2", "x")])
    with pytest.raises(ManifestError, match="no mask_convention"):
        mask_rows(frame)
    assert mask_rows(frame, BEHIND_HEART)["mask_convention"].tolist() == [BEHIND_HEART]
    with pytest.raises(ManifestError, match="no row with a lung mask"):
        mask_rows(frame.iloc[1:])


# --------------------------------------------------------------------------------------------------------
# model and loss
# --------------------------------------------------------------------------------------------------------

def test_lung_unet_in_the_registry():
    model = create("lung_unet", num_classes=2, in_channels=1, channels=[4, 8, 16])
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.zeros(1, 1, 30, 32))


def test_convention_loss_uses_the_rows_channel_and_ignores_unknown_pixels():
    criterion = ConventionLoss(containment_weight=0.0)
    lung = torch.zeros(2, 1, 8, 8)
    lung[:, :, 2:6, 2:6] = 1
    logits = torch.where(lung.bool(), 10.0, -10.0).repeat(1, 2, 1, 1)
    logits[0, 1] = -logits[0, 1]    # row 0 (convention 0): channel 1 is wrong but not its channel
    logits[1, 0] = -logits[1, 0]    # row 1 (convention 1): channel 0 is wrong but not its channel
    logits.requires_grad_(True)
    ignore = torch.zeros_like(lung)
    loss = criterion(logits, lung, ignore, torch.tensor([0, 1]))
    assert float(loss.detach()) < 0.01
    wrong = criterion(logits.detach(), lung, ignore, torch.tensor([1, 0]))
    assert float(wrong) > 1.0
    ignore[:, :, 0, 0] = 1
    loss = criterion(logits, lung, ignore, torch.tensor([0, 1]))
    loss.backward()
    assert logits.grad[:, :, 0, 0].abs().max() == 0  # no gradient from an "Ignore" pixel


# --------------------------------------------------------------------------------------------------------
# the classical fallback
# --------------------------------------------------------------------------------------------------------

def test_classical_segmentation_finds_phantom_lungs():
    scores = []
    for index in range(4):
        phantom = render_phantom("normal", size=128, seed=0, index=index)
        scores.append(dice_iou(classical_lung_mask(phantom.image / 255.0), phantom.mask)[0])
    assert np.mean(scores) > 0.7


# --------------------------------------------------------------------------------------------------------
# real pairs: smoke training, evaluation, the leakage guard, the command line
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_pairs(shared_data) -> pd.DataFrame:
    """12 OpenIST (heart excluded) and 12 viral-pneumonia pairs, split 8/2/2 per source by patient."""
    frames = []
    for source, folder in (("openist", "openist-lung-masks"), ("covid19-radiography", "viral-pneumonia-lung-masks")):
        rows = pd.DataFrame(get_source(source).read(shared_data / folder, Skips()))
        rows = rows[rows["mask_path"] != ""].sort_values("image_path").head(12).copy()
        rows["split"] = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
        frames.append(rows)
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def smoke_model(real_pairs, tmp_path_factory):
    path = tmp_path_factory.mktemp("lungs") / "lung_unet.pt"
    config = LungTrainConfig(size=64, epochs=1, batch_size=4, channels=(8, 16, 32), threads=1)
    report = train_lung_model(real_pairs, path, config, progress=False, log=lambda line: None)
    return path, report


def test_one_epoch_smoke_train_on_real_pairs(smoke_model):
    path, report = smoke_model
    assert path.is_file() and report.best_epoch == 1 and report.pairs == {"train": 16, "val": 4, "skipped": 0}
    assert 0.0 <= report.val_dice <= 1.0 and np.isfinite(report.history[0]["loss"])
    segmenter = UNetSegmenter.from_checkpoint(path, HEART_EXCLUDED)
    images = [np.random.default_rng(0).random((90, 70), dtype=np.float32), np.full((40, 50), 0.5, np.float32)]
    masks = segmenter.segment_batch(images)
    assert [m.shape for m in masks] == [(90, 70), (40, 50)] and all(m.dtype == bool for m in masks)
    assert segmenter.meta["class_names"] == [HEART_EXCLUDED, BEHIND_HEART]


def test_evaluation_per_source_with_intervals_and_the_leakage_guard(smoke_model, real_pairs):
    path, _ = smoke_model
    segmenter = UNetSegmenter.from_checkpoint(path, HEART_EXCLUDED)
    rows = evaluation_rows(real_pairs, "test")
    report = evaluate_segmenter(segmenter, rows, progress=False, n_resamples=200)
    assert [(g.source, g.convention, g.images) for g in report.groups] == [
        ("covid19-radiography", HEART_EXCLUDED, 2), ("openist", HEART_EXCLUDED, 2)]
    for group in report.groups:
        assert 0 <= group.dice.low <= group.dice.value <= group.dice.high <= 1
    classical = evaluate_segmenter(ClassicalSegmenter(), rows, progress=False, n_resamples=200)
    assert classical.overall["dice"].value > 0.5
    with pytest.raises(LeakageError, match="training set"):
        evaluate_segmenter(segmenter, evaluation_rows(real_pairs, "train"), progress=False)


def test_tartaglione_pipeline_uses_the_trained_model_and_records_its_hash(smoke_model, monkeypatch, shared_data):
    path, _ = smoke_model
    monkeypatch.setenv("LUNGSCREEN_LUNG_MODEL", str(path))
    spec = get_pipeline("tartaglione").to_dict()
    step = next(s for s in spec["steps"] if s["name"] == "segment_lungs")
    assert step["method"] == "unet" and step["model"] == str(path) and len(step["weights_sha256"]) == 64
    step["weights_sha256"] = "0" * 64  # another model than the one on disk: refused, not silently used
    from lungscreen.preprocessing import Pipeline

    with pytest.raises(PreprocessingError, match="SHA-256"):
        Pipeline.from_dict(spec).to_dict()


def test_lungs_commands(smoke_model, real_pairs, tmp_path):
    from lungscreen.cli import _register, app

    _register()
    path, _ = smoke_model
    save_manifest(real_pairs, tmp_path / "pairs")
    runner = CliRunner()
    result = runner.invoke(app, ["lungs", "evaluate", str(tmp_path / "pairs.parquet"), "--model", str(path),
                                 "--resamples", "100", "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    assert "openist" in result.output and "classical" in result.output and (tmp_path / "e.json").is_file()
    images = tmp_path / "in"
    images.mkdir()
    for index in range(2):
        save_gray(images / f"p{index}.png", render_phantom(size=96, index=index).image)
    (images / "broken.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["lungs", "segment", str(images), "--out", str(tmp_path / "masks"),
                                 "--method", "classical"])
    assert result.exit_code == 0, result.output
    assert "2 mask(s)" in result.output and "broken.png" in result.output
    mask = np.asarray(Image.open(tmp_path / "masks" / "p0_mask.png"))
    assert mask.shape == (96, 96) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(tmp_path / "masks" / "p0_overlay.png")).shape == (96, 96, 3)
