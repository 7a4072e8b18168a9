"""`lungscreen data import CSV --out M`: a hospital's own images from a hand-written CSV, checked row by row
(each problem named by line and column), written as a manifest as `data build` writes one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lungscreen.data.manifest import load_manifest

HEADER = "image_path,label,patient_id,source,split\n"


@pytest.fixture
def hospital(tmp_path) -> Path:
    """Twelve films of six patients in images/, each unlike the others (noise), and nothing else."""
    images = tmp_path / "hospital" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for number in range(12):
        Image.fromarray(rng.integers(0, 256, (64, 64), np.uint8)).save(images / f"{number:04d}.png")
    return tmp_path / "hospital"


def rows(labels=("normal", "COVID-19", "pneumonia"), splits=("train", "train", "val", "val", "test", "test")) -> str:
    lines = []
    for number in range(12):
        patient = number // 2
        lines.append(f"images/{number:04d}.png,{labels[patient % len(labels)]},P{patient},stmarys,{splits[patient]}")
    return HEADER + "\n".join(lines) + "\n"


def test_a_good_csv_becomes_a_manifest_with_its_own_split(cli, hospital, tmp_path):
    (hospital / "list.csv").write_text(rows())
    code, out, err = cli("data", "import", hospital / "list.csv", "--out", hospital / "manifest")
    assert code == 0, err
    assert "12 images, 6 patients" in out and "split as given" in out
    frame = load_manifest(hospital / "manifest.parquet")
    assert len(frame) == 12 and frame["image_path"].map(lambda p: Path(p).is_file()).all()
    assert set(frame["split"]) == {"train", "val", "test"} and (frame["width"].astype(int) == 64).all()
    stored = pd.read_csv(hospital / "manifest.csv", keep_default_na=False)
    assert stored["image_path"].iloc[0] == "images/0000.png", "paths stored relative to the manifest's folder"
    assert cli("data", "validate", hospital / "manifest.parquet")[0] == 0


def test_without_a_split_one_is_made_by_patient(cli, hospital):
    (hospital / "list.csv").write_text(rows(splits=("",) * 6))
    code, out, err = cli("data", "import", hospital / "list.csv", "--out", hospital / "m", "--seed", "3")
    assert code == 0, err
    frame = load_manifest(hospital / "m.parquet")
    assert "split made (seed 3)" in out and set(frame["split"]) <= {"train", "val", "test"}
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()


def test_every_bad_cell_is_named_by_line_and_column(cli, hospital):
    text = rows().splitlines()
    text[3] = text[3].replace("COVID-19", "covid")  # line 4
    text[4] = text[4].replace("images/0003.png", "images/absent.png")  # line 5
    text[6] = text[6].replace(",P2,", ",,")  # line 7: no patient
    text[9] = text[9].replace(",test", ",tset")  # line 10
    (hospital / "list.csv").write_text("\n".join(text) + "\n")
    code, _, err = cli("data", "import", hospital / "list.csv", "--out", hospital / "m")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "4 problem(s)" in lines[0], err
    for expected in ("line 4, column label: 'covid' is not one of", "did you mean 'COVID-19'?",
                     "line 5, column image_path: no file", "line 7, column patient_id: empty",
                     "line 10, column split: 'tset'"):
        assert expected in lines[0], (expected, lines[0])
    assert not (hospital / "m.parquet").exists()


def test_a_missing_column_and_an_unreadable_image_are_named(cli, hospital):
    (hospital / "list.csv").write_text(rows().replace(",source,", ",hospital,", 1))
    code, _, err = cli("data", "import", hospital / "list.csv", "--out", hospital / "m")
    assert code == 2 and "no column 'source' in the header" in err
    (hospital / "images" / "0005.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (hospital / "list.csv").write_text(rows())
    code, _, err = cli("data", "import", hospital / "list.csv", "--out", hospital / "m")
    assert code == 2 and "line 7, column image_path:" in err


def test_the_same_film_under_two_patients_in_two_splits_is_refused(cli, hospital):
    """A copy is caught by its picture, whatever the CSV calls its patient."""
    images = hospital / "images"
    (images / "0011.png").write_bytes((images / "0000.png").read_bytes())  # P0's film again, as P5's (test)
    (hospital / "list.csv").write_text(rows())
    code, _, err = cli("data", "import", hospital / "list.csv", "--out", hospital / "m")
    assert code == 2 and "near-duplicate" in err and "more than one split" in err
