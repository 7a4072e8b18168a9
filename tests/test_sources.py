"""Source adapters on small trees written in each public layout, and on bad inputs.

The layouts absent from ../shared/data (Kermany, RSNA, NIH's own, Montgomery, Shenzhen, Actualmed, the
Radiography Database v4) are written here file by file as their publishers lay them out; the real folders
are read in tests/test_sources_shared.py.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from lungscreen.data.build import collect_rows
from lungscreen.data.manifest import boxes_for_size, validate
from lungscreen.data.sources import Skips, detect_sources, get_source, list_sources
from lungscreen.data.sources.common import ADULT, BEHIND_HEART, HEART_EXCLUDED, PEDIATRIC, parse_age
from lungscreen.data.sources.lung_masks import Montgomery
from lungscreen.errors import ManifestError
from lungscreen.io.images import read_image, read_mask


# ----- writers for tiny files in the real formats -----------------------------------------------------

def png(path: Path, size: tuple[int, int] = (32, 32), value: int = 128, box: tuple | None = None) -> Path:
    """A tiny grayscale PNG; with ``box`` (x0, y0, x1, y1), a white rectangle on black (a mask)."""
    pixels = np.full(size[::-1], 0 if box else value, np.uint8)
    if box:
        x0, y0, x1, y1 = box
        pixels[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def text(path: Path, content: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode(encoding))
    return path


def dicom(path: Path, rows: int = 64, columns: int = 80, view: str = "AP", age: str = "45") -> Path:
    """A real uncompressed MONOCHROME2 DICOM, as RSNA ships them (CR, ViewPosition, PatientAge)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality, dataset.PatientID = "CR", path.stem
    with warnings.catch_warnings():  # RSNA writes ages without the AS unit ("68"), which pydicom flags
        warnings.simplefilter("ignore", UserWarning)
        dataset.ViewPosition, dataset.PatientAge = view, age
    dataset.Rows, dataset.Columns = rows, columns
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    dataset.PixelData = np.tile(np.arange(columns, dtype=np.uint8), (rows, 1)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def read(name: str, folder: Path, adapter=None) -> tuple[pd.DataFrame, Skips]:
    """Rows and skips of one adapter (the registered one by default) over ``folder``."""
    skips = Skips()
    rows = (adapter or get_source(name)).read(folder, skips)
    return pd.DataFrame(rows), skips


def by_name(frame: pd.DataFrame) -> dict[str, dict]:
    return {Path(row["image_path"]).name: row for row in frame.to_dict("records")}


def reasons(skips: Skips) -> dict[str, str]:
    """Skipped file name (``table.csv:LINE`` for a table row) -> reason."""
    return {Path(path).name: reason for path, reason in skips.items}


# ----- Figure1 and Actualmed --------------------------------------------------------------------------

FIGURE1_HEADER = "patientid,offset,sex,age,finding,survival,temperature,pO2 saturation,view,modality,artifacts/distortion,notes\n"


def figure1_tree(root: Path) -> Path:
    text(root / "metadata.csv", FIGURE1_HEADER
         + "COVID-00001,13,M,33,COVID-19,,,58,AP erect,X-ray,,fever 39°C\n"
         + "COVID-00003a,8,M,28,,,39.1,90,AP erect,X-ray,,pending\n"
         + "COVID-00003b,8,M,28,COVID-19,,39.1,90,AP,X-ray,,\n"
         + "COVID-00005,,F,early 40s,No finding,,,,PA,X-ray,,\n"
         + "COVID-00006,,F,12,Pneumonia,,,,,X-ray,,\n"
         + "COVID-00007,,,,Sarcoidosis,,,,PA,X-ray,,\n"   # a finding Figure1 never publishes
         + "COVID-00099,,,,COVID-19,,,,PA,X-ray,,\n"     # listed, no file
         + ",,,,COVID-19,,,,PA,X-ray,,\n",               # no id
         encoding="latin-1")                               # as published: not UTF-8
    for name in ("COVID-00001.jpg", "COVID-00003a.jpg", "COVID-00003b.jpg", "COVID-00005.png", "COVID-00006.jpg",
                 "COVID-00007.jpg"):
        png(root / "images" / name)
    return root


def test_figure1_latin1_labels_patients_and_skips(tmp_path: Path) -> None:
    root = figure1_tree(tmp_path / "Figure1-COVID-chestxray-dataset")
    with pytest.raises(UnicodeDecodeError):
        (root / "metadata.csv").read_text(encoding="utf-8")
    frame, skips = read("figure1", root)
    rows = by_name(frame)
    assert {n: r["label"] for n, r in rows.items()} == {
        "COVID-00001.jpg": "COVID-19", "COVID-00003a.jpg": "unknown", "COVID-00003b.jpg": "COVID-19",
        "COVID-00005.png": "normal", "COVID-00006.jpg": "pneumonia"}
    assert rows["COVID-00003a.jpg"]["patient_id"] == rows["COVID-00003b.jpg"]["patient_id"] == "figure1:COVID-00003"
    assert rows["COVID-00001.jpg"]["view"] == "AP" and rows["COVID-00006.jpg"]["view"] == "unknown"
    assert rows["COVID-00006.jpg"]["age_group"] == PEDIATRIC and rows["COVID-00005.png"]["age_group"] == ADULT
    assert sorted(skips.by_reason().items()) == [
        ("blank patientid", 1), ("finding not recognised by figure1", 1),
        ("listed in metadata.csv but file absent", 1)]
    assert any(path.endswith("COVID-00099.*") for path, _ in skips.items)
    validate(frame)


def test_actualmed_imagename_column(tmp_path: Path) -> None:
    root = tmp_path / "Actualmed-COVID-chestxray-dataset"
    header = "patientid,offset,sex,age,finding,survival,temperature,pO2 saturation,view,modality,imagename,artifacts/distortion,notes\n"
    text(root / "metadata.csv", header
         + 'ANON196,,,,,,,,PA,X-ray,CR.1.2.840.1.png,,"Inconclusive, date taken (YYYYMMDD): 20200313"\n'
         + "ANON196,,,,COVID-19,,,,PA,X-ray,CR.1.2.840.2.png,,\n"
         + "ANON56,,,,No finding,,,,AP,X-ray,DX.1.2.840.3.png,,\n"
         + "ANON57,,,,No finding,,,,AP,X-ray,DX.1.2.840.404.png,,\n"
         + "ANON56,,,,No finding,,,,AP,X-ray,DX.1.2.840.3.png,,\n")        # the same file again
    for name in ("CR.1.2.840.1.png", "CR.1.2.840.2.png", "DX.1.2.840.3.png"):
        png(root / "images" / name)
    assert [name for name, _ in detect_sources(tmp_path)] == ["actualmed"]
    frame, skips = read("actualmed", root)
    rows = by_name(frame)
    assert rows["CR.1.2.840.1.png"]["label"] == "unknown"  # inconclusive is not normal
    assert rows["CR.1.2.840.2.png"]["label"] == "COVID-19" and rows["DX.1.2.840.3.png"]["label"] == "normal"
    assert rows["CR.1.2.840.1.png"]["patient_id"] == rows["CR.1.2.840.2.png"]["patient_id"] == "actualmed:ANON196"
    assert reasons(skips) == {"DX.1.2.840.404.png": "listed in metadata.csv but file absent",
                              "DX.1.2.840.3.png": "listed twice in metadata.csv; first kept"}
    validate(frame)


def test_missing_metadata_column_names_file_and_column(tmp_path: Path) -> None:
    root = tmp_path / "figure1"
    text(root / "metadata.csv", "patientid,finding,modality\nCOVID-00001,COVID-19,X-ray\n")
    png(root / "images" / "COVID-00001.jpg")
    with pytest.raises(ManifestError) as caught:
        read("figure1", root)
    assert "metadata.csv" in str(caught.value) and "view" in str(caught.value)


# ----- COVID-19 Radiography Database ------------------------------------------------------------------

def test_radiography_v4_images_and_masks(tmp_path: Path) -> None:
    root = tmp_path / "COVID-19_Radiography_Dataset"
    for folder, prefix in (("COVID", "COVID"), ("Normal", "Normal"), ("Lung_Opacity", "Lung_Opacity"),
                           ("Viral Pneumonia", "Viral Pneumonia")):
        for index in (1, 2):
            png(root / folder / "images" / f"{prefix}-{index}.png", (30, 30))
        png(root / folder / "masks" / f"{prefix}-1.png", (24, 24), box=(4, 4, 20, 20))
    png(root / "COVID" / "masks" / "COVID-77.png", box=(1, 1, 5, 5))          # mask without its image
    png(root / "Tuberculosis" / "images" / "Tuberculosis-1.png")              # a class the database lacks
    text(root / "COVID.metadata.xlsx", "not read")
    assert detect_sources(tmp_path) == [("covid19-radiography", root)]
    frame, skips = read("covid19-radiography", root)
    rows = by_name(frame)
    assert {n: r["label"] for n, r in rows.items() if n.endswith("-1.png")} == {
        "COVID-1.png": "COVID-19", "Normal-1.png": "normal", "Lung_Opacity-1.png": "pneumonia",
        "Viral Pneumonia-1.png": "viral"}
    assert len(frame) == 8 and frame["patient_id"].nunique() == 8
    assert rows["COVID-1.png"]["mask_path"].endswith("COVID/masks/COVID-1.png")
    assert rows["COVID-1.png"]["mask_convention"] == HEART_EXCLUDED
    assert rows["COVID-2.png"]["mask_path"] == "" and rows["COVID-2.png"]["mask_convention"] == ""
    assert {n for n, r in rows.items() if r["age_group"] == PEDIATRIC} == {"Viral Pneumonia-1.png", "Viral Pneumonia-2.png"}
    assert reasons(skips) == {"COVID-77.png": "mask without its image",
                              "Tuberculosis-1.png": "class folder not known to covid19-radiography"}
    mask = read_mask(rows["COVID-1.png"]["mask_path"], size=(30, 30))  # 24-px mask onto a 30-px image
    assert mask.shape == (30, 30) and mask.any()


def test_radiography_v1_names_and_no_kermany_confusion(tmp_path: Path) -> None:
    root = tmp_path / "COVID-19 Radiography Database"
    png(root / "COVID-19" / "COVID-19 (1).png")
    png(root / "NORMAL" / "NORMAL (1).png")
    png(root / "Viral Pneumonia" / "Viral Pneumonia (1).png")
    frame, skips = read("covid19-radiography", root)
    assert sorted(frame["label"]) == ["COVID-19", "normal", "viral"] and len(skips) == 0
    kermany_split = tmp_path / "train"
    png(kermany_split / "NORMAL" / "IM-0001-0001.jpeg")
    png(kermany_split / "PNEUMONIA" / "person1_virus_1.jpeg")
    assert not get_source("covid19-radiography").matches(kermany_split)


# ----- NIH ChestX-ray14 ---------------------------------------------------------------------------------

DATA_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                     "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n")
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"


