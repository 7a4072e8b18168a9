"""`lungscreen pacs` against a live Orthanc with DICOMweb: real chest images in, a report and an overlay per
frontal image back in the same study, with the probabilities `lungscreen predict` gives for the same pixels;
the state's reasons for what was left out; no patient name or ID in any output; bad input as one line."""

from __future__ import annotations

import glob
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.uid import generate_uid

from lungscreen.audit.screening import DISCLAIMER
from lungscreen.data.manifest import new_row, save_manifest
from lungscreen.inference.predict import Predictor
from lungscreen.io.files import file_sha256
from lungscreen.pacs.documents import ResultUids, figures_line
from pacs_fixtures import (  # noqa: F401  (fixtures)
    PATIENT_ID,
    PATIENT_NAME,
    Made,
    credentials,
    dicom_from,
    gray,
    orthanc,
    read_back,
    report_text,
    report_values,
    results_in,
    synthetic,
    synthetic_batch,
    train_tiny,
)
from training_fixtures import make_manifest, tiny_recipe

RADIOGRAPHY = "covid19-radiography-database/COVID-19_Radiography_Dataset"
NIH = "nih-chestxray14-darkcovidnet/X-Ray Image DataSet"
PRIVATE = (PATIENT_NAME, PATIENT_ID, "Zebulon", "ZQ-90210")


def files(root: Path, pattern: str) -> list[Path]:
    return [Path(p) for p in sorted(glob.glob(str(root / pattern)))]


@pytest.fixture(scope="module")
def real_run(shared_data, tmp_path_factory) -> Path:
    """A squeezenet trained one epoch at 64 px on 60 real radiographs (COVID-19, normal, pneumonia), so the
    test images (other files of the same sources) are the kind of image it knows."""
    root = tmp_path_factory.mktemp("real")
    sources = {"COVID-19": files(shared_data, f"{RADIOGRAPHY}/COVID/*.png")[:20],
               "normal": files(shared_data, f"{RADIOGRAPHY}/Normal/*.png")[:20],
               "pneumonia": files(shared_data, f"{NIH}/Pneumonia/*.png")[:20]}
    splits = ["train", "train", "train", "val", "test"]
    rows = [new_row(path, label, f"{label}-{i}", "shared", view="PA", split=splits[i % 5])
            for label, paths in sources.items() for i, path in enumerate(paths)]
    manifest, _ = save_manifest(pd.DataFrame(rows), root / "manifest")
    return train_tiny(manifest, root / "run")


@pytest.fixture(scope="module")
def uploaded(shared_data, orthanc) -> list[Made]:
    """Real chest images as DICOM in Orthanc: CR and DX, frontal, MONOCHROME1 and 2, 8 and 16 bits, in two
    studies of one patient; plus a lateral film (in the first study), a CT slice and a frontal CR whose pixel
    data was removed."""
    orthanc.wipe()
    first, second = generate_uid(), generate_uid()
    covid = files(shared_data, f"{RADIOGRAPHY}/COVID/*.png")[40:42]
    normal = files(shared_data, f"{RADIOGRAPHY}/Normal/*.png")[40:41]
    pneumonia = files(shared_data, f"{NIH}/Pneumonia/*.png")[40:41]
    lateral = files(shared_data, "cohen-covid-chestxray/images/*-L.jp*g")[0]
    ct = files(shared_data, "ucsd-covid-ct/CT_COVID/*.png")[0]
    made = [
        dicom_from(gray(covid[0]), modality="CR", photometric="MONOCHROME2", bits=16, view="PA", study=first, number=1),
        dicom_from(gray(normal[0]), modality="DX", photometric="MONOCHROME1", bits=16, view="AP", study=first, number=2),
        dicom_from(gray(pneumonia[0]), modality="CR", photometric="MONOCHROME1", bits=8, view="PA", study=second, number=1),
        dicom_from(gray(covid[1]), modality="DX", photometric="MONOCHROME2", bits=8, view=None, study=second, number=2),
        dicom_from(gray(lateral), modality="CR", view="LL", study=first, number=3, expect="skipped"),
        dicom_from(gray(ct), modality="CT", view=None, expect="skipped"),
        dicom_from(gray(covid[0]), modality="CR", pixel_data=False, expect="failed"),
    ]
    for item in made:
        orthanc.upload(item.data)
    return made


