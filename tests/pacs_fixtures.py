"""What the PACS tests share: the real servers as fixtures, DICOM files made from images, tiny trained runs.

Every DICOM file carries a recognisable patient name and ID (:data:`PATIENT_NAME`, :data:`PATIENT_ID`), so a
test can grep all output and the state database for them (issue 24's privacy requirement).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from servers import Orthanc, Postgres, orthanc_missing, postgres_missing
from training_fixtures import make_manifest, tiny_recipe

PATIENT_NAME = "Quixotic^Zebulon-Testpatient"
PATIENT_ID = "ZQ-90210-PRIVATE"
SOP_CLASSES = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1", "CT": "1.2.840.10008.5.1.4.1.1.2",
               "MR": "1.2.840.10008.5.1.4.1.1.4"}
REPOSITORY = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Made:
    """A DICOM file made for a test: its bytes and identity, and what the test expects of it."""

    data: bytes
    study: str
    series: str
    instance: str
    expect: str = "done"  # done, skipped or failed

    def write(self, folder: Path) -> Path:
        path = folder / f"{self.instance}.dcm"
        path.write_bytes(self.data)
        return path


def dicom_from(pixels: np.ndarray, *, modality: str = "CR", photometric: str = "MONOCHROME2", bits: int = 16,
               view: str | None = "PA", study: str | None = None, series: str | None = None, body_part: str | None = "CHEST",
               number: int = 1, pixel_data: bool = True, expect: str = "done") -> Made:
    """A DICOM Part 10 file (with its preamble) of ``pixels`` (float in [0, 1], 1 = white) as a real modality
    would store it: CR / DX / CT SOP classes, MONOCHROME1 inverted, 8 or 16 bits (12 stored)."""
    sop_class = SOP_CLASSES[modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), series or generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT_NAME, PATIENT_ID, "19610704", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240105", "101010", "A90210", "7"
    ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "", modality, 1, number
    if view is not None:
        ds.ViewPosition = view
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    top = 255 if bits == 8 else 4095
    values = np.round(np.clip(pixels, 0, 1) * top)
    if photometric == "MONOCHROME1":
        values = top - values
    ds.BitsAllocated, ds.BitsStored = (8, 8) if bits == 8 else (16, 12)
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    if pixel_data:
        ds.PixelData = values.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return Made(buffer.getvalue(), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, expect)


def gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), np.float32) / 255.0


# ----- servers ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    """A running Orthanc with DICOMweb (one per test module; ``wipe()`` empties it)."""
    if reason := orthanc_missing():
        pytest.skip(reason)
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throw-away PostgreSQL cluster; its ``url`` is a fresh database per module."""
    if reason := postgres_missing():
        pytest.skip(reason)
    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture
def credentials(monkeypatch, orthanc) -> dict[str, str]:
    """The PACS credentials in the environment, as a user would set them (for in-process and child commands)."""
    variables = {"LUNGSCREEN_PACS_USER": orthanc.auth[0], "LUNGSCREEN_PACS_PASSWORD": orthanc.auth[1]}
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    return variables


# ----- runs ------------------------------------------------------------------------------------------

def train_tiny(manifest: Path, out: Path) -> Path:
    """A squeezenet trained one epoch at 64 px (its last feature map is 3 x 3: Grad-CAM has something to show)."""
    from lungscreen.training.config import from_dict
    from lungscreen.training.engine import train

    recipe = tiny_recipe(manifest)
    recipe["model"] = {"name": "squeezenet1_1"}
    recipe["stages"] = [{"name": "all", "epochs": 1, "image_size": 64, "train": "all"}]
    return train(from_dict(recipe), out=out, quiet=True).run_dir


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A run trained on synthetic films, and 60 more films of the same kind (same generator, other seed) to
    upload: images the run takes, for the fault tests that need many instances and no real data."""
    root = tmp_path_factory.mktemp("synthetic")
    run = train_tiny(make_manifest(root / "train", per_class=8), root / "run")
    films = make_manifest(root / "films", per_class=20, size=48, seed=5).parent
    return run, sorted(films.glob("*.png"))


def synthetic_batch(films: list[Path], count: int, *, per_study: int = 2) -> list[Made]:
    """``count`` frontal CR/DX films, ``per_study`` to a study, alternating photometric and bit depth."""
    made, study = [], None
    for index in range(count):
        if index % per_study == 0:
            study = generate_uid()
        made.append(dicom_from(gray(films[index % len(films)]), modality="CR" if index % 2 else "DX",
                               photometric="MONOCHROME1" if index % 3 == 0 else "MONOCHROME2",
                               bits=8 if index % 4 == 0 else 16, study=study, number=index + 1))
    return made


def lungscreen(*arguments: object, env: dict[str, str] | None = None, timeout: float = 600,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``lungscreen ARGUMENTS`` in a child process (its own signals, its own exit), text output captured."""
    return subprocess.run([sys.executable, "-m", "lungscreen", *map(str, arguments)], check=False, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


def start_lungscreen(*arguments: object, env: dict[str, str] | None = None, cwd: Path | None = None,
                     log: Path) -> subprocess.Popen:
    """``lungscreen ARGUMENTS`` started in the background, its output going to ``log``."""
    handle = log.open("w")
    return subprocess.Popen([sys.executable, "-m", "lungscreen", *map(str, arguments)], stdout=handle,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}, cwd=cwd)


def results_in(orthanc: Orthanc, study: str) -> dict[str, list[dict]]:
    """The study's lungscreen results through Orthanc's own QIDO-RS: {"SR": [...], "OT": [...]} (DICOM JSON)."""
    found: dict[str, list[dict]] = {"SR": [], "OT": []}
    for item in orthanc.instances(study, includefield="00080060"):
        modality = (item.get("00080060", {}).get("Value") or [""])[0]
        if modality in found:
            found[modality].append(item)
    return found


def read_back(orthanc: Orthanc, study: str, item: dict) -> Dataset:
    def value(tag: str) -> str:
        return item[tag]["Value"][0]

    return orthanc.retrieve(study, value("0020000E"), value("00080018"))


def report_values(report: Dataset) -> tuple[str, dict[str, float], str]:
    """(referenced SOP instance UID, {class: probability}, decision) of a lungscreen report, read with highdicom."""
    import highdicom as hd

    parsed = hd.sr.ComprehensiveSR.from_dataset(report)
    group = parsed.content.get_image_measurement_groups()[0]
    probabilities = {m.name.meaning.removeprefix("Probability of "): float(m.value) for m in group.get_measurements()
                     if m.name.meaning.startswith("Probability of ")}
    decision = next(e.value.meaning for e in group.get_qualitative_evaluations() if e.name.meaning == "Screening decision")
    return group.source_images[0].referenced_sop_instance_uid, probabilities, decision


def report_text(report: Dataset) -> str:
    """Every text value of a report's content tree, joined (comments, algorithm parameters)."""
    found = []

    def walk(items: object) -> None:
        for item in items or []:
            if "TextValue" in item:
                found.append(str(item.TextValue))
            walk(item.get("ContentSequence"))

    walk(report.get("ContentSequence"))
    return "\n".join(found)