def test_nih_own_layout(tmp_path: Path) -> None:
    root = tmp_path / "nih"
    text(root / "Data_Entry_2017.csv", DATA_ENTRY_HEADER
         + "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,\n"
         + "00000001_001.png,Effusion|Pneumonia,1,1,58,M,AP,2894,2729,0.143,0.143,\n"
         + "00000002_000.png,No Finding,0,2,11,F,PA,2500,2048,0.171,0.171,\n"
         + "00000003_000.png,No Finding,0,,81,F,PA,2500,2048,0.171,0.171,\n"       # blank Patient ID
         + "00000004_000.png,Covid|Effusion,0,4,40,F,PA,2500,2048,0.171,0.171,\n"   # not a ChestX-ray14 finding
         + "00000005_000.png,No Finding,0,5,40,F,PA,2500,2048,0.171,0.171,\n")      # listed, file absent
    png(root / "images_001" / "images" / "00000001_000.png", (64, 64))
    png(root / "images_001" / "images" / "00000001_001.png", (64, 64))
    png(root / "images_002" / "images" / "00000002_000.png")
    png(root / "images_002" / "images" / "00000003_000.png")
    png(root / "images_002" / "images" / "00000004_000.png")
    text(root / "BBox_List_2017.csv", BBOX_HEADER
         + "00000001_001.png,Pneumonia,512,256,128,64,,,\n"
         + "00000001_001.png,Effusion,100,200,50,60,,,\n")
    assert detect_sources(tmp_path) == [("nih", root)]
    frame, skips = read("nih", root)
    rows = by_name(frame)
    assert {n: (r["label"], r["view"]) for n, r in rows.items()} == {
        "00000001_000.png": ("other", "PA"), "00000001_001.png": ("pneumonia", "AP"),
        "00000002_000.png": ("normal", "PA"), "00000003_000.png": ("normal", "PA")}
    assert rows["00000001_000.png"]["patient_id"] == rows["00000001_001.png"]["patient_id"] == "nih:00000001"
    assert rows["00000003_000.png"]["patient_id"] == "nih:00000003"  # from the file name
    assert rows["00000002_000.png"]["age_group"] == PEDIATRIC
    assert reasons(skips) == {"00000004_000.png": "unknown finding label 'Covid|Effusion'",
                              "00000005_000.png": "listed in Data_Entry_2017.csv but file absent"}
    boxed = rows["00000001_001.png"]
    assert (boxed["box_frame_width"], boxed["box_frame_height"]) == (1024, 1024)  # not OriginalImage[Width
    assert boxes_for_size(boxed, 64, 64) == [(32.0, 16.0, 40.0, 20.0, "Pneumonia"),
                                             (6.25, 12.5, 9.375, 16.25, "Effusion")]
    assert rows["00000001_000.png"]["boxes"] == ""
    validate(frame)


