"""Self-supervised pre-training as a stage: two seeded views, a backbone checkpoint another run starts from."""

from __future__ import annotations

import math

import pytest
import torch

from lungscreen.data.labels import TASKS
from lungscreen.data.manifest import load_manifest
from lungscreen.models import load_checkpoint
from lungscreen.training.config import from_dict
from lungscreen.training.engine import train
from lungscreen.training.sampling import SampleKey
from training_fixtures import make_phantom_manifest


def pretrain_recipe(manifest, **stage) -> dict:
    return {"name": "simclr-phantoms", "seed": 0, "threads": 1, "precision": "32", "test": True,
            "data": {"manifest": str(manifest), "task": "binary", "batch_size": 8, "eval_batch_size": 16},
            "model": {"name": "resnet18", "options": {"width": 8}},
            "monitor": {"metric": "val/loss", "mode": "min"},
            "stages": [{"name": "simclr", "objective": "simclr", "epochs": 2, "image_size": 48, "train": "all",
                        "optimizer": {"name": "adamw", "lr": 1e-3}, **stage}]}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_phantom_manifest(tmp_path_factory.mktemp("phantoms"), per_label=6)


@pytest.fixture(scope="module")
def pretrained(phantoms, tmp_path_factory):
    return train(from_dict(pretrain_recipe(phantoms)), out=tmp_path_factory.mktemp("runs") / "simclr", quiet=True)


def test_pretraining_learns_from_every_image_but_the_test_split(pretrained, phantoms):
    manifest = load_manifest(phantoms)
    trained_on = pretrained.summary["stages"][0]["train_images"]
    assert trained_on == int((manifest["split"] != "test").sum())  # labels unused, test never seen
    history = pretrained.history
    assert len(history) == 2 and history[["train/loss", "val/loss"]].map(math.isfinite).all().all()
    assert "test" not in pretrained.summary or pretrained.summary["test"] is None  # nothing to test without labels


def test_the_checkpoint_is_the_backbone_and_another_run_starts_from_it(pretrained, phantoms, tmp_path):
    checkpoint = load_checkpoint(pretrained.run_dir / "best.pt")
    assert type(checkpoint.model).__name__ == "ResNet"  # the projection head is gone
    recipe = pretrain_recipe(phantoms)
    recipe.update(monitor={"metric": "val/loss", "mode": "min"},
                  model={"name": "resnet18", "options": {"width": 8}, "init_from": str(pretrained.run_dir)})
    recipe["stages"] = [{"name": "fine-tune", "epochs": 1, "image_size": 48, "train": "all"}]
    from lungscreen.training.prepare import build_initial_model, prepare

    prepared = prepare(from_dict(recipe))
    start = build_initial_model(prepared.config, prepared.stages[0].task)
    for key, value in checkpoint.model.state_dict().items():
        if key.startswith("body."):
            assert torch.equal(start.state_dict()[key], value), key
    result = train(from_dict(recipe), out=tmp_path / "fine", quiet=True)
    assert "auc/COVID-19" in result.summary["test"]["figures"]


def test_two_views_are_seeded_and_differ(phantoms):
    from lungscreen.models.inference_spec import InputSpec
    from lungscreen.preprocessing import get_pipeline
    from lungscreen.training.config import DataConfig
    from lungscreen.training.contrastive import TwoViewDataset, unlabelled_rows
    from lungscreen.training.data import ImageStore

    data = DataConfig(manifest=str(phantoms))
    rows = unlabelled_rows(load_manifest(phantoms), data, None)["train"]
    store = ImageStore(rows, get_pipeline("none"), [48])
    store.load_all()
    spec = InputSpec(size=48, channels=1, pipeline={"name": "none", "steps": []})
    dataset = TwoViewDataset(store, 48, spec, TASKS["binary"])
    first, again, other = dataset[SampleKey(0, 5)]["image"], dataset[SampleKey(0, 5)]["image"], dataset[SampleKey(0, 6)]["image"]
    assert first.shape == (2, 1, 48, 48)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])


def test_the_range_test_is_refused_without_labels(phantoms, tmp_path):
    from lungscreen.errors import ConfigError

    recipe = pretrain_recipe(phantoms, optimizer={"lr": "find"})
    with pytest.raises(ConfigError, match="LR range test needs labels"):
        train(from_dict(recipe), out=tmp_path / "x", quiet=True)


def test_a_killed_pretraining_resumes_and_hands_over_the_same_backbone(phantoms, tmp_path):
    """kill -9 inside the self-supervised stage; the resumed run's fine-tuned weights equal an uninterrupted
    run's (the two views are drawn from each item's seed, so the replay is exact)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import pandas as pd

    from training_fixtures import write_recipe

    recipe = pretrain_recipe(phantoms, epochs=3)
    recipe["monitor"] = {"metric": "val/loss", "mode": "min"}
    recipe["stages"].append({"name": "fine-tune", "epochs": 1, "image_size": 48, "train": "all"})
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    command = [sys.executable, "-m", "lungscreen", "train"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    victim = tmp_path / "victim"
    process = subprocess.Popen([*command, str(path), "--out", str(victim)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    metrics, deadline = victim / "metrics.csv", time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(pd.read_csv(metrics)) >= 1:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert not (victim / "stages/00-simclr/done.json").exists()
    resumed = subprocess.run([*command, "--resume", str(victim)], env=env, capture_output=True, text=True, timeout=300,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = subprocess.run([*command, str(path), "--out", str(tmp_path / "reference")], env=env,
                               capture_output=True, text=True, timeout=300, check=False)
    assert reference.returncode == 0, reference.stderr[-3000:]
    ours, theirs = (torch.load(run / "stages/01-fine-tune/final.pt", weights_only=True)["state_dict"]
                    for run in (victim, tmp_path / "reference"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    backbone = torch.load(victim / "stages/00-simclr/final.pt", weights_only=True)["state_dict"]
    assert not any(key.startswith("projection") for key in backbone)  # the stage hands over the backbone alone
