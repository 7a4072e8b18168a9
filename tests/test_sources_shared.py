"""Every source adapter on the real public folders in ../shared/data, against the counts its README states.

Skipped with a reason where ../shared/data is absent (see tests/conftest.py). Layouts that are not present
there are tested on small trees in tests/test_sources.py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from lungscreen.data.build import collect_rows
from lungscreen.data.manifest import boxes_for_size, validate
from lungscreen.data.sources import Skips, detect_sources, get_source, read_table
from lungscreen.data.sources.common import BEHIND_HEART, HEART_EXCLUDED, PEDIATRIC

pytestmark = pytest.mark.shared_data

#: Folder under ../shared/data -> (source, layout root relative to ../shared/data).
EXPECTED_ROOTS = {
    ("cohen", "cohen-covid-chestxray"),
    ("figure1", "figure1-covid-chestxray"),
    ("nih-darkcovidnet", "nih-chestxray14-darkcovidnet"),
    ("openist", "openist-lung-masks"),
    ("covid-ct", "ucsd-covid-ct"),
    ("v7labs", "v7labs-covid-xray"),
    ("covid19-radiography", "viral-pneumonia-lung-masks"),
    ("covid19-radiography", "covid19-radiography-database/COVID-19_Radiography_Dataset"),
}
#: Folders with no labelled layout: dicom/ holds one unlabelled RSNA DICOM for the image-reader tests.
UNLABELLED = {"dicom"}


def read(shared: Path, name: str, relative: str) -> tuple[pd.DataFrame, Skips]:
    skips = Skips()
    rows = get_source(name).read(shared / relative, skips)
    return pd.DataFrame(rows), skips


def size(path: str | Path) -> tuple[int, int]:
    with Image.open(path) as image:  # header only: no decode
        return image.size


def test_detect_finds_every_folder_once(shared_data: Path) -> None:
    found = detect_sources(shared_data)
    roots = [root for _, root in found]
    assert len(roots) == len(set(roots)), "a folder was claimed twice"
    assert {(name, str(root.relative_to(shared_data))) for name, root in found} == EXPECTED_ROOTS
    top_level = {p.name for p in shared_data.iterdir() if p.is_dir()}
    covered = {root.relative_to(shared_data).parts[0] for root in roots}
    assert top_level - covered == UNLABELLED


def test_cohen_counts(shared_data: Path) -> None:
    folder = shared_data / "cohen-covid-chestxray"
    table = read_table(folder / "metadata.csv", ("patientid", "modality", "folder", "filename"))
    xray = table[table["modality"] == "X-ray"]
    assert len(xray) == 589 and table["patientid"].nunique() == 342
    present = [f for f, d in zip(xray["filename"], xray["folder"]) if (folder / d / f).is_file()]
    assert len(present) == 575  # 14 listed X-ray files are absent from this copy
    frame, skips = read(shared_data, "cohen", "cohen-covid-chestxray")
    assert (frame["modality"] == "CXR").sum() == len(set(present)) == 570  # 5 rows list a file twice
    assert skips.by_reason()["listed in metadata.csv but file absent"] > 0


def test_figure1_latin1_metadata_and_counts(shared_data: Path) -> None:
    frame, skips = read(shared_data, "figure1", "figure1-covid-chestxray")
    assert len(skips) == 0 and len(frame) == 55
    assert Counter(frame["label"]) == {"COVID-19": 35, "unknown": 15, "normal": 3, "pneumonia": 2}
    assert frame["image_path"].map(lambda p: Path(p).is_file()).all()
    # COVID-00003a and COVID-00003b are one patient.
    patients = dict(zip(frame["image_path"].map(lambda p: Path(p).stem), frame["patient_id"]))
    assert patients["COVID-00003a"] == patients["COVID-00003b"] == "figure1:COVID-00003"
    assert frame["patient_id"].nunique() == 48
    assert set(frame["view"]) <= {"AP", "PA", "unknown"}


def test_nih_darkcovidnet_counts_and_scaled_boxes(shared_data: Path) -> None:
    frame, skips = read(shared_data, "nih-darkcovidnet", "nih-chestxray14-darkcovidnet")
    assert len(skips) == 0
    assert Counter(frame["label"]) == {"pneumonia": 427, "normal": 411}
    assert frame["patient_id"].str.fullmatch(r"nih:\d{8}").all()
    boxed = frame[frame["boxes"] != ""]
    assert len(boxed) == 39  # of the list's 880 boxed images, 39 are in this copy, with 43 boxes
    assert sum(len(boxes_for_size(row, 1024, 1024)) for _, row in boxed.iterrows()) == 43
    assert (boxed["box_frame_width"] == 1024).all() and (boxed["box_frame_height"] == 1024).all()
    row = boxed[boxed["image_path"].str.endswith("00012045_005.png")].iloc[0]
    width, height = size(row["image_path"])
    assert (width, height) == (384, 384)
    (x0, y0, x1, y1, name), = boxes_for_size(row, width, height)
    # BBox_List_2017.csv: 00012045_005.png Pneumonia 591.075556 388.304601 244.622222 271.928889 (1024 px)
    assert name == "Pneumonia"
    assert (x0, y0) == pytest.approx((591.08 * 0.375, 388.30 * 0.375), abs=0.01)
    assert (x1, y1) == pytest.approx(((591.08 + 244.62) * 0.375, (388.30 + 271.93) * 0.375), abs=0.01)


def test_covid_ct_patients_from_meta_files(shared_data: Path) -> None:
    adapter, skips = get_source("covid-ct"), Skips()
    frame = pd.DataFrame(adapter.read(shared_data / "ucsd-covid-ct", skips))
    assert len(skips) == 0 and adapter.fallbacks == []  # every file matched its meta row
    assert Counter(frame["label"]) == {"COVID-19": 349, "other": 397}
    assert (frame["modality"] == "CT").all()
    covid, noncovid = frame[frame["label"] == "COVID-19"], frame[frame["label"] == "other"]
    assert covid["patient_id"].nunique() == 213 and covid["patient_id"].str.startswith("covid-ct:Patient ").all()
    assert noncovid["patient_id"].nunique() == 171
    assert noncovid["patient_id"].str.fullmatch(r"covid-ct:(crawled|medpix)_patient_\d+").all()


def test_v7labs_masks_join_cohen_images(shared_data: Path) -> None:
    joins, skips = read(shared_data, "v7labs", "v7labs-covid-xray")
    assert len(joins) == 510
    assert skips.by_reason() == {
        "Darwin JSON has no lung polygon (lateral view or CT slice); its empty mask is not used": 82,
        "mask PNG named by a Darwin JSON is absent": 7,
    }
    with_mask = joins[joins["mask_path"] != ""]
    assert len(with_mask) == 428 and (with_mask["mask_convention"] == BEHIND_HEART).all()

    build_skips = Skips()
    frame, _ = collect_rows([shared_data / "cohen-covid-chestxray", shared_data / "v7labs-covid-xray"], build_skips)
    assert not [r for _, r in build_skips.items if "image not found" in r], "every Darwin JSON found its Cohen image"
    assert (frame["v7labs_pneumonia"].fillna("") != "").sum() == 510
    masked = frame[frame["mask_path"] != ""]
    assert len(masked) == 428 and (masked["source"] == "cohen").all()
    # The masks were resized with the Cohen images: the same size, file by file.
    assert all(size(m) == size(i) for m, i in zip(masked["mask_path"], masked["image_path"]))
    validate(frame)


def test_viral_pneumonia_mask_pairs(shared_data: Path) -> None:
    frame, skips = read(shared_data, "covid19-radiography", "viral-pneumonia-lung-masks")
    assert len(skips) == 0 and len(frame) == 600
    assert (frame["label"] == "viral").all() and (frame["age_group"] == PEDIATRIC).all()
    assert (frame["mask_path"] != "").all() and (frame["mask_convention"] == HEART_EXCLUDED).all()
    assert (frame["mask_path"].map(lambda p: Path(p).name) == frame["image_path"].map(lambda p: Path(p).name)).all()
    assert size(frame["image_path"].iloc[0]) == (299, 299) and size(frame["mask_path"].iloc[0]) == (256, 256)


def test_openist_mask_pairs(shared_data: Path) -> None:
    frame, skips = read(shared_data, "openist", "openist-lung-masks")
    assert len(skips) == 0 and len(frame) == 275
    assert (frame["label"] == "normal").all() and (frame["mask_convention"] == HEART_EXCLUDED).all()
    assert frame["mask_path"].str.endswith("@.png").all()
    assert all(size(m) == size(i) for m, i in zip(frame["mask_path"], frame["image_path"]))


def test_radiography_flat_layout(shared_data: Path) -> None:
    frame, skips = read(shared_data, "covid19-radiography", "covid19-radiography-database/COVID-19_Radiography_Dataset")
    assert len(skips) == 0
    assert Counter(frame["label"]) == {"COVID-19": 1000, "normal": 1000}
    assert frame["patient_id"].nunique() == 2000  # no patient ids: each image its own patient
    assert (frame["mask_path"] == "").all()