def test_nih_missing_column(tmp_path: Path) -> None:
    text(tmp_path / "Data_Entry_2017.csv", "Image Index,Finding Labels,Patient ID\n00000001_000.png,No Finding,1\n")
    with pytest.raises(ManifestError, match=r"Data_Entry_2017\.csv: missing column\(s\) View Position"):
        read("nih", tmp_path)


def test_darkcovidnet_layout_shares_nih_patients(tmp_path: Path) -> None:
    root = tmp_path / "COVID-19-master"
    dataset = root / "X-Ray Image DataSet"
    png(dataset / "No_findings" / "00000001_000.png")
    png(dataset / "Pneumonia" / "00000001_001.png", (256, 256))
    png(dataset / "Covid-19" / "covid-19-pneumonia-7-PA.jpg")   # Cohen's file, no NIH patient in the name
    png(dataset / "Tuberculosis" / "x.png")
    text(root / "BBox_List_2017.csv", BBOX_HEADER + "00000001_001.png,Pneumonia,512,512,256,128,,,\n")
    frame, skips = read("nih-darkcovidnet", root)
    rows = by_name(frame)
    assert {n: (r["label"], r["patient_id"]) for n, r in rows.items()} == {
        "00000001_000.png": ("normal", "nih:00000001"), "00000001_001.png": ("pneumonia", "nih:00000001"),
        "covid-19-pneumonia-7-PA.jpg": ("COVID-19", "nih-darkcovidnet:covid-19-pneumonia-7-PA")}
    assert boxes_for_size(rows["00000001_001.png"], 256, 256) == [(128.0, 128.0, 192.0, 160.0, "Pneumonia")]
    assert reasons(skips) == {"x.png": "class folder not known to nih-darkcovidnet"}