@pytest.mark.slow
def test_screen_stores_one_report_and_overlay_per_frontal_image_with_predicts_probabilities(
        cli, orthanc, credentials, real_run, uploaded, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state.db"
    said = []
    code, out, err = cli("pacs", "screen", orthanc.dicomweb, "--model", real_run, "--modality", "CR,DX,CT",
                         "--state", state)
    said += [out, err]
    assert code == 0, err
    frontal = [m for m in uploaded if m.expect == "done"]
    sha = file_sha256(real_run / "best.pt")
    figures = figures_line(Predictor(real_run).test_report)  # the run's own test sensitivity / specificity

    # what Orthanc's own DICOMweb holds: exactly one report and one overlay per frontal image, in its study
    reports: dict[str, tuple[dict[str, float], str]] = {}
    for study in {m.study for m in uploaded}:
        found = results_in(orthanc, study)
        for item in found["SR"]:
            report = read_back(orthanc, study, item)
            referenced, probabilities, decision = report_values(report)
            assert referenced not in reports, "two reports for one instance"
            assert report.SOPInstanceUID == ResultUids.of(study, referenced, sha).sr  # found again after a crash
            reports[referenced] = (probabilities, decision)
            assert report.StudyInstanceUID == study and report.PatientID == PATIENT_ID  # copied, not invented
            text = report_text(report)
            assert DISCLAIMER in text and sha in text and "decision:" in text and figures in text
        overlays = [read_back(orthanc, study, item) for item in found["OT"]]
        assert len(overlays) == len(found["SR"])
        for overlay in overlays:
            assert overlay.Modality == "OT" and overlay.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
            assert overlay.PhotometricInterpretation == "RGB" and overlay.pixel_array.ndim == 3
            assert overlay.StudyInstanceUID == study and overlay.PatientName == PATIENT_NAME
    assert sorted(reports) == sorted(m.instance for m in frontal)

    # the same pixels through `lungscreen pacs pull` and `lungscreen predict`
    pulled = tmp_path / "pulled"
    for study in {m.study for m in frontal}:
        code, out, err = cli("pacs", "pull", orthanc.dicomweb, study, "--to", pulled, "--mkdir")
        said += [out, err]
        assert code == 0, err
    sources = [next(pulled.rglob(f"{m.instance}.dcm")) for m in frontal]
    code, out, err = cli("predict", real_run, *sources, "--out", tmp_path / "predictions.csv")
    assert code == 0, err
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert len(predictions) == len(frontal) and (predictions["error"].isna() | (predictions["error"] == "")).all()
    for _, row in predictions.iterrows():
        probabilities, decision = reports[Path(row["path"]).stem]
        assert max(abs(value - row[name]) for name, value in probabilities.items()) <= 1e-5
        assert decision == row["prediction"]

    # the studies as `pacs query` lists them: UIDs and dates
    code, out, err = cli("pacs", "query", orthanc.dicomweb, "--modality", "CR,DX", "--since", "2024-01-01")
    said += [out, err]
    assert code == 0 and all(m.study in out for m in frontal) and "2024-01-05" in out
    assert cli("pacs", "query", orthanc.dicomweb, "--since", "2024-02-01")[2].startswith("no study matches")

    # what was left out, with its reason
    code, out, err = cli("pacs", "status", "--state", state, "--limit", "20")
    said += [out, err]
    assert code == 0
    rows = {line.split()[3]: line for line in out.splitlines() if line.startswith("│ ") and "1." in line}
    lateral, ct, broken = (m for m in uploaded if m.expect != "done")
    assert "skipped" in rows[lateral.instance] and "lateral view" in rows[lateral.instance]
    assert "skipped" in rows[ct.instance] and "modality CT" in rows[ct.instance]
    assert "failed" in rows[broken.instance] and "no pixel data" in rows[broken.instance]

    # a second run adds nothing
    before = {s: {k: len(v) for k, v in results_in(orthanc, s).items()} for s in {m.study for m in uploaded}}
    code, out, err = cli("pacs", "screen", orthanc.dicomweb, "--model", real_run, "--modality", "CR,DX,CT",
                         "--state", state)
    said += [out, err]
    assert code == 0 and "0 new instance(s)" in err and "0 to screen" in err, err
    after = {s: {k: len(v) for k, v in results_in(orthanc, s).items()} for s in {m.study for m in uploaded}}
    assert after == before

    # privacy: no patient name or ID in any output or in the state; nothing from the PACS on disk but --to
    database = state.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("state.db-*"))
    for secret in PRIVATE:
        assert all(secret not in text for text in said), secret
        assert secret.encode() not in database, secret
    assert {p.name for p in tmp_path.iterdir()} <= {"state.db", "state.db-wal", "state.db-shm", "pulled",
                                                    "predictions.csv"}
    with sqlite3.connect(state) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(pacs_instances)")]
    assert not any("patient" in column.lower() for column in columns)


