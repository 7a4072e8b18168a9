"""Manifest schema, label maps, saving and loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lungscreen.data.labels import TASKS, canonical_from_finding, get_task
from lungscreen.data.manifest import (
    boxes_for_size,
    check_files,
    encode_boxes,
    for_task,
    load_manifest,
    missing_files,
    new_row,
    normalize_view,
    relocate_paths,
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


def test_paths_stored_relative_to_the_manifest_folder_under_it(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    frame = rows()
    frame["image_path"] = ["../out/data/a.png", str(tmp_path / "out" / "b.png"), "../elsewhere/c.png", "/data/d.png"]
    frame["mask_path"] = ["../out/data/a.mask.png", "", "", ""]
    frame["lung_mask_path"] = ["", "", "../elsewhere/c.lungs.png", ""]  # any *_path column follows the rule
    save_manifest(frame, "../out/m")  # the caller's relative paths: relative to the working folder
    stored = pd.read_csv(tmp_path / "out" / "m.csv", keep_default_na=False)
    elsewhere = str(tmp_path / "elsewhere" / "c.png")
    assert stored["image_path"].tolist() == ["data/a.png", "b.png", elsewhere, "/data/d.png"]
    assert stored["mask_path"].tolist() == ["data/a.mask.png", "", "", ""]
    assert stored.loc[2, "lung_mask_path"] == str(tmp_path / "elsewhere" / "c.lungs.png")
    monkeypatch.chdir(tmp_path)
    loaded = load_manifest(tmp_path / "out" / "m.parquet")  # absolute, whatever the working folder
    assert loaded["image_path"].tolist() == [str(tmp_path / "out" / "data" / "a.png"), str(tmp_path / "out" / "b.png"),
                                             str(tmp_path / "elsewhere" / "c.png"), "/data/d.png"]
    assert loaded["mask_path"].tolist() == [str(tmp_path / "out" / "data" / "a.mask.png"), "", "", ""]


def test_missing_files_checks_images_and_nonempty_masks(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    mask = str(tmp_path / "a.mask.png")
    frame = validate(pd.DataFrame([new_row(tmp_path / "a.png", "normal", "p1", "s", mask_path=mask),
                                   new_row(tmp_path / "b.png", "normal", "p2", "s")]))
    assert missing_files(frame) == [("image_path", str(tmp_path / "b.png")), ("mask_path", mask)]
    expected = rf"^m.parquet: 2 of 3 image/mask files it lists are missing, first: {tmp_path}/b.png, "
    with pytest.raises(ManifestError, match=expected):
        check_files(frame, "m.parquet")
    check_files(frame.iloc[:0], "empty.parquet")


def test_relocate_paths_rewrites_the_prefix_only(tmp_path: Path) -> None:
    frame = validate(pd.DataFrame([new_row("/old/data/a.png", "normal", "p1", "s", mask_path="/old/data/m/a.png"),
                                   new_row("/old/database/b.png", "normal", "p2", "s"),
                                   new_row("/other/c.png", "normal", "p3", "s")]))
    moved, changed = relocate_paths(frame, "/old/data/", tmp_path)
    assert moved["image_path"].tolist() == [str(tmp_path / "a.png"), "/old/database/b.png", "/other/c.png"]
    assert moved.loc[0, "mask_path"] == str(tmp_path / "m" / "a.png") and len(changed) == 2


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
