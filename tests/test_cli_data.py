"""`lungscreen data build/validate` end to end on a small Cohen-layout tree, bad files included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lungscreen.data.manifest import load_manifest


def run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lungscreen", *map(str, arguments)], capture_output=True, text=True, timeout=300)


def cohen_tree(root: Path, patients: int = 24) -> Path:
    """A Cohen-layout folder: metadata.csv + images/, several images per patient, one broken file."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    findings = ["COVID-19", "Pneumonia/Bacterial/Streptococcus", "No Finding"]
    for patient in range(patients):
        for k in range(2):
            name = f"p{patient}_{k}.png"
            pixels = rng.integers(0, 255, (64, 64), np.uint8)  # noise: no two images alike
            Image.fromarray(pixels).save(images / name)
            rows.append({"patientid": patient, "finding": findings[patient % 3], "view": "PA", "modality": "X-ray",
                         "folder": "images", "filename": name})
    (images / "p0_1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rows.append({"patientid": 99, "finding": "COVID-19", "view": "PA", "modality": "X-ray", "folder": "images",
                 "filename": "absent.png"})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


def test_build_reports_bad_files_and_goes_on(tmp_path: Path) -> None:
    tree = cohen_tree(tmp_path / "cohen")
    result = run("data", "build", tmp_path, "--out", tmp_path / "out" / "m", "--workers", "1", "--mkdir")
    assert result.returncode == 0, result.stderr
    assert "found cohen" in result.stdout
    assert "unreadable image" in result.stdout and "file absent" in result.stdout
    frame = load_manifest(tmp_path / "out" / "m.parquet")
    assert len(frame) == 47 and not (frame["image_path"].str.endswith("p0_1.png")).any()
    assert set(frame["split"]) == {"train", "val", "test"}
    skips = pd.read_csv(tmp_path / "out" / "m.skips.csv")
    assert len(skips) == 2 and str(tree / "images" / "p0_1.png") in set(skips["path"])
    assert (tmp_path / "out" / "m.csv").is_file() and (tmp_path / "out" / "m.composition.csv").is_file()
    assert not list((tmp_path / "out").glob("*.tmp")), "no temporary files left behind"

    checked = run("data", "validate", tmp_path / "out" / "m.parquet")
    assert checked.returncode == 0 and "no leakage" in checked.stdout and "every file present" in checked.stdout


def test_leaking_manifest_refused_in_one_line(tmp_path: Path) -> None:
    cohen_tree(tmp_path / "cohen")
    assert run("data", "build", tmp_path, "--out", tmp_path / "m", "--workers", "1").returncode == 0
    frame = pd.read_csv(tmp_path / "m.csv", keep_default_na=False)
    patient = frame["patient_id"].value_counts().index[0]  # a patient with two images
    frame.loc[frame["patient_id"] == patient, "split"] = ["train", "test"]
    frame.to_csv(tmp_path / "leaky.csv", index=False)
    result = run("data", "validate", tmp_path / "leaky.csv")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "more than one split" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2


def test_folder_without_known_layout(tmp_path: Path) -> None:
    (tmp_path / "random").mkdir()
    result = run("data", "build", tmp_path, "--out", tmp_path / "m")
    assert result.returncode == 2 and "no known dataset layout" in result.stderr
    assert not (tmp_path / "m.parquet").exists()
