"""Runs end to end on tiny synthetic data: run folder, freezing, LR finder, tracking, predict, and exact
resume after ``kill -9`` in the middle of an epoch."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from training_fixtures import make_manifest, tiny_recipe, write_recipe

from lungscreen.inference.predict import Predictor, predict_paths
from lungscreen.models import load_checkpoint
from lungscreen.training.config import from_dict
from lungscreen.training.engine import train
from lungscreen.training.prepare import build_initial_model

LUNGSCREEN = [sys.executable, "-m", "lungscreen"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("synth"), per_class=30)


def test_run_folder_freezing_lr_finder_tracking_and_predict(manifest, tmp_path):
    pytest.importorskip("mlflow")
    recipe = tiny_recipe(manifest, tracking={"mlflow": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    recipe["stages"][1]["optimizer"] = {"lr": "find", "lr_spread": 10}
    recipe["stages"][1]["lr_find"] = {"steps": 20, "min_lr": 1e-5, "max_lr": 1.0}
    config = from_dict(recipe)
    start = build_initial_model(config, config.task(0))
    result = train(config, out=tmp_path / "run", quiet=True)
    run = result.run_dir

    for name in ("config.yaml", "log.txt", "metrics.csv", "best.pt", "best.json", "test.json", "summary.json",
                 "stages/00-head/final.pt", "stages/00-head/last.ckpt", "stages/00-head/done.json",
                 "stages/01-all/lr_find.png", "stages/01-all/lr_find.json"):
        assert (run / name).is_file(), name
    history = pd.read_csv(run / "metrics.csv")
    assert history["stage"].tolist() == [0, 1, 1] and history["run_epoch"].tolist() == [0, 1, 2]
    assert {"val/sensitivity/COVID-19", "val/ppv/COVID-19", "val/auc/COVID-19", "train/loss"} <= set(history.columns)
    assert (history["images_per_s"] > 0).all()
    assert "epoch 2" in (run / "log.txt").read_text()

    # Stage 0 trains the head only: every other group (weights and BatchNorm statistics) is untouched.
    after_head = load_checkpoint(run / "stages/00-head/final.pt").model
    groups_before, groups_after = start.layer_groups(), after_head.layer_groups()
    for before, after in zip(groups_before[:-1], groups_after[:-1]):
        for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
            assert torch.equal(a, b), name
    assert not all(torch.equal(a, b) for a, b in zip(groups_before[-1].state_dict().values(),
                                                      groups_after[-1].state_dict().values()))
    # Stage 1 used the LR range test's suggestion at the head and a tenth of it at the input side.
    found = float(pd.read_json(run / "stages/01-all/lr_find.json", typ="series")["suggestion"])
    assert history.iloc[1]["lr_last"] / history.iloc[1]["lr_first"] == pytest.approx(10, rel=1e-6)
    assert 1e-5 <= found <= 1.0

    summary = result.summary
    assert [s["name"] for s in summary["stages"]] == ["head", "all"] and summary["stages"][1]["images_per_s"] > 0
    for estimate in summary["test"]["figures"].values():
        if np.isfinite(estimate["value"]) and np.isfinite(estimate["low"]):
            assert estimate["low"] <= estimate["value"] + 1e-9 and estimate["value"] <= estimate["high"] + 1e-9
    assert summary["best"]["metric"] == "val/auc/COVID-19"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = pd.read_json(run / "mlflow.json", typ="series")["run_id"]
    assert len(client.get_metric_history(run_id, "val/loss")) == 3

    # predict: a folder (recursive) and a broken file; the batch goes on and says why.
    folder = tmp_path / "new" / "nested"
    folder.mkdir(parents=True)
    for path in sorted(Path(manifest).parent.glob("*.png"))[:3]:
        shutil.copy(path, folder / path.name)
    (tmp_path / "new" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    frame = predict_paths(run, [tmp_path / "new"])
    assert list(frame.columns) == ["path", "frame", "normal", "pneumonia", "COVID-19", "prediction", "decided_by", "ood",
                                     "ood_score", "note", "error"]
    assert len(frame) == 4
    assert set(frame.loc[frame["error"] == "", "decided_by"]) == {Predictor(run).decision_rule}
    broken = frame[frame["path"].str.endswith("broken.png")].iloc[0]
    assert broken["error"] and np.isnan(broken["COVID-19"]) and broken["prediction"] == ""
    good = frame[frame["error"] == ""]
    assert np.allclose(good[["normal", "pneumonia", "COVID-19"]].sum(axis=1), 1.0, atol=1e-5)
    assert set(good["prediction"]) <= {"normal", "pneumonia", "COVID-19"}

    cli = subprocess.run([*LUNGSCREEN, "predict", str(run), str(tmp_path / "new"), "--out", str(tmp_path / "p.csv")],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert len(pd.read_csv(tmp_path / "p.csv")) == 4


def test_training_learns_the_synthetic_task(manifest, tmp_path):
    recipe = tiny_recipe(manifest)
    # SqueezeNet 1.1 has no BatchNorm: a few dozen steps are too few for BatchNorm's running statistics,
    # so a BatchNorm network's eval-mode predictions would lag behind what it has learnt.
    recipe["model"] = {"name": "squeezenet1_1"}
    recipe["stages"] = [{"name": "all", "epochs": 6, "image_size": 32, "train": "all",
                         "optimizer": {"lr": 3e-3}, "schedule": {"name": "one_cycle"}}]
    recipe["data"]["augment"] = None
    result = train(from_dict(recipe), out=tmp_path / "run", quiet=True)
    assert result.history["val/accuracy"].max() >= 0.8


def _final_state(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(run / "stages" / stage / "final.pt", weights_only=True)["state_dict"]


def test_resume_after_kill_mid_epoch_gives_the_same_weights(manifest, tmp_path):
    recipe = tiny_recipe(manifest)
    recipe["model"] = {"name": "resnet18"}  # heavy enough that an epoch lasts about a second
    recipe["stages"] = [
        {"name": "a", "epochs": 2, "image_size": 64, "train": "all", "schedule": {"name": "one_cycle"}},
        {"name": "b", "epochs": 3, "image_size": 80, "train": "-3:", "optimizer": {"lr": [1e-4, 1e-3]},
         "schedule": {"name": "step", "step_epochs": 1, "factor": 0.5}},
    ]
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    victim = tmp_path / "victim"
    process = subprocess.Popen([*LUNGSCREEN, "train", str(path), "--out", str(victim)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = victim / "metrics.csv"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(pd.read_csv(metrics)) >= 3:  # stage b's first epoch is done
            break
        time.sleep(0.05)
    time.sleep(0.4)  # into stage b's second epoch
    rows_at_kill = len(pd.read_csv(metrics))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert rows_at_kill == 3, "the kill should land inside stage b's second epoch"
    assert not (victim / "stages/01-b/done.json").exists()

    resumed = subprocess.run([*LUNGSCREEN, "train", "--resume", str(victim)], env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = subprocess.run([*LUNGSCREEN, "train", str(path), "--out", str(tmp_path / "reference")], env=env,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    ours, theirs = _final_state(victim, "01-b"), _final_state(tmp_path / "reference", "01-b")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    history = pd.read_csv(victim / "metrics.csv")
    assert history["run_epoch"].tolist() == [0, 1, 2, 3, 4]  # the interrupted epoch is not listed twice


def test_preprocessed_manifest_trains_as_is_and_predict_applies_its_pipeline(manifest, tmp_path):
    from lungscreen.data.manifest import load_manifest
    from lungscreen.errors import ConfigError
    from lungscreen.preprocessing import preprocess_manifest

    result = preprocess_manifest(load_manifest(manifest), "equalize", tmp_path / "pre", workers=1, progress=False)
    recipe = tiny_recipe(result.manifest_path)
    recipe["model"] = {"name": "squeezenet1_1"}
    recipe["stages"] = recipe["stages"][:1]
    recipe["data"]["pipeline"] = "clahe"
    with pytest.raises(ConfigError, match="^data.pipeline: .*already preprocessed with 'equalize'"):
        train(from_dict(recipe), out=tmp_path / "refused", quiet=True)
    recipe["data"]["pipeline"] = "none"
    run = train(from_dict(recipe), out=tmp_path / "run", quiet=True).run_dir
    assert load_checkpoint(run / "best.pt").spec.input.pipeline["name"] == "equalize"
    frame = predict_paths(run, sorted(Path(manifest).parent.glob("*.png"))[:2])
    assert (frame["error"] == "").all()


def test_each_stage_preprocesses_its_own_way_and_its_checkpoints_say_so(manifest, tmp_path):
    """A pre-training stage without preprocessing, then a stage on equalized images (CXR pre-training, then
    the CT body crop, in one recipe): each stage's checkpoint stores its own pipeline, and best.pt comes from
    the stage that saw what the final model eats."""
    recipe = tiny_recipe(manifest)
    recipe["stages"][1]["data"] = {"pipeline": "equalize"}
    result = train(from_dict(recipe), out=tmp_path / "run", quiet=True)
    run = result.run_dir
    first, last = (load_checkpoint(run / f"stages/{name}/final.pt") for name in ("00-head", "01-all"))
    assert first.spec.input.pipeline["name"] == "none" and last.spec.input.pipeline["name"] == "equalize"
    assert load_checkpoint(run / "best.pt").spec.input.pipeline["name"] == "equalize"
    assert result.best["stage"] == 1  # the unequalized stage scored other inputs
    assert first.spec.reference != last.spec.reference  # its inputs were not the same images


def test_only_stages_validated_like_the_last_choose_best_pt(tmp_path):
    """best.pt is for the last stage's task and images: a pre-training stage on another task, modality or
    preprocessing scores other answers (tartaglione's pneumonia stage, a CXR stage before CT fine-tuning) and
    must not give it."""
    from types import SimpleNamespace

    from lungscreen.training.run_context import RunContext

    recipe = tiny_recipe(make_manifest(tmp_path / "data", per_class=4))
    recipe["data"]["task"] = "binary"
    recipe["stages"] = [
        {"name": "pneumonia", "data": {"task": "covidx"}},
        {"name": "other-modality", "data": {"modality": "CT"}},
        {"name": "other-pipeline", "data": {"pipeline": "equalize"}},
        {"name": "smaller", "image_size": 32, "data": {"augment": None, "balance": {"method": "none"}}},
        {"name": "binary", "image_size": 64},
    ]
    run = SimpleNamespace(config=from_dict(recipe))
    assert [RunContext.chooses_best(run, i) for i in range(5)] == [False, False, False, True, True]
