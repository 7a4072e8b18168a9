"""Manifest schema, label maps, saving and loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lungscreen.data.labels import TASKS, canonical_from_finding, get_task
from lungscreen.data.manifest import (
    boxes_for_size,
    encode_boxes,
    for_task,
    load_manifest,
    new_row,
    normalize_view,
    save_manifest,
    validate,
)
from lungscreen.errors import ManifestError


def rows(count: int = 4, **overrides) -> pd.DataFrame:
    labels = ["normal", "bacterial", "viral", "COVID-19"]
    frame = pd.DataFrame([new_row(f"/data/img{i}.png", labels[i % 4], f"p{i}", "demo") for i in range(count)])
    for key, value in overrides.items():
        frame[key] = value
    return frame


@pytest.mark.parametrize(("finding", "label", "fine"), [
    ("COVID-19", "COVID-19", "COVID-19"),
    ("COVID-19, ARDS", "COVID-19", "COVID-19, ARDS"),
    ("Pneumonia/Viral/COVID-19", "COVID-19", "Pneumonia/Viral/COVID-19"),
    ("Pneumonia/Bacterial/Streptococcus", "bacterial", "Streptococcus"),
    ("Streptococcus", "bacterial", "Streptococcus"),
    ("Mycoplasma Bacterial Pneumonia", "bacterial", "Mycoplasma"),
    ("E.Coli", "bacterial", "E.Coli"),
    ("SARS", "viral", "SARS"),
    ("Pneumonia/Viral/Influenza", "viral", "Influenza"),
    ("Pneumocystis", "fungal", "Pneumocystis"),
    ("Pneumonia/Fungal/Pneumocystis", "fungal", "Pneumocystis"),
    ("Pneumonia", "pneumonia", "Pneumonia"),
    ("Lung Opacity", "pneumonia", "Lung Opacity"),
    ("No Finding", "normal", "No Finding"),
    ("ARDS", "other", "ARDS"),
    ("Pneumonia/Lipoid", "other", "Lipoid"),
    ("Tuberculosis", "other", "Tuberculosis"),
    ("", "unknown", ""),
    (float("nan"), "unknown", ""),
    ("todo", "unknown", "todo"),
])
def test_findings_map_to_canonical_labels(finding, label, fine) -> None:
    assert canonical_from_finding(finding) == (label, fine)


def test_tasks() -> None:
    assert TASKS["covidx"].classes == ("normal", "pneumonia", "COVID-19")
    assert TASKS["covidx"].class_of("fungal") == "pneumonia"
    assert TASKS["covid-resnet"].class_of("pneumonia") is None  # cause unknown: not bacterial, not viral
    assert TASKS["binary"].index_of("COVID-19") == 1
    assert TASKS["binary"].class_of("other") == "non-COVID"  # COVID-19 against everything else
    with pytest.raises(ManifestError, match="unknown task"):
        get_task("5-class")


@pytest.mark.parametrize(("text", "view"), [("PA", "PA"), ("AP Supine", "AP Supine"), ("AP erect", "AP"),
                                            ("L", "Lateral"), ("Axial", "Axial"), ("", "unknown"), (None, "unknown")])
def test_views(text, view) -> None:
    assert normalize_view(text) == view


def test_validate_fills_optional_columns() -> None:
    frame = validate(pd.DataFrame([{"image_path": "a.png", "label": "normal", "patient_id": "p", "source": "s"}]))
    assert frame.loc[0, "view"] == "unknown" and frame.loc[0, "modality"] == "CXR" and frame.loc[0, "split"] == ""


def test_missing_columns_named() -> None:
    with pytest.raises(ManifestError, match="patient_id, source"):
        validate(pd.DataFrame({"image_path": ["a"], "label": ["normal"]}))


def test_unknown_label_named() -> None:
    with pytest.raises(ManifestError, match=r"'label' has unknown value\(s\) \['Covid'\]"):
        validate(rows(label=["normal", "Covid", "viral", "normal"]))


def test_nan_patient_ids_refused() -> None:
    with pytest.raises(ManifestError, match="'patient_id' is empty in 2 row"):
        validate(rows(patient_id=["a", np.nan, "", "d"]))


def test_duplicate_rows_refused() -> None:
    frame = pd.concat([rows(), rows().iloc[:1]])
    with pytest.raises(ManifestError, match="same image twice"):
        validate(frame)


def test_bad_split_and_modality() -> None:
    with pytest.raises(ManifestError, match="'split'"):
        validate(rows(split="training"))
    with pytest.raises(ManifestError, match="'modality'"):
        validate(rows(modality="MRI"))


def test_save_and_load_roundtrip(tmp_path: Path) -> None:
    frame = rows(split=["train", "val", "test", "train"])
    frame.loc[0, "boxes"] = encode_boxes([(10, 20, 110, 220, "opacity")])
    frame.loc[0, ["box_frame_width", "box_frame_height"]] = 1024
    frame["extra_column"] = "kept"
    parquet, csv = save_manifest(frame, tmp_path / "m")
    for source in (parquet, csv):
        loaded = load_manifest(source)
        pd.testing.assert_frame_equal(loaded, validate(frame), check_dtype=False)


def test_relative_paths_resolve_against_manifest_folder(tmp_path: Path) -> None:
    frame = rows()
    frame["image_path"] = [f"images/{i}.png" for i in range(4)]
    frame.to_csv(tmp_path / "m.csv", index=False)
    loaded = load_manifest(tmp_path / "m.csv")
    assert loaded.loc[0, "image_path"] == str(tmp_path / "images" / "0.png")


def test_non_utf8_manifest_csv(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes("image_path,label,patient_id,source\nd\xe9j\xe0.png,normal,p,s\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_manifest(path)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(tmp_path / "absent")


def test_boxes_scale_to_real_image_size() -> None:
    row = {"boxes": encode_boxes([(512, 256, 768, 512, "opacity")]), "box_frame_width": 1024, "box_frame_height": 1024}
    assert boxes_for_size(row, 384, 384) == [(192.0, 96.0, 288.0, 192.0, "opacity")]
    assert boxes_for_size({"boxes": ""}, 10, 10) == []
    with pytest.raises(ManifestError, match="without a frame"):
        boxes_for_size({"boxes": row["boxes"], "image_path": "x"}, 10, 10)


def test_for_task_filters_lateral_ct_and_unmapped() -> None:
    frame = validate(pd.DataFrame([
        new_row("a", "COVID-19", "p1", "s", view="PA"),
        new_row("b", "COVID-19", "p1", "s", view="Lateral"),
        new_row("c", "COVID-19", "p2", "s", modality="CT", view="Axial"),
        new_row("d", "pneumonia", "p3", "s"),
        new_row("e", "unknown", "p4", "s"),
        new_row("f", "other", "p5", "s"),
    ]))
    covidx = for_task(frame, "covidx")
    assert covidx["image_path"].tolist() == ["a", "d"]
    assert covidx["target_name"].tolist() == ["COVID-19", "pneumonia"] and covidx["target"].tolist() == [2, 1]
    assert for_task(frame, "covid-resnet")["image_path"].tolist() == ["a"]  # unspecified pneumonia left out
    assert for_task(frame, "binary", modality="CT")["image_path"].tolist() == ["c"]
    assert for_task(frame, "covidx", views=None)["image_path"].tolist() == ["a", "b", "d"]