# ----- Kermany -----------------------------------------------------------------------------------------

def test_kermany_patients_and_causes_from_file_names(tmp_path: Path) -> None:
    outer = tmp_path / "chest_xray"
    for base in (outer, outer / "chest_xray"):       # the Kaggle archive nests a second copy
        png(base / "train" / "PNEUMONIA" / "person1_bacteria_1.jpeg")
        png(base / "test" / "PNEUMONIA" / "person1_virus_6.jpeg")
        png(base / "train" / "NORMAL" / "IM-0115-0001.jpeg")
        png(base / "val" / "NORMAL" / "NORMAL2-IM-1427-0001.jpeg")
    png(outer / "train" / "PNEUMONIA" / "pneumonia-unknown-cause.jpeg")
    png(outer / "train" / "NORMAL" / "person9_bacteria_2.jpeg")           # contradicts its folder
    text(outer / "train" / "NORMAL" / "._IM-0115-0001.jpeg", "mac resource fork")
    png(tmp_path / "__MACOSX" / "chest_xray" / "train" / "NORMAL" / "._x.jpeg")
    assert detect_sources(tmp_path) == [("kermany", outer)]
    frame, skips = read("kermany", outer)
    rows = by_name(frame)
    assert {n: (r["label"], r["patient_id"]) for n, r in rows.items()} == {
        "person1_bacteria_1.jpeg": ("bacterial", "kermany:person1"),
        "person1_virus_6.jpeg": ("viral", "kermany:person1"),
        "IM-0115-0001.jpeg": ("normal", "kermany:IM-0115"),
        "NORMAL2-IM-1427-0001.jpeg": ("normal", "kermany:NORMAL2-IM-1427"),
        "pneumonia-unknown-cause.jpeg": ("pneumonia", "kermany:pneumonia-unknown-cause")}
    assert (frame["age_group"] == PEDIATRIC).all() and (frame["view"] == "AP").all()
    assert reasons(skips) == {"person9_bacteria_2.jpeg": "file name states a pneumonia but the file sits in NORMAL"}


# ----- RSNA --------------------------------------------------------------------------------------------

def rsna_tree(root: Path, class_info: bool = True) -> Path:
    text(root / "stage_2_train_labels.csv", "patientId,x,y,width,height,Target\n"
         "aaa,10,20,30,40,1\n"
         "aaa,40,8,16,16,1\n"
         "bbb,,,,,0\n"
         "ccc,,,,,0\n"
         "ddd,,,,,0\n"          # DICOM absent
         "eee,1,1,5,5,1\n"      # Target 1 but class Normal
         ",,,,,0\n")            # blank patientId
    if class_info:
        text(root / "stage_2_detailed_class_info.csv", "patientId,class\n"
             "aaa,Lung Opacity\naaa,Lung Opacity\nbbb,Normal\nccc,No Lung Opacity / Not Normal\nddd,Normal\n"
             "eee,Normal\n")
    for patient, view in (("aaa", "AP"), ("bbb", "PA"), ("ccc", "PA"), ("eee", "PA")):
        dicom(root / "stage_2_train_images" / f"{patient}.dcm", view=view, age="12" if patient == "bbb" else "45")
    return root


