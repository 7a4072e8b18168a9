"""Synthetic phantoms: pixels, masks, boxes, the planted shortcut, and the public layouts they are written in."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from lungscreen.data import phantoms, synth
from lungscreen.data.phantoms import PHANTOM_LABELS, Shortcut, render_phantom
from lungscreen.data.synth import synthesize
from lungscreen.errors import ConfigError
from lungscreen.io import read_image, read_mask

DISEASED = ("bacterial", "pneumonia", "viral", "COVID-19")


def _thumbnail(pixels: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm 32 x 32 grey thumbnail: its dot product with another is their Pearson r."""
    small = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.BOX), dtype=np.float64).ravel()
    small -= small.mean()
    return small / np.linalg.norm(small)


# --- one phantom ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", PHANTOM_LABELS)
def test_phantom_has_image_two_lungs_and_boxes_inside_them(label):
    phantom = render_phantom(label, size=128, seed=4, index=2)
    assert phantom.image.shape == (128, 128) and phantom.image.dtype == np.uint8
    assert phantom.mask.shape == (128, 128) and phantom.mask.dtype == bool
    count, _ = cv2.connectedComponents(phantom.mask.astype(np.uint8))
    assert count - 1 >= 2, "two separate lungs"
    assert 0.1 < phantom.mask.mean() < 0.6
    lungs = phantom.image[phantom.mask].mean()
    assert lungs < np.percentile(phantom.image, 80), "air-filled lungs are darker than the mediastinum/abdomen"
    if label == "normal":
        assert phantom.boxes == []
    else:
        assert phantom.boxes
        for x0, y0, x1, y1 in phantom.boxes:
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
            assert phantom.mask[y0:y1, x0:x1].any(), "a lesion box lies over a lung"


def test_same_arguments_same_pixels_and_different_index_different_film():
    first = render_phantom("COVID-19", size=96, seed=7, index=3)
    again = render_phantom("COVID-19", size=96, seed=7, index=3)
    other = render_phantom("COVID-19", size=96, seed=7, index=4)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.mask, again.mask)
    assert first.boxes == again.boxes
    assert not np.array_equal(first.image, other.image)


@pytest.mark.parametrize("label", DISEASED)
def test_opacities_stay_in_the_lungs_and_whiten_them(label):
    """Same film with and without disease: they differ only in and around the lungs, which get denser."""
    normal = render_phantom("normal", size=128, seed=1, index=11)
    sick = render_phantom(label, size=128, seed=1, index=11)
    assert np.array_equal(normal.mask, sick.mask)
    near_lungs = cv2.dilate(normal.mask.astype(np.uint8), np.ones((25, 25), np.uint8)).astype(bool)
    difference = sick.image.astype(int) - normal.image.astype(int)
    assert np.abs(difference[~near_lungs]).max() == 0
    inside = np.zeros_like(normal.mask)
    for x0, y0, x1, y1 in sick.boxes:
        inside[y0:y1, x0:x1] = True
    assert difference[inside & sick.mask].mean() > 2, "the lesion regions are brighter than on the normal film"


def test_lesion_patterns_differ_by_label():
    """COVID-19 sits low and lateral, viral near the hila, bacterial is a dense lobe: measured on 12 films."""
    def stats(label):
        lateral, height, density = [], [], []
        for index in range(12):
            sick = render_phantom(label, size=128, seed=5, index=index)
            normal = render_phantom("normal", size=128, seed=5, index=index)
            gain = sick.image.astype(float) - normal.image
            ys, xs = np.nonzero(sick.mask)
            centre_x, top, bottom = xs.mean(), ys.min(), ys.max()
            for x0, y0, x1, y1 in sick.boxes:
                lateral.append(abs((x0 + x1) / 2 - centre_x))
                height.append(((y0 + y1) / 2 - top) / (bottom - top))
                density.append(gain[y0:y1, x0:x1][sick.mask[y0:y1, x0:x1]].mean())
        return np.mean(lateral), np.mean(height), np.mean(density)

    covid, viral, bacterial = stats("COVID-19"), stats("viral"), stats("bacterial")
    assert covid[0] > viral[0], "COVID-19 opacities are more peripheral than viral ones"
    assert covid[1] > 0.5, "COVID-19 opacities sit in the lower zones"
    assert bacterial[2] > covid[2] and bacterial[2] > viral[2], "consolidation is denser than ground glass"