@pytest.mark.slow
def test_an_onnx_export_screens_without_grad_cam(cli, orthanc, credentials, real_run, uploaded, tmp_path):
    from lungscreen.inference.export import export_run

    exported = export_run(real_run, tmp_path / "model.onnx").model
    state = tmp_path / "onnx.db"
    code, _, err = cli("pacs", "screen", orthanc.dicomweb, "--model", exported, "--state", state)
    assert code == 0, err
    frontal = [m for m in uploaded if m.expect == "done"]
    sources = [m.write(tmp_path) for m in frontal]
    code, _, err = cli("predict", exported, *sources, "--out", tmp_path / "onnx.csv")
    assert code == 0, err
    expected = pd.read_csv(tmp_path / "onnx.csv").assign(instance=lambda f: f["path"].map(lambda p: Path(p).stem))
    sha = file_sha256(exported)
    checked = 0
    for study in {m.study for m in frontal}:
        for item in results_in(orthanc, study)["SR"]:
            report = read_back(orthanc, study, item)
            if sha not in report_text(report):
                continue  # the PyTorch run's report
            referenced, probabilities, _ = report_values(report)
            row = expected.set_index("instance").loc[referenced]
            assert max(abs(value - row[name]) for name, value in probabilities.items()) <= 1e-5
            assert "no Grad-CAM heat-map" in report_text(report)
            checked += 1
    assert checked == len(frontal)


# ----- bad input -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(synthetic) -> Path:
    return synthetic[0]


def one_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_url_that_is_not_dicomweb_is_one_line(cli, orthanc, credentials):
    line = one_line(*cli("pacs", "query", orthanc.root)[::2])  # Orthanc's own REST API, not its DICOMweb root
    assert "does not answer as a DICOMweb service" in line and "/dicom-web" in line


def test_a_wrong_password_is_one_line(cli, orthanc, model, monkeypatch, tmp_path):
    monkeypatch.setenv("LUNGSCREEN_PACS_USER", orthanc.auth[0])
    monkeypatch.setenv("LUNGSCREEN_PACS_PASSWORD", "not-the-password")
    assert "refused the credentials (HTTP 401)" in one_line(*cli("pacs", "query", orthanc.dicomweb)[::2])
    line = one_line(*cli("pacs", "screen", orthanc.dicomweb, "--model", model, "--state", tmp_path / "s.db")[::2])
    assert "refused the credentials" in line and "not-the-password" not in line


