"""Manifests that travel: paths written relative to the manifest's folder, every file checked, `data relocate`.

The commands run in this process through :func:`lungscreen.cli.main` (the real error boundary, so exit codes
and the one-line errors are what a user sees); trees are small phantom sets (:func:`synthesize`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import Run
from lungscreen.data.manifest import listed_files, load_manifest, missing_files, save_manifest
from lungscreen.data.synth import synthesize


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small two-source phantom tree (radiography with masks, NIH), copied by each test that moves it."""
    return synthesize(tmp_path_factory.mktemp("phantoms") / "data", 40, size=64, seed=1).root


def project(phantoms: Path, root: Path) -> Path:
    """``root/data``: a private copy of the phantom tree."""
    shutil.copytree(phantoms, root / "data")
    return root / "data"


def build(cli: Run, data: str | Path, out: str | Path) -> str:
    code, stdout, stderr = cli("data", "build", data, "--out", out, "--workers", "1", "--mkdir")
    assert code == 0, stderr
    return stdout


def test_build_from_another_working_folder_resolves(phantoms, tmp_path, monkeypatch, cli) -> None:
    project(phantoms, tmp_path / "project")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    build(cli, "../project/data", "../manifests/m")  # as reported: relative data path, --out elsewhere
    frame = load_manifest(tmp_path / "manifests" / "m.parquet")
    assert len(frame) == 40 and (frame["mask_path"] != "").any()
    assert missing_files(frame) == []
    stored = pd.read_csv(tmp_path / "manifests" / "m.csv", keep_default_na=False)
    assert stored["image_path"].map(os.path.isabs).all(), "data outside the manifest's folder is stored absolute"


def test_data_moved_with_its_manifest_still_loads(phantoms, tmp_path, monkeypatch, cli) -> None:
    project(phantoms, tmp_path / "project")
    monkeypatch.chdir(tmp_path)
    build(cli, "project/data", "project/m")
    stored = pd.read_csv(tmp_path / "project" / "m.csv", keep_default_na=False)
    assert stored["image_path"].str.startswith("data/").all(), "data under the manifest's folder is stored relative"
    shutil.move(tmp_path / "project", tmp_path / "moved")
    frame = load_manifest(tmp_path / "moved" / "m.parquet")
    assert frame["image_path"].str.startswith(str(tmp_path / "moved" / "data")).all() and missing_files(frame) == []
    code, stdout, _ = cli("data", "validate", "moved/m.parquet")
    assert code == 0 and "every file present" in stdout


def test_relocate_after_moving_only_the_data(phantoms, tmp_path, monkeypatch, cli) -> None:
    project(phantoms, tmp_path / "project")
    monkeypatch.chdir(tmp_path)
    build(cli, "project/data", "project/m")
    n = listed_files(load_manifest(tmp_path / "project" / "m.parquet"))
    shutil.move(tmp_path / "project" / "data", tmp_path / "elsewhere")

    code, _, stderr = cli("data", "validate", "project/m.parquet")
    assert code == 2 and stderr.startswith(
        f"error: project/m.parquet: {n} of {n} image/mask files it lists are missing, first: {tmp_path}/project/data/")
    before = (tmp_path / "project" / "m.parquet").read_bytes()
    code, stdout, _ = cli("data", "relocate", "project/m.parquet", "--from", "project/data",
                                 "--to", "elsewhere", "--dry-run")
    assert code == 0 and f"would change {n} path(s)" in stdout and "every path would resolve" in stdout
    assert (tmp_path / "project" / "m.parquet").read_bytes() == before, "a dry run writes nothing"

    code, stdout, _ = cli("data", "relocate", "project/m.parquet", "--from", "project/data",
                                 "--to", "elsewhere")
    assert code == 0 and f"changed {n} path(s)" in stdout and "every path resolves" in stdout
    frame = load_manifest(tmp_path / "project" / "m.csv")  # both files were rewritten
    assert missing_files(frame) == [] and frame["image_path"].str.startswith(str(tmp_path / "elsewhere")).all()
    assert cli("data", "validate", "project/m.parquet")[0] == 0