def test_independent_phantoms_are_not_near_duplicates():
    """The dedup step pairs images whose 32 x 32 thumbnails correlate >= 0.94: phantoms stay well below 0.9."""
    thumbnails = np.stack([_thumbnail(render_phantom(PHANTOM_LABELS[i % 5], size=128, seed=21, index=i).image)
                           for i in range(60)])
    correlation = thumbnails @ thumbnails.T
    pairs = correlation[np.triu_indices(len(thumbnails), 1)]
    print(f"32x32 thumbnail correlation over {len(pairs)} pairs: max {pairs.max():.3f}, "
          f"99th percentile {np.quantile(pairs, 0.99):.3f}, mean {pairs.mean():.3f}")
    assert pairs.max() < 0.9
    assert pairs.mean() < 0.6


def test_follow_ups_share_anatomy_but_not_the_film():
    same = [phantoms._patient_anatomy(2, index, patient=77) for index in (0, 1)]
    assert all(np.array_equal(a, b) for a, b in zip(same[0].lungs, same[1].lungs)) and same[0].heart == same[1].heart
    assert not np.array_equal(phantoms._patient_anatomy(2, 1, patient=78).lungs[0], same[0].lungs[0])
    assert not np.array_equal(phantoms._patient_anatomy(2, 1, patient=None).lungs[0], same[0].lungs[0])
    first = render_phantom("normal", size=96, seed=2, index=0, patient=77)
    later = render_phantom("normal", size=96, seed=2, index=1, patient=77)
    assert not np.array_equal(first.image, later.image), "another film: pose, exposure and noise differ"


def test_marker_shortcut_is_a_letter_in_the_top_right_corner():
    plain = render_phantom("COVID-19", size=128, seed=3, index=8)
    marked = render_phantom("COVID-19", size=128, seed=3, index=8, shortcut=Shortcut("marker", strength=1.0))
    faint = render_phantom("COVID-19", size=128, seed=3, index=8, shortcut=Shortcut("marker", strength=0.0))
    changed = np.argwhere(marked.image != plain.image)
    assert len(changed) > 10
    assert changed[:, 0].max() < 128 * 0.25 and changed[:, 1].min() > 128 * 0.75, "top-right corner only"
    assert marked.image.max() >= faint.image.max()
    where = tuple(changed.T)
    assert (marked.image.astype(int) - plain.image)[where].mean() > (faint.image.astype(int) - plain.image)[where].mean()


def test_intensity_shortcut_brightens_and_flattens_the_film():
    plain = render_phantom("normal", size=96, seed=3, index=9)
    shifted = render_phantom("normal", size=96, seed=3, index=9, shortcut=Shortcut("intensity", strength=1.0))
    assert shifted.image.mean() > plain.image.mean() + 20
    assert shifted.image.std() < plain.image.std()


@pytest.mark.parametrize("bad", [dict(kind="arrow"), dict(kind="marker", by="hospital"), dict(kind="marker", strength=1.5)])
def test_bad_shortcut_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        Shortcut(**bad)


def test_bad_label_and_size_are_config_errors():
    with pytest.raises(ConfigError, match="unknown"):
        render_phantom("tuberculosis")
    with pytest.raises(ConfigError, match="size"):
        render_phantom("normal", size=8)


# --- the tree in public layouts -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms") / "tree"
    result = synthesize(root, 60, size=64, seed=5, layouts=("radiography", "nih", "kermany"),
                        shortcut=Shortcut("marker", "label", "COVID-19", 0.5))
    assert not result.cached and result.images == 60
    return root


def test_tree_has_the_real_layouts_and_synth_json(tree):
    summary = json.loads((tree / "synth.json").read_text())
    assert summary["parameters"]["seed"] == 5 and summary["images"] == 60
    assert set(summary["sources"]) == {"radiography", "nih", "kermany"}
    radiography = tree / "COVID-19_Radiography_Dataset"
    for name in ("COVID", "Normal", "Lung_Opacity", "Viral Pneumonia"):
        images = sorted((radiography / name / "images").glob(f"{name}-*.png"))
        assert images, name
        assert [p.name for p in images] == sorted(p.name for p in (radiography / name / "masks").glob("*.png"))
        assert (radiography / f"{name}.metadata.xlsx").is_file()
    assert set(summary["sources"]["radiography"]["labels"]) == {"COVID-19", "normal", "pneumonia", "viral"}
    assert all("COVID-19" not in summary["sources"][name]["labels"] for name in ("nih", "kermany"))
    kermany = list((tree / "chest_xray").glob("*/*/*.jpeg"))
    assert any("_bacteria_" in p.name for p in kermany) and any("_virus_" in p.name for p in kermany)
    assert {p.parent.name for p in kermany} == {"NORMAL", "PNEUMONIA"}
    assert not list(tree.parent.glob(".tree.partial-*")), "no staging folder left behind"


