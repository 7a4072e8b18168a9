"""Downloading public sources: a real `git clone` from a local file:// remote, Kaggle fallbacks, no half-written folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from lungscreen.data.download import CATALOGUE, download, parse_url_overrides
from lungscreen.errors import ConfigError, LungscreenError, SourceError

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

COHEN_METADATA = (
    "patientid,offset,sex,age,finding,RT_PCR_positive,survival,intubated,went_icu,view,modality,date,location,"
    "folder,filename,doi,url,license,clinical_notes,other_notes\n"
    "1,0,M,65,COVID-19,Y,,,,PA,X-ray,2020,Italy,images,chest-1.png,,,CC BY,,\n"
    "2,,F,52,Streptococcus,,,,,AP,X-ray,2019,Spain,images,chest-2.png,,,CC BY-NC-SA,,\n"
)


def _git(folder: Path, *arguments: str) -> None:
    subprocess.run(["git", "-c", "user.name=lungscreen", "-c", "user.email=test@lungscreen", *arguments],
                   cwd=folder, check=True, capture_output=True)


def _remote(folder: Path, files: dict[str, bytes]) -> str:
    """A committed git repository holding ``files``; returns its file:// URL."""
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    _git(folder, "init", "-q")
    _git(folder, "add", ".")
    _git(folder, "commit", "-q", "-m", "data")
    return folder.resolve().as_uri()


def _png(seed: int) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture()
def cohen_remote(tmp_path) -> str:
    return _remote(tmp_path / "remote", {"metadata.csv": COHEN_METADATA.encode(), "images/chest-1.png": _png(1),
                                         "images/chest-2.png": _png(2), "README.md": b"# a tiny Cohen-like layout\n"})


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_git_source_is_cloned_from_a_file_remote_and_read_by_the_cohen_adapter(tmp_path, cohen_remote):
    calls = []
    [result] = download(["cohen"], tmp_path / "data", urls={"cohen": cohen_remote},
                        progress=lambda *call: calls.append(call))
    assert result.status == "downloaded" and result.ok
    target = tmp_path / "data" / "cohen-covid-chestxray"
    assert result.path == target
    assert (target / "metadata.csv").read_text() == COHEN_METADATA
    assert (target / "images" / "chest-2.png").read_bytes() == _png(2)
    assert _leftovers(tmp_path / "data") == []
    assert calls and all(name == "cohen" and 0 <= (percent or 0) <= 100 for name, _, percent in calls)

    from lungscreen.data.sources import Skips, get_source

    rows = get_source("cohen").read(target, Skips())
    assert sorted(row["label"] for row in rows) == ["COVID-19", "bacterial"]


def test_existing_folder_is_left_alone_unless_forced(tmp_path, cohen_remote):
    data = tmp_path / "data"
    download(["cohen"], data, urls={"cohen": cohen_remote})
    (data / "cohen-covid-chestxray" / "my-notes.txt").write_text("mine")
    [again] = download(["cohen"], data, urls={"cohen": cohen_remote})
    assert again.status == "present"
    assert (data / "cohen-covid-chestxray" / "my-notes.txt").is_file()
    [forced] = download(["cohen"], data, urls={"cohen": cohen_remote}, force=True)
    assert forced.status == "downloaded"
    assert not (data / "cohen-covid-chestxray" / "my-notes.txt").exists()
    assert (data / "cohen-covid-chestxray" / "metadata.csv").is_file()
    assert _leftovers(data) == []


def test_failing_clone_leaves_no_partial_folder_and_keeps_the_old_copy(tmp_path, cohen_remote):
    data = tmp_path / "data"
    [failed] = download(["figure1"], data, urls={"figure1": (tmp_path / "no-such-repo").as_uri()})
    assert failed.status == "failed" and not failed.ok
    assert "git clone" in failed.message and "no-such-repo" in failed.message
    assert list(data.iterdir()) == []
    download(["cohen"], data, urls={"cohen": cohen_remote})
    [failed] = download(["cohen"], data, urls={"cohen": (tmp_path / "gone").as_uri()}, force=True)
    assert failed.status == "failed"
    assert (data / "cohen-covid-chestxray" / "metadata.csv").read_text() == COHEN_METADATA
    assert _leftovers(data) == []