def test_rsna_labels_boxes_and_dicom_frame(tmp_path: Path) -> None:
    root = rsna_tree(tmp_path / "rsna-pneumonia-detection-challenge")
    assert detect_sources(tmp_path) == [("rsna", root)]
    frame, skips = read("rsna", root)
    rows = by_name(frame)
    assert {n: (r["label"], r["view"], r["patient_id"]) for n, r in rows.items()} == {
        "aaa.dcm": ("pneumonia", "AP", "rsna:aaa"), "bbb.dcm": ("normal", "PA", "rsna:bbb"),
        "ccc.dcm": ("other", "PA", "rsna:ccc")}
    aaa = rows["aaa.dcm"]
    assert (aaa["box_frame_width"], aaa["box_frame_height"]) == (80, 64)  # the DICOM's Columns x Rows
    assert boxes_for_size(aaa, 80, 64) == [(10.0, 20.0, 40.0, 60.0, "Lung Opacity"), (40.0, 8.0, 56.0, 24.0, "Lung Opacity")]
    assert rows["bbb.dcm"]["boxes"] == "" and rows["bbb.dcm"]["age_group"] == PEDIATRIC
    assert reasons(skips) == {"ddd.dcm": "listed in the train labels but DICOM absent",
                              "eee.dcm": "Target contradicts the detailed class info",
                              "stage_2_train_labels.csv:8": "blank patientId"}
    image = read_image(aaa["image_path"])  # a real DICOM
    assert image.size == (80, 64)


def test_rsna_without_class_info_does_not_call_target0_normal(tmp_path: Path) -> None:
    root = rsna_tree(tmp_path / "rsna", class_info=False)
    frame, _ = read("rsna", root)
    labels = {Path(p).stem: label for p, label in zip(frame["image_path"], frame["label"])}
    assert labels["aaa"] == "pneumonia" and labels["eee"] == "pneumonia"
    assert labels["bbb"] == labels["ccc"] == "unknown"


def test_rsna_unknown_class_and_unreadable_dicom(tmp_path: Path) -> None:
    root = rsna_tree(tmp_path / "rsna")
    text(root / "stage_2_detailed_class_info.csv", "patientId,class\naaa,Lung Opacity\nbbb,Probably fine\n"
         "ccc,No Lung Opacity / Not Normal\neee,Lung Opacity\n")
    text(root / "stage_2_train_images" / "ccc.dcm", "not a dicom")
    _, skips = read("rsna", root)
    found = reasons(skips)
    assert found["bbb.dcm"] == "detailed class info gives no single known class"
    assert found["ccc.dcm"] == "unreadable DICOM header"


# ----- COVID-CT -----------------------------------------------------------------------------------------

def test_covid_ct_robust_name_matching_and_fallback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "COVID-CT"
    names = {
        "2020.01.24.919183-p27-132.png": "Patient 1",         # exact
        "2020.01.24.919183-p27-133.png": "Patient 1",
        "Paper%20A-p3-10%1.png": "Patient 2",                 # listed URL-decoded, other case, no extension
        "ehaa254-p0-63%2.png": None,                          # listed with a blank patient
        "2020.03.25.20043166-p17-78.png": None,               # not listed at all
    }
    for name in names:
        png(root / "CT_COVID" / name)
    meta = pd.DataFrame({
        "File name": ["2020.01.24.919183-p27-132.png", "2020.01.24.919183-p27-133.png", "paper a-p3-10%1",
                      "ehaa254-p0-63%2.png", "gone-p1-1.png", None],
        "Patient ID": ["Patient 1", "Patient 1", "Patient 2", None, "Patient 9", None],
        "Captions": ["", "", "", "", "", "a footnote line"],
    })
    meta.to_excel(root / "COVID-CT-MetaInfo.xlsx", index=False)
    text(root / "NonCOVID-CT-MetaInfo.csv", ",image name,patient id\n0,0.jpg,crawled_patient_0\n"
         "1,1%0.jpg,crawled_patient_1\n2,14.png,medpix_patient_38\n3,14.jpg,crawled_patient_14\n")
    for name in ("0.jpg", "1%0.jpg", "14.png", "14.jpg"):
        png(root / "CT_NonCOVID" / name)
    adapter, skips = get_source("covid-ct"), Skips()
    with caplog.at_level(logging.WARNING):
        frame = pd.DataFrame(adapter.read(root, skips))
    patients = {Path(p).name: pid for p, pid in zip(frame["image_path"], frame["patient_id"])}
    assert patients == {
        "2020.01.24.919183-p27-132.png": "covid-ct:Patient 1", "2020.01.24.919183-p27-133.png": "covid-ct:Patient 1",
        "Paper%20A-p3-10%1.png": "covid-ct:Patient 2",
        "ehaa254-p0-63%2.png": "covid-ct:paper ehaa254",
        "2020.03.25.20043166-p17-78.png": "covid-ct:paper 2020.03.25.20043166",
        "0.jpg": "covid-ct:crawled_patient_0", "1%0.jpg": "covid-ct:crawled_patient_1",
        "14.png": "covid-ct:medpix_patient_38", "14.jpg": "covid-ct:crawled_patient_14",  # same stem, two patients
    }
    assert sorted(p.name for p in adapter.fallbacks) == ["2020.03.25.20043166-p17-78.png", "ehaa254-p0-63%2.png"]
    assert "2 image(s) without a patient in the meta files" in caplog.text
    assert reasons(skips) == {"gone-p1-1.png": "listed in COVID-CT-MetaInfo.xlsx but file absent"}
    assert (frame["modality"] == "CT").all()
    assert set(frame["label"]) == {"COVID-19", "other"}