def test_radiography_masks_are_0_255_at_256_px_and_fit_their_image(tree):
    mask_path = next((tree / "COVID-19_Radiography_Dataset" / "COVID" / "masks").glob("*.png"))
    stored = np.asarray(Image.open(mask_path))
    assert stored.shape == (256, 256) and set(np.unique(stored)) <= {0, 255}
    image = read_image(mask_path.parents[1] / "images" / mask_path.name)
    assert image.size == (64, 64)
    assert read_mask(mask_path, size=image.size).mean() > 0.1


def test_nih_tables_use_nih_columns_follow_ups_and_the_1024_frame(tree):
    folder = tree / "NIH-ChestX-ray14"
    entries = pd.read_csv(folder / "Data_Entry_2017.csv")
    assert list(entries.columns[:7]) == ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                                         "Patient Gender", "View Position"]
    assert "OriginalImage[Width" in entries.columns and "OriginalImagePixelSpacing[x" in entries.columns
    assert all((folder / "images" / name).is_file() for name in entries["Image Index"])
    assert (entries["Image Index"].str[:8].astype(int) == entries["Patient ID"]).all()
    assert entries.groupby("Patient ID").size().max() >= 2, "some patients have follow-ups"
    assert set(entries["Finding Labels"]) - {"No Finding"}, "pneumonia findings too"
    boxes = pd.read_csv(folder / "BBox_List_2017.csv")
    assert list(boxes.columns) == ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"]
    truth = json.loads((tree / "synth.json").read_text())["boxes"]["by_image"]
    row = boxes.iloc[0]
    x0, y0, x1, y1 = truth[f"NIH-ChestX-ray14/images/{row['Image Index']}"][0]
    scale = 1024 / 64
    expected = (x0 * scale, y0 * scale, (x1 - x0) * scale, (y1 - y0) * scale)
    assert (row["Bbox [x"], row["y"], row["w"], row["h]"]) == pytest.approx(expected)


def test_shortcut_files_are_recorded_and_are_exactly_the_marked_covid_images(tree):
    """Every recorded file is render_phantom's film with the marker; every other COVID-19 file is the plain film."""
    summary = json.loads((tree / "synth.json").read_text())
    planted = summary["shortcut"]
    covid = summary["labels"]["COVID-19"]
    assert planted["targeted_images"] == covid and planted["carriers"] == round(0.5 * covid) == len(planted["files"])
    marker = Shortcut("marker", strength=0.5)
    plain = {index: render_phantom("COVID-19", size=64, seed=5, index=index).image for index in range(60)}
    for path in sorted((tree / "COVID-19_Radiography_Dataset" / "COVID" / "images").glob("*.png")):
        stored = np.asarray(Image.open(path))
        if str(path.relative_to(tree)) in planted["files"]:
            marked = {i: render_phantom("COVID-19", size=64, seed=5, index=i, shortcut=marker).image for i in plain}
            index = next(i for i, film in marked.items() if np.array_equal(stored, film))
            changed = np.argwhere(stored != plain[index])
            assert len(changed) and changed[:, 0].max() < 16 and changed[:, 1].min() >= 48, "marker in the top-right corner"
        else:
            assert any(np.array_equal(stored, film) for film in plain.values())


def test_source_adapters_read_the_tree(tree):
    """The layouts are real enough for lungscreen's own adapters: same counts and labels as synth.json."""
    from lungscreen.data.sources import Skips, detect_sources, get_source

    summary = json.loads((tree / "synth.json").read_text())
    found = dict(detect_sources(tree))
    assert {root.name for root in found.values()} == {"COVID-19_Radiography_Dataset", "NIH-ChestX-ray14", "chest_xray"}
    labels: dict[str, int] = {}
    for name, root in found.items():
        skips = Skips()
        rows = get_source(name).read(root, skips)
        assert len(skips) == 0, skips.items[:3]
        for row in rows:
            labels[row["label"]] = labels.get(row["label"], 0) + 1
    assert labels == summary["labels"]