def test_credentials_from_a_file_and_never_in_the_url(cli, orthanc, tmp_path, monkeypatch):
    for variable in ("LUNGSCREEN_PACS_USER", "LUNGSCREEN_PACS_PASSWORD", "LUNGSCREEN_PACS_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    secrets = tmp_path / "pacs.credentials"
    secrets.write_text(f"{orthanc.auth[0]}:{orthanc.auth[1]}\n")
    code, _, err = cli("pacs", "query", orthanc.dicomweb, "--credentials", secrets)
    assert code == 0, err
    with_password = orthanc.dicomweb.replace("://", f"://{orthanc.auth[0]}:{orthanc.auth[1]}@")
    line = one_line(*cli("pacs", "query", with_password)[::2])
    assert "credentials in the address" in line and orthanc.auth[1] not in line


def test_a_study_that_does_not_exist_is_one_line(cli, orthanc, credentials, tmp_path):
    line = one_line(*cli("pacs", "pull", orthanc.dicomweb, "1.2.3.4.5.6.999", "--to", tmp_path)[::2])
    assert "has no study 1.2.3.4.5.6.999" in line
    assert "not a DICOM UID" in one_line(*cli("pacs", "pull", orthanc.dicomweb, "../etc", "--to", tmp_path)[::2])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_unreachable_host_is_one_line_after_the_retries(cli, credentials):
    from servers import free_port

    line = one_line(*cli("pacs", "query", f"http://127.0.0.1:{free_port()}/dicom-web")[::2])
    assert "cannot reach" in line and "connection refused" in line


@pytest.mark.slow
def test_a_pacs_without_chest_images_says_so_and_exits_0(cli, orthanc, credentials, model, synthetic, tmp_path):
    orthanc.wipe()
    films = synthetic[1]
    orthanc.upload(dicom_from(gray(films[0]), modality="CR", body_part="HAND").data)
    orthanc.upload(dicom_from(gray(films[1]), modality="MR", view=None, body_part="BRAIN").data)
    code, _, err = cli("pacs", "screen", orthanc.dicomweb, "--model", model, "--state", tmp_path / "s.db")
    assert code == 0, err
    assert "holds no chest image this CXR model takes" in err and "1 instance(s) skipped" in err
    orthanc.wipe()
    code, _, err = cli("pacs", "screen", orthanc.dicomweb, "--model", model, "--state", tmp_path / "t.db")
    assert code == 0 and "holds no chest image" in err and "nothing to screen" in err


def test_status_without_a_state_says_where_it_looked(cli, tmp_path):
    line = one_line(*cli("pacs", "status", "--state", tmp_path / "none.db")[::2])
    assert "no screening state at" in line


def test_the_overlay_keeps_the_source_grid(orthanc, credentials, synthetic, tmp_path):
    """A 48 x 48 film gives a 48 x 48 overlay (the grid a viewer registers the two on)."""
    from lungscreen.inference.predict import Predictor
    from lungscreen.pacs import Options, Pacs, Screener, State, Tally
    from lungscreen.pacs.connection import Credentials

    orthanc.wipe()
    made = synthetic_batch(synthetic[1], 1)[0]
    orthanc.upload(made.data)
    screener = Screener(Pacs(orthanc.dicomweb, Credentials.from_environment()), Predictor(synthetic[0]),
                        State(f"sqlite:///{tmp_path / 's.db'}"), Options(modalities=("CR", "DX")))
    tally = Tally()
    screener.run(tally)
    assert tally.statuses == {"done": 1}
    overlay = read_back(orthanc, made.study, results_in(orthanc, made.study)["OT"][0])
    assert overlay.pixel_array.shape == (48, 48, 3) and np.asarray(overlay.pixel_array).max() > 0


@pytest.fixture(scope="module")
def gated(tmp_path_factory) -> Path:
    """A run whose out-of-distribution gate has learnt enough to refuse noise (tests/test_ood_gate.py's recipe)."""
    from lungscreen.training.config import from_dict
    from lungscreen.training.engine import train

    root = tmp_path_factory.mktemp("gated")
    recipe = tiny_recipe(make_manifest(root / "data", per_class=30, size=64),
                         model={"name": "resnet18", "options": {"width": 8}})
    recipe["stages"] = [{"name": "all", "epochs": 4, "image_size": 64, "train": "all",
                         "optimizer": {"name": "adam", "lr": 3e-3}}]
    return train(from_dict(recipe), out=root / "run", quiet=True).run_dir


@pytest.mark.slow
def test_an_image_the_models_gate_refuses_is_skipped_with_its_reason(orthanc, credentials, gated, tmp_path):
    """A frontal CR header on a picture of noise: the header passes, the run's out-of-distribution gate
    refuses the pixels, and the instance is recorded as skipped with the gate's reason (nothing stored)."""
    from lungscreen.data.out_of_scope import kind_of, write_out_of_scope
    from lungscreen.pacs import Options, Pacs, Screener, State, Tally
    from lungscreen.pacs.connection import Credentials

    orthanc.wipe()
    picture = next(p for p in write_out_of_scope(tmp_path / "oos") if kind_of(p) == "gaussian-noise")
    noise = dicom_from(gray(picture))
    orthanc.upload(noise.data)
    state = State(f"sqlite:///{tmp_path / 's.db'}")
    screener = Screener(Pacs(orthanc.dicomweb, Credentials.from_environment()), Predictor(gated), state,
                        Options(modalities=("CR", "DX")))
    tally = Tally()
    screener.run(tally)
    row = state.rows()[0]
    assert tally.statuses == {"skipped": 1} and row["status"] == "skipped", row
    assert row["reason"].startswith("not screened:") and results_in(orthanc, noise.study) == {"SR": [], "OT": []}