def test_one_failure_does_not_stop_the_others(tmp_path, cohen_remote):
    results = download(["figure1", "cohen"], tmp_path / "data",
                       urls={"figure1": (tmp_path / "missing").as_uri(), "cohen": cohen_remote})
    assert [r.status for r in results] == ["failed", "downloaded"]


def test_covid_ct_archives_are_extracted_in_place(tmp_path):
    archive = tmp_path / "CT_COVID.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("CT_COVID/2020.01.24.919183-p27-132.png", _png(3))
    url = _remote(tmp_path / "remote", {"Images-processed/CT_COVID.zip": archive.read_bytes(),
                                        "COVID-CT-MetaInfo.xlsx": b"placeholder"})
    [result] = download(["covid-ct"], tmp_path / "data", urls={"covid-ct": url})
    assert result.status == "downloaded"
    assert (tmp_path / "data" / "ucsd-covid-ct" / "CT_COVID" / "2020.01.24.919183-p27-132.png").read_bytes() == _png(3)


def test_kaggle_source_without_the_kaggle_cli_says_what_to_do_by_hand(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    [result] = download(["rsna"], tmp_path / "data")
    assert result.status == "manual" and result.ok
    assert "not installed" in result.message and "pip install kaggle" in result.message
    assert "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data" in result.message
    assert "accept the competition rules" in result.message
    assert str(tmp_path / "data" / "rsna-pneumonia") in result.message
    assert list((tmp_path / "data").iterdir()) == []


def test_kaggle_cli_without_a_token_says_so(tmp_path, monkeypatch):
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "kaggle").write_text("#!/bin/sh\nexit 1\n")
    (bin_folder / "kaggle").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_folder))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    for variable in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    [result] = download(["radiography"], tmp_path / "data")
    assert result.status == "manual"
    assert "no API token" in result.message and "kaggle.json" in result.message
    assert "tawsifurrahman/covid19-radiography-database" in result.message


def test_kaggle_download_is_extracted_and_moved_into_place(tmp_path, monkeypatch):
    """The Kaggle CLI cannot reach kaggle.com here: a stand-in executable plays it, writing the zip it would."""
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "kaggle").write_text(
        f"#!{sys.executable}\n"
        "import sys, zipfile, pathlib\n"
        "args = sys.argv[1:]\n"
        "assert args[:3] == ['datasets', 'download', '-d'] and args[4] == '-p', args\n"
        "folder = pathlib.Path(args[5])\n"
        "with zipfile.ZipFile(folder / (args[3].split('/')[-1] + '.zip'), 'w') as z:\n"
        "    z.writestr('chest_xray/train/NORMAL/IM-0115-0001.jpeg', b'jpeg bytes')\n"
        "print('100%|##########| 1.00k/1.00k')\n")
    (bin_folder / "kaggle").chmod(0o755)
    (tmp_path / "kaggle-config").mkdir()
    (tmp_path / "kaggle-config" / "kaggle.json").write_text("{}")
    monkeypatch.setenv("PATH", str(bin_folder))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    [result] = download(["kermany"], tmp_path / "data")
    assert result.status == "downloaded", result.message
    target = tmp_path / "data" / "kermany-chest-xray"
    assert (target / "chest_xray" / "train" / "NORMAL" / "IM-0115-0001.jpeg").read_bytes() == b"jpeg bytes"
    assert list(target.glob("*.zip")) == [] and _leftovers(tmp_path / "data") == []


def test_manual_sources_give_real_urls_and_create_nothing(tmp_path):
    results = download(["nih", "montgomery", "shenzhen"], tmp_path / "data")
    assert [r.status for r in results] == ["manual"] * 3
    assert "https://nihcc.app.box.com/v/ChestXray-NIHCC" in results[0].message
    assert "BBox_List_2017.csv" in results[0].message and str(tmp_path / "data" / "nih-chestxray14") in results[0].message
    assert "ManualMask" in results[1].message and "data.lhncbc.nlm.nih.gov" in results[1].message
    assert "CXR_png" in results[2].message
    assert list((tmp_path / "data").iterdir()) == []


