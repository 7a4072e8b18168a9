"""Ctrl-C and SIGTERM during the four long commands: one line, exit 130 / 143, no traceback, no half-written
output, and a training run resumed after SIGTERM ends with the weights of an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from training_fixtures import make_manifest, tiny_recipe, write_recipe

LUNGSCREEN = [sys.executable, "-m", "lungscreen"]
ENV = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


def interrupt(command: list[str], signum: int, ready, timeout: float = 240) -> subprocess.CompletedProcess:
    """Start ``command``, wait until ``ready()`` says the long work is under way, send ``signum``, collect."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the command ended before it could be interrupted:\n" + process.stderr.read()
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def after(seconds: float):
    start = time.time()
    return lambda: time.time() - start > seconds


def check_one_line(result: subprocess.CompletedProcess, signum: int) -> str:
    name = signal.Signals(signum).name
    assert result.returncode == 128 + signum, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "killed by signal" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if f"interrupted ({name})" in line]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def no_temporary_files(folder: Path) -> None:
    leftovers = [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers[:3]


# --------------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("signals")
    recipe = tiny_recipe(make_manifest(root / "data", per_class=30))
    recipe["model"] = {"name": "resnet18"}  # heavy enough that an epoch lasts about a second
    recipe["data"]["num_workers"] = 1  # a loader worker too: it must leave the signal to the parent
    recipe["stages"] = [{"name": "all", "epochs": 4, "image_size": 64, "train": "all",
                         "schedule": {"name": "one_cycle"}}]
    return write_recipe(root / "recipe.yaml", recipe)


def epochs_done(run: Path, count: int):
    metrics = run / "metrics.csv"
    return lambda: metrics.exists() and len(pd.read_csv(metrics)) >= count


def test_ctrl_c_during_train_says_how_to_resume(recipe, tmp_path):
    run = tmp_path / "run"
    result = interrupt([*LUNGSCREEN, "train", str(recipe), "--out", str(run)], signal.SIGINT, epochs_done(run, 1))
    line = check_one_line(result, signal.SIGINT)
    assert "at epoch" in line and f"lungscreen train --resume {run}" in line
    assert "interrupted (SIGINT)" in (run / "log.txt").read_text()
    assert torch.load(run / "stages/00-all/last.ckpt", weights_only=False)["epoch"] >= 0  # a whole checkpoint


def test_ctrl_c_during_train_prints_its_line_once_on_the_terminal(recipe, tmp_path):
    """A terminal shows stdout and stderr together: the interrupt line must appear there once, not twice."""
    run = tmp_path / "run"
    result = interrupt([*LUNGSCREEN, "train", str(recipe), "--out", str(run)], signal.SIGINT, epochs_done(run, 1))
    shown = [line for line in (result.stdout + result.stderr).splitlines() if "interrupted (SIGINT)" in line]
    assert len(shown) == 1, shown
    assert "interrupted (SIGINT)" in (run / "log.txt").read_text()


def test_resume_after_sigterm_gives_the_weights_of_an_uninterrupted_run(recipe, tmp_path):
    victim = tmp_path / "victim"
    result = interrupt([*LUNGSCREEN, "train", str(recipe), "--out", str(victim)], signal.SIGTERM,
                       epochs_done(victim, 2))
    check_one_line(result, signal.SIGTERM)
    assert not (victim / "stages/00-all/done.json").exists()
    resumed = subprocess.run([*LUNGSCREEN, "train", "--resume", str(victim)], env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = subprocess.run([*LUNGSCREEN, "train", str(recipe), "--out", str(tmp_path / "reference")], env=ENV,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    ours = torch.load(victim / "stages/00-all/final.pt", weights_only=True)["state_dict"]
    theirs = torch.load(tmp_path / "reference/stages/00-all/final.pt", weights_only=True)["state_dict"]
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert pd.read_csv(victim / "metrics.csv")["run_epoch"].tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------------
# data build, preprocess and predict over the shared images (thousands of files: seconds of work)
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_manifest(shared_data, tmp_path_factory) -> Path:
    from lungscreen.data.build import build_manifest
    from lungscreen.data.manifest import save_manifest

    parquet, _ = save_manifest(build_manifest([shared_data / "covid19-radiography-database",
                                               shared_data / "nih-chestxray14-darkcovidnet"], workers=2).manifest,
                               tmp_path_factory.mktemp("shared") / "m")
    return parquet


@pytest.mark.shared_data
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_data_build_stops_cleanly(shared_data, tmp_path, signum):
    result = interrupt([*LUNGSCREEN, "data", "build", str(shared_data), "--out", str(tmp_path / "m")], signum, after(5))
    check_one_line(result, signum)
    assert not list(tmp_path.glob("m*")), "no manifest, not half of one"


@pytest.mark.shared_data
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_preprocess_stops_cleanly(shared_manifest, tmp_path, signum):
    out = tmp_path / "pre"
    command = [*LUNGSCREEN, "preprocess", str(shared_manifest), "--pipeline", "lungcrop", "--out", str(out),
               "--if-no-lung-model", "classical", "--workers", "2"]
    records = lambda: len(list((out / "cache").rglob("*.json"))) > 20  # noqa: E731 - the work is under way
    result = interrupt(command, signum, records)
    check_one_line(result, signum)
    assert not (out / "lungcrop.parquet").exists()
    no_temporary_files(out)
    import json

    for record in (out / "cache").rglob("*.json"):
        json.loads(record.read_text())  # every record the cache holds is whole


@pytest.mark.shared_data
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_predict_stops_cleanly(shared_data, recipe, tmp_path, signum):
    run = tmp_path / "run"
    trained = subprocess.run([*LUNGSCREEN, "train", str(recipe), "--out", str(run), "--set", "stages.0.epochs=1",
                              "--set", "model.name=squeezenet1_1"], env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    target = tmp_path / "p.csv"
    result = interrupt([*LUNGSCREEN, "predict", str(run), str(shared_data), "--out", str(target), "--batch-size", "1"],
                       signum, after(6))
    check_one_line(result, signum)
    assert not target.exists()
    no_temporary_files(tmp_path)