def test_covid_ct_meta_missing_column(tmp_path: Path) -> None:
    png(tmp_path / "CT_COVID" / "a-p1-1.png")
    (tmp_path / "CT_NonCOVID").mkdir()
    pd.DataFrame({"File name": ["a-p1-1.png"], "Age": [40]}).to_excel(tmp_path / "COVID-CT-MetaInfo.xlsx", index=False)
    with pytest.raises(ManifestError, match=r"COVID-CT-MetaInfo\.xlsx: missing column\(s\) Patient ID"):
        read("covid-ct", tmp_path)


# ----- lung-mask sets -------------------------------------------------------------------------------------

def darwin(original_filename: str, lung: bool, tags: tuple[str, ...] = ("Viral Pneumonia", "COVID-19")) -> str:
    annotations = [{"name": tag, "tag": {}} for tag in tags]
    if lung:
        annotations += [{"name": "Lung", "polygon": {"path": [{"x": 1, "y": 1}, {"x": 9, "y": 1}, {"x": 9, "y": 9}]}}] * 2
    return json.dumps({"image": {"width": 2000, "height": 2000, "original_filename": original_filename},
                       "dataset": "COVID-19 Chest X-Ray Dataset", "annotated": True, "annotations": annotations})


def test_v7labs_joins_masks_onto_cohen_rows(tmp_path: Path) -> None:
    cohen = tmp_path / "covid-chestxray-dataset"
    text(cohen / "metadata.csv", "patientid,finding,view,modality,folder,filename\n"
         "1,COVID-19,PA,X-ray,images,a.jpg\n1,COVID-19,L,X-ray,images,a-lateral.jpg\n2,Streptococcus,AP,X-ray,images,b.jpg\n")
    for name in ("a.jpg", "a-lateral.jpg", "b.jpg"):
        png(cohen / "images" / name)
    v7 = tmp_path / "covid-19-xray-dataset"
    masks = v7 / "annotations" / "all-images-semantic-masks"
    masks.mkdir(parents=True)
    with zipfile.ZipFile(v7 / "annotations" / "covid-only.zip", "w") as bundle:
        bundle.writestr("100.json", darwin("a.jpg", lung=True))
        bundle.writestr("101.json", darwin("a-lateral.jpg", lung=False))
        bundle.writestr("102.json", darwin("missing-mask.jpg", lung=True))
        bundle.writestr("103.json", "{not json")
        bundle.writestr("104.json", darwin("not-in-cohen.jpg", lung=True))
    with zipfile.ZipFile(v7 / "annotations" / "covid-only-coco.zip", "w") as bundle:
        bundle.writestr("coco.json", json.dumps({"images": []}))
    for mask_id in ("100", "101", "104"):
        png(masks / f"{mask_id}.png", box=(4, 4, 20, 20))
    found = detect_sources(tmp_path)
    assert sorted(found) == [("cohen", cohen), ("v7labs", v7)]
    assert get_source("v7labs").joins == "cohen" and get_source("cohen").joins is None

    joins, skips = read("v7labs", v7)
    assert sorted(joins["join_name"]) == ["a-lateral.jpg", "a.jpg", "not-in-cohen.jpg"]
    assert sorted(skips.by_reason().items()) == [
        ("Darwin JSON has no lung polygon (lateral view or CT slice); its empty mask is not used", 1),
        ("mask PNG named by a Darwin JSON is absent", 1),
        ("not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))", 1)]

    build_skips = Skips()
    frame, _ = collect_rows([tmp_path], build_skips)
    rows = by_name(frame)
    assert rows["a.jpg"]["mask_path"] == str(masks / "100.png") and rows["a.jpg"]["mask_convention"] == BEHIND_HEART
    assert rows["a-lateral.jpg"]["mask_path"] == "" and rows["a-lateral.jpg"]["v7labs_pneumonia"] == "Viral Pneumonia"
    assert rows["b.jpg"]["mask_path"] == ""
    assert any("not-in-cohen.jpg: image not found" in reason for _, reason in build_skips.items)