def test_unknown_name_is_refused_before_anything_is_fetched(tmp_path, cohen_remote):
    with pytest.raises(SourceError, match="unknown source 'chexpert'"):
        download(["cohen", "chexpert"], tmp_path / "data", urls={"cohen": cohen_remote})
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("pair, error", [
    ("cohen", ConfigError), ("cohen=", ConfigError), ("=file:///x", ConfigError),
    ("cohen=--upload-pack=touch /tmp/pwned", ConfigError), ("cohen=ext::sh -c touch% /tmp/pwned", ConfigError),
    ("cohen=/just/a/path", ConfigError), ("chexpert=https://example.org/x.git", SourceError),
])
def test_bad_url_overrides_are_refused(pair, error):
    with pytest.raises(error):
        parse_url_overrides([pair])


def test_url_overrides_accept_real_remote_forms():
    overrides = parse_url_overrides(["cohen=https://mirror.example.org/covid.git", "figure1=git@github.com:me/f1.git",
                                     "v7labs=file:///srv/mirror/v7"])
    assert overrides["figure1"] == "git@github.com:me/f1.git"


def test_catalogue_covers_every_public_source_with_a_way_to_get_it():
    assert set(CATALOGUE) >= {"cohen", "figure1", "actualmed", "v7labs", "covid-ct", "rsna", "radiography", "kermany",
                              "nih", "montgomery", "shenzhen", "openist"}
    assert CATALOGUE["cohen"].location == "https://github.com/ieee8023/covid-chestxray-dataset.git"
    assert CATALOGUE["rsna"].location == "rsna-pneumonia-detection-challenge"
    assert CATALOGUE["kermany"].location == "paultimothymooney/chest-xray-pneumonia"
    for source in CATALOGUE.values():
        assert source.page.startswith("https://")
        assert source.method != "manual" or "{target}" in source.steps


def test_download_command_lists_clones_and_reports(tmp_path, cohen_remote, monkeypatch):
    from lungscreen.cli.data_download import download_command

    app = typer.Typer()
    app.command("download")(download_command)
    app.command("other")(lambda: None)
    runner = CliRunner()
    listing = runner.invoke(app, ["download", "--list"])
    assert listing.exit_code == 0 and "actualmed" in listing.output and "kaggle-competition" in listing.output
    fetched = runner.invoke(app, ["download", "cohen", "--to", str(tmp_path / "data"), "--url", f"cohen={cohen_remote}"])
    assert fetched.exit_code == 0, fetched.output
    assert "downloaded" in fetched.output and (tmp_path / "data" / "cohen-covid-chestxray" / "metadata.csv").is_file()
    failed = runner.invoke(app, ["download", "figure1", "--to", str(tmp_path / "data"),
                                 "--url", f"figure1={(tmp_path / 'nothing').as_uri()}"])
    assert "failed" in failed.output and isinstance(failed.exception, LungscreenError)  # the boundary: exit 2
    assert "1 of 1 source(s) not downloaded (figure1)" in str(failed.exception)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    manual = runner.invoke(app, ["download", "rsna", "--to", str(tmp_path / "data")])
    assert manual.exit_code == 0 and "pip install kaggle" in manual.output
    assert runner.invoke(app, ["download", "--to", str(tmp_path)]).exit_code != 0, "no name, no --list"
    assert os.listdir(tmp_path / "data") == ["cohen-covid-chestxray"]


def test_download_without_network_is_one_line_and_exit_2(cli, tmp_path):
    """An unreachable remote (no network here, or a mirror that is gone) is bad input, never "a bug"."""
    code, out, err = cli("data", "download", "cohen", "--to", tmp_path / "data", "--url",
                         f"cohen={(tmp_path / 'unreachable').as_uri()}")
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: 1 of 1 source(s) not downloaded (cohen)")
    assert "--url NAME=URL" in lines[0] and "bug" not in err
    assert "failed" in out and not (tmp_path / "data" / "cohen-covid-chestxray").exists()
