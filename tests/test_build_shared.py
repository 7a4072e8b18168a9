"""`data build` over every folder of ../shared/data: counts as the data README states, overlaps found, no leakage."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from lungscreen.data.build import build_manifest
from lungscreen.data.composition import composition
from lungscreen.data.splits import check_leakage


@pytest.fixture(scope="module")
def built(shared_data: Path):
    return build_manifest([shared_data], seed=0, workers=2, show_progress=False)


def images(frame: pd.DataFrame, **where: str) -> int:
    rows = frame
    for column, value in where.items():
        rows = rows[rows[column] == value]
    return len(rows)


def test_every_folder_is_read(built, shared_data: Path) -> None:
    top_folders = {root.relative_to(shared_data).parts[0] for _, root in built.sources}
    expected = {p.name for p in shared_data.iterdir() if p.is_dir()} - {"dicom"}  # one loose DICOM, no layout
    assert top_folders == expected
    assert sorted(name for name, _ in built.sources) == sorted(
        ["cohen", "covid-ct", "covid19-radiography", "covid19-radiography", "figure1", "nih-darkcovidnet", "openist", "v7labs"])


def test_counts_match_the_data_readme(built) -> None:
    frame = built.manifest
    # Cohen: 589 X-ray rows listed, 14 files absent, 5 rows repeat a file under a second patient id.
    assert images(frame, source="cohen", modality="CXR") == 570
    assert images(frame, source="cohen", modality="CXR", label="COVID-19") == 451  # 446 "COVID-19" + "COVID-19, ARDS" present
    assert images(frame, source="cohen", modality="CXR", fine_label="No Finding") == 19
    assert images(frame, source="cohen", view="Lateral") > 0  # kept, filtered by tasks
    assert images(frame, source="cohen", modality="CT") == 63
    assert images(frame, source="figure1") == 55
    assert images(frame, source="figure1", label="COVID-19") == 35
    assert images(frame, source="figure1", label="normal") == 3 and images(frame, source="figure1", label="pneumonia") == 2
    assert images(frame, source="figure1", label="unknown") == 15  # blank = pending, not normal
    assert images(frame, source="nih-darkcovidnet", label="normal") == 411
    assert images(frame, source="nih-darkcovidnet", label="pneumonia") == 427
    assert images(frame, source="covid-ct", label="COVID-19") == 349 and images(frame, source="covid-ct", label="other") == 397
    radiography = frame[frame["source"] == "covid19-radiography"]
    assert (radiography["label"] == "COVID-19").sum() == 1000 and (radiography["label"] == "normal").sum() == 1000
    assert (radiography["label"] == "viral").sum() == 600 and (radiography["mask_path"] != "").sum() == 600
    assert images(frame, source="openist") == 275 and (frame.loc[frame["source"] == "openist", "mask_path"] != "").all()
    v7labs = frame[frame["mask_convention"] == "behind-heart-included"]
    assert len(v7labs) == 428 and set(v7labs["source"]) == {"cohen"}  # 510 masks, 82 without a lung polygon
    assert len(frame) == 5147


def test_patient_ids(built) -> None:
    frame = built.manifest
    cohen_cxr = frame[(frame["source"] == "cohen") & (frame["modality"] == "CXR")]
    assert cohen_cxr["patient_id"].nunique() == 311
    assert frame.loc[frame["source"] == "covid-ct", "patient_id"].nunique() == 384
    assert frame.loc[frame["source"] == "nih-darkcovidnet", "patient_id"].nunique() == 568


def test_cross_source_overlaps_are_grouped(built) -> None:
    frame = built.manifest
    groups = frame[frame["dup_group"] != ""].groupby("dup_group")["source"].agg(lambda s: frozenset(s))
    spans = groups.value_counts()
    cohen_radiography = sum(n for sources, n in spans.items() if {"cohen", "covid19-radiography"} <= sources)
    assert cohen_radiography >= 100, "the README's ~140 recycled Cohen images must be found"
    assert any({"covid19-radiography", "nih-darkcovidnet"} <= s for s in spans.index), "Radiography normals that are NIH images"
    assert any("figure1" in s and "cohen" in s for s in spans.index)
    assert any("figure1" in s and "covid19-radiography" in s for s in spans.index)
    assert any(s == {"cohen"} for s in spans.index) and any(s == {"covid19-radiography"} for s in spans.index)


def test_no_leakage_and_composition(built) -> None:
    frame = built.manifest
    check_leakage(frame)
    table = composition(frame)
    assert table[("total", "images")].sum() == len(frame)
    assert {"train", "val", "test"} <= set(table.columns.get_level_values(0))
    assert len(built.skips) == 129