def test_openist_pairs(tmp_path: Path) -> None:
    folder = tmp_path / "OpenIST" / "Datasets" / "Chest_x-ray"
    png(folder / "1-10-500-500-100.jpg")
    png(folder / "1-10-500-500-100@.png", box=(2, 2, 10, 10))
    png(folder / "2-11-500-500-100.jpg")                    # an image without its mask keeps its row
    png(folder / "101-210-500-500-100@.png", box=(2, 2, 10, 10))  # a mask without its image (as in the repo)
    assert detect_sources(tmp_path) == [("openist", tmp_path / "OpenIST")]
    frame, skips = read("openist", tmp_path / "OpenIST")
    rows = by_name(frame)
    assert rows["1-10-500-500-100.jpg"]["mask_path"].endswith("1-10-500-500-100@.png")
    assert rows["2-11-500-500-100.jpg"]["mask_path"] == ""
    assert (frame["label"] == "normal").all() and (frame["age_group"] == ADULT).all()
    assert reasons(skips) == {"101-210-500-500-100@.png": "mask without its image"}


def montgomery_tree(root: Path) -> Path:
    for name in ("MCUCXR_0001_0.png", "MCUCXR_0002_1.png", "MCUCXR_0003_0.png"):
        png(root / "CXR_png" / name, (40, 30))
    png(root / "CXR_png" / "MCUCXR_0004.png", (40, 30))                         # no label suffix
    for name in ("MCUCXR_0001_0.png", "MCUCXR_0002_1.png"):
        png(root / "ManualMask" / "leftMask" / name, (40, 30), box=(22, 5, 35, 25))
        png(root / "ManualMask" / "rightMask" / name, (40, 30), box=(5, 5, 18, 25))
    png(root / "ManualMask" / "leftMask" / "MCUCXR_0003_0.png", (40, 30), box=(22, 5, 35, 25))  # right one missing
    png(root / "ManualMask" / "rightMask" / "MCUCXR_0099_0.png", (40, 30), box=(5, 5, 18, 25))  # no image
    text(root / "ClinicalReadings" / "MCUCXR_0001_0.txt", "Patient's Sex: F\nPatient's Age: 012Y\n\nnormal\n")
    text(root / "ClinicalReadings" / "MCUCXR_0002_1.txt", "Patient's Sex: M\nPatient's Age: 058Y\n\nTB\n")
    return root


def test_montgomery_combines_left_and_right_masks_in_a_cache(tmp_path: Path) -> None:
    root = montgomery_tree(tmp_path / "MontgomerySet")
    assert detect_sources(tmp_path) == [("montgomery", root)]
    before = sorted(p for p in root.rglob("*"))
    cache = tmp_path / "cache"
    frame, skips = read("montgomery", root, Montgomery(mask_cache=cache))
    rows = by_name(frame)
    assert {n: (r["label"], r["fine_label"], r["patient_id"]) for n, r in rows.items()} == {
        "MCUCXR_0001_0.png": ("normal", "normal", "montgomery:MCUCXR_0001"),
        "MCUCXR_0002_1.png": ("other", "tuberculosis", "montgomery:MCUCXR_0002"),
        "MCUCXR_0003_0.png": ("normal", "normal", "montgomery:MCUCXR_0003")}
    assert rows["MCUCXR_0001_0.png"]["age_group"] == PEDIATRIC and rows["MCUCXR_0002_1.png"]["age_group"] == ADULT
    assert rows["MCUCXR_0003_0.png"]["age_group"] == "" and (frame["view"] == "PA").all()
    combined = Path(rows["MCUCXR_0001_0.png"]["mask_path"])
    assert combined.is_relative_to(cache) and rows["MCUCXR_0001_0.png"]["mask_convention"] == HEART_EXCLUDED
    left = read_mask(root / "ManualMask" / "leftMask" / "MCUCXR_0001_0.png")
    right = read_mask(root / "ManualMask" / "rightMask" / "MCUCXR_0001_0.png")
    assert np.array_equal(read_mask(combined), left | right) and not (left & right).any()
    assert rows["MCUCXR_0003_0.png"]["mask_path"] == ""
    assert reasons(skips) == {"MCUCXR_0004.png": "file name lacks the _0 (normal) / _1 (tuberculosis) label suffix",
                              "MCUCXR_0003_0.png": "only one lung's mask present; mask not used",
                              "MCUCXR_0099_0.png": "mask without its image"}
    assert sorted(p for p in root.rglob("*")) == before, "the public files are never modified"

    stamp = combined.stat().st_mtime_ns
    read("montgomery", root, Montgomery(mask_cache=cache))
    assert combined.stat().st_mtime_ns == stamp, "an up-to-date cached mask is not written again"
    later = combined.stat().st_mtime + 10
    os.utime(root / "ManualMask" / "leftMask" / "MCUCXR_0001_0.png", (later, later))
    read("montgomery", root, Montgomery(mask_cache=cache))
    assert combined.stat().st_mtime_ns != stamp, "a changed half re-makes the combined mask"