def test_same_parameters_are_a_cache_and_others_are_refused(tree):
    before = (tree / "synth.json").stat().st_mtime_ns
    again = synthesize(tree, 60, size=64, seed=5, layouts=("radiography", "nih", "kermany"),
                       shortcut=Shortcut("marker", "label", "COVID-19", 0.5))
    assert again.cached and (tree / "synth.json").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="other parameters"):
        synthesize(tree, 61, size=64, seed=5)


def test_overwrite_replaces_a_phantom_tree_but_never_a_foreign_folder(tmp_path):
    root = tmp_path / "tree"
    synthesize(root, 6, size=48, seed=1)
    replaced = synthesize(root, 8, size=48, seed=2, overwrite=True)
    assert replaced.images == 8 and json.loads((root / "synth.json").read_text())["parameters"]["seed"] == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        synthesize(foreign, 6, size=48, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_workers_write_identical_files(tmp_path):
    one = synthesize(tmp_path / "one", 16, size=48, seed=9, shortcut=Shortcut("intensity", "source", "nih", 1.0))
    two = synthesize(tmp_path / "two", 16, size=48, seed=9, shortcut=Shortcut("intensity", "source", "nih", 1.0), workers=2)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.png"))
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)
    assert one.shortcut_files == two.shortcut_files
    assert one.shortcut_files and all(f.startswith("NIH-ChestX-ray14/") for f in one.shortcut_files)


def test_a_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    written = itertools.count()
    original = synth._write_image

    def failing(path, pixels, mask=False):
        if next(written) == 5:
            raise OSError("disk full")
        original(path, pixels, mask)

    monkeypatch.setattr(synth, "_write_image", failing)
    with pytest.raises(OSError, match="disk full"):
        synthesize(tmp_path / "tree", 12, size=48)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options, message", [
    (dict(classes=["tuberculosis"]), "unknown class"),
    (dict(classes=["bacterial"]), "no layout"),
    (dict(layouts=["chexpert"]), "unknown layout"),
    (dict(shortcut=Shortcut("marker", "source", "kermany")), "not a source"),
    (dict(shortcut=Shortcut("marker", "label", "viral"), classes=["normal", "COVID-19"]), "not a label"),
    (dict(n=0), "number of images"),
])
def test_bad_parameters_are_config_errors(tmp_path, options, message):
    arguments = {"n": 6, "size": 48, **options}
    with pytest.raises(ConfigError, match=message):
        synthesize(tmp_path / "tree", **arguments)
    assert not (tmp_path / "tree").exists()


def test_classes_restrict_what_is_drawn(tmp_path):
    result = synthesize(tmp_path / "tree", 20, size=48, classes=["normal", "COVID-19"])
    assert {label for counts in result.counts.values() for label in counts} == {"normal", "COVID-19"}
    assert not (tmp_path / "tree" / "COVID-19_Radiography_Dataset" / "Lung_Opacity").exists()
    only_covid = synthesize(tmp_path / "covid", 10, size=48, classes=["COVID-19"])
    assert only_covid.images == 10 and only_covid.counts == {"radiography": {"COVID-19": 10}}


# --- the command ---------------------------------------------------------------------------------------


def test_synth_command_writes_a_tree_and_explains_itself(tmp_path):
    import typer

    from lungscreen.cli.data_synth import synth_command

    app = typer.Typer()
    app.command("synth")(synth_command)
    app.command("other")(lambda: None)  # two commands, so "synth" is a sub-command as under `lungscreen data`
    runner = CliRunner()
    assert "--shortcut-by" in runner.invoke(app, ["synth", "--help"]).output
    result = runner.invoke(app, ["synth", str(tmp_path / "out"), "--n", "8", "--size", "48", "--shortcut", "marker",
                                 "--strength", "1", "--seed", "3"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "synth.json").read_text())
    assert summary["shortcut"]["kind"] == "marker" and summary["shortcut"]["target"] == "COVID-19"
    assert "8 phantoms" in result.output