def test_relocate_refuses_unknown_old_and_missing_new(phantoms, tmp_path, monkeypatch, cli) -> None:
    data = project(phantoms, tmp_path / "project")
    monkeypatch.chdir(tmp_path)
    build(cli, data, "m")
    n = listed_files(load_manifest(tmp_path / "m.parquet"))
    code, _, stderr = cli("data", "relocate", "m.parquet", "--from", "nowhere", "--to", "project")
    assert code == 2 and f"no image or mask path lies under {tmp_path / 'nowhere'}" in stderr
    code, _, stderr = cli("data", "relocate", "m.parquet", "--from", "project", "--to", "later")
    assert code == 2 and "is not an existing folder" in stderr and "--allow-missing" in stderr
    code, stdout, _ = cli("data", "relocate", "m.parquet", "--from", "project", "--to", "later",
                                 "--allow-missing")
    assert code == 0 and f"{n} of {n} image/mask files are still missing" in stdout


def test_demo_refuses_a_manifest_with_missing_files(phantoms, tmp_path, monkeypatch, cli) -> None:
    import lungscreen.data.build as build_module

    data = project(phantoms, tmp_path)
    real_build, lost = build_module.build_manifest, []

    def build_then_lose_a_file(*args, **kwargs):  # a file gone between the build and the check
        result = real_build(*args, **kwargs)
        lost.append(result.manifest["image_path"][0])
        Path(lost[0]).unlink()
        return result

    monkeypatch.setattr(build_module, "build_manifest", build_then_lose_a_file)
    code, stdout, stderr = cli("demo", "--data", data, "--workdir", tmp_path / "demo")
    manifest = tmp_path / "demo" / "manifest.parquet"
    first = next(line for line in stderr.splitlines() if not line.startswith("reading images"))  # after progress
    assert code == 2 and first.startswith(f"error: {manifest}: 1 of ") and "files it lists are missing" in first
    assert f"first: {lost[0]} " in first and "manifest ok" not in stdout


def test_validate_warns_about_a_manifest_without_split(phantoms, tmp_path, cli) -> None:
    data = project(phantoms, tmp_path)
    build(cli, data, tmp_path / "m")
    frame = load_manifest(tmp_path / "m.parquet").drop(columns=["split"])
    frame.to_csv(tmp_path / "unsplit.csv", index=False)
    code, stdout, _ = cli("data", "validate", tmp_path / "unsplit.csv")
    warnings = [line for line in stdout.splitlines() if "no train/val/test split" in line]
    assert code == 0 and len(warnings) == 1
    assert warnings[0].startswith("warning: ")
    assert warnings[0].endswith(f"make one with: lungscreen data build {data} --out {tmp_path / 'unsplit'}-split")


def test_preprocessed_manifest_written_from_a_relative_folder_loads(phantoms, tmp_path, monkeypatch) -> None:
    from lungscreen.preprocessing import preprocess_manifest

    data = project(phantoms, tmp_path)
    save_manifest(_built(data), tmp_path / "m")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    result = preprocess_manifest(load_manifest(tmp_path / "m.parquet").head(4), "equalize", Path("out"), workers=1,
                                 progress=False)
    monkeypatch.chdir(tmp_path)
    frame = load_manifest(tmp_path / "work" / "out" / "equalize.parquet")
    assert len(frame) == len(result.manifest) == 4 and missing_files(frame) == []
    assert frame["image_path"].str.startswith(str(tmp_path / "work" / "out" / "cache")).all()
    stored = pd.read_csv(tmp_path / "work" / "out" / "equalize.csv", keep_default_na=False)
    assert stored["image_path"].str.startswith("cache/").all()
    assert stored["original_image_path"].map(os.path.isabs).all()


def _built(data: Path) -> pd.DataFrame:
    from lungscreen.data.build import build_manifest

    return build_manifest([data], workers=1, show_progress=False).manifest


@pytest.mark.shared_data
def test_shared_data_built_from_another_folder_and_v7labs_named(shared_data, tmp_path, monkeypatch, cli) -> None:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    folders = [os.path.relpath(shared_data / name) for name in ("cohen-covid-chestxray", "v7labs-covid-xray")]
    code, stdout, stderr = cli("data", "build", *folders, "--out", "../out/m", "--mkdir")
    assert code == 0, stderr
    found = [line for line in stdout.splitlines() if line.startswith("found v7labs")]
    assert len(found) == 1
    assert found[0].endswith("(annotations, not images: joined onto 510 cohen rows, 428 with a lung mask)")
    frame = load_manifest(tmp_path / "out" / "m.parquet")
    assert "v7labs" not in set(frame["source"]) and missing_files(frame) == []
    assert (frame["mask_path"] != "").sum() == 428