def test_montgomery_unusable_mask_is_reported(tmp_path: Path) -> None:
    root = montgomery_tree(tmp_path / "MontgomerySet")
    text(root / "ManualMask" / "rightMask" / "MCUCXR_0001_0.png", "")                  # empty file
    png(root / "ManualMask" / "rightMask" / "MCUCXR_0002_1.png", (30, 20), box=(1, 1, 5, 5))  # wrong size
    frame, skips = read("montgomery", root, Montgomery(mask_cache=tmp_path / "cache"))
    assert (frame.set_index(frame["image_path"].map(lambda p: Path(p).name))["mask_path"] == "").all()
    found = reasons(skips)
    assert found["MCUCXR_0001_0.png"] == "lung mask not usable: empty file (0 bytes)"
    assert found["MCUCXR_0002_1.png"] == "lung mask not usable: left and right lung masks differ in size"


def test_shenzhen_masks_and_readings(tmp_path: Path) -> None:
    root = tmp_path / "ChinaSet_AllFiles"
    png(root / "CXR_png" / "CHNCXR_0001_0.png")
    png(root / "CXR_png" / "CHNCXR_0002_1.png")
    png(root / "mask" / "CHNCXR_0001_0_mask.png", box=(2, 2, 10, 10))
    png(root / "mask" / "CHNCXR_0009_0_mask.png", box=(2, 2, 10, 10))
    text(root / "ClinicalReadings" / "CHNCXR_0001_0.txt", "male 35yrs\nnormal\n")
    text(root / "ClinicalReadings" / "CHNCXR_0002_1.txt", "female  9yrs\nSTB,ATB\n")
    assert detect_sources(tmp_path) == [("shenzhen", root)]
    frame, skips = read("shenzhen", root)
    rows = by_name(frame)
    assert rows["CHNCXR_0001_0.png"]["mask_path"].endswith("mask/CHNCXR_0001_0_mask.png")
    assert rows["CHNCXR_0001_0.png"]["mask_convention"] == HEART_EXCLUDED
    assert rows["CHNCXR_0002_1.png"]["mask_path"] == "" and rows["CHNCXR_0002_1.png"]["label"] == "other"
    assert rows["CHNCXR_0001_0.png"]["age_group"] == ADULT and rows["CHNCXR_0002_1.png"]["age_group"] == PEDIATRIC
    assert reasons(skips) == {"CHNCXR_0009_0_mask.png": "mask without its image"}


# ----- detection over every layout at once ----------------------------------------------------------------

def test_detect_every_layout_once(tmp_path: Path) -> None:
    figure1_tree(tmp_path / "Figure1-COVID-chestxray-dataset")
    rsna_tree(tmp_path / "rsna-pneumonia-detection-challenge")
    montgomery_tree(tmp_path / "NLM" / "MontgomerySet")
    png(tmp_path / "NLM" / "ChinaSet_AllFiles" / "CXR_png" / "CHNCXR_0001_0.png")
    png(tmp_path / "chest_xray" / "train" / "NORMAL" / "IM-0001-0001.jpeg")
    png(tmp_path / "COVID-19_Radiography_Dataset" / "Viral Pneumonia" / "images" / "Viral Pneumonia-1.png")
    png(tmp_path / "COVID-CT" / "CT_COVID" / "a-p1-1.png")
    png(tmp_path / "COVID-CT" / "CT_NonCOVID" / "0.jpg")
    png(tmp_path / "OpenIST" / "Datasets" / "Chest_x-ray" / "1@.png")
    png(tmp_path / "darkcovidnet" / "X-Ray Image DataSet" / "No_findings" / "00000001_000.png")
    text(tmp_path / "nih" / "Data_Entry_2017.csv", DATA_ENTRY_HEADER)
    found = detect_sources(tmp_path)
    names = [name for name, _ in found]
    assert sorted(names) == sorted(["figure1", "rsna", "montgomery", "shenzhen", "kermany", "covid19-radiography",
                                    "covid-ct", "openist", "nih-darkcovidnet", "nih"])
    assert len({root for _, root in found}) == len(found)
    assert set(list_sources()) >= set(names) | {"cohen", "v7labs", "actualmed"}


def test_parse_age_spellings() -> None:
    assert [parse_age(t) for t in ("036Y", "male 35yrs", "50+", "early 40s", "18 months", "007M", "", None)] == [
        36.0, 35.0, 50.0, 40.0, 1.5, pytest.approx(7 / 12), None, None]
