"""`lungscreen tune`: Optuna search over the recipe's ranges, killed with SIGKILL and resumed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState
from training_fixtures import make_manifest, tiny_recipe, write_recipe


@pytest.mark.slow
def test_tune_killed_and_resumed_ends_with_six_trials(tmp_path):
    manifest = make_manifest(tmp_path / "data", per_class=8)
    recipe = tiny_recipe(manifest)
    recipe["model"] = {"name": "squeezenet1_1"}
    recipe["data"]["augment"] = None
    recipe["stages"] = [{"name": "all", "epochs": 2, "image_size": 24, "train": "all",
                         "optimizer": {"name": "sgd", "lr": 0.01}}]
    recipe["monitor"] = {"metric": "val/accuracy"}
    recipe["tune"] = {"trials": 6, "startup_trials": 2, "heartbeat_seconds": 1}  # default space: lr, momentum, L2
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = tmp_path / "search"
    command = [sys.executable, "-m", "lungscreen", "tune", str(path), "--trials", "6", "--out", str(out)]
    storage = f"sqlite:///{out / 'study.db'}"

    def finished() -> int:
        try:
            study = optuna.load_study(study_name="tiny", storage=storage)
        except Exception:  # noqa: BLE001 - the database is not created yet
            return 0
        return len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while finished() < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert 2 <= finished() < 6

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert finished() == 6
    study = optuna.load_study(study_name="tiny", storage=storage)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete and {"optimizer.lr", "optimizer.momentum", "optimizer.weight_decay"} <= set(complete[0].params)
    for name in ("trials.csv", "trials.png", "best.yaml"):
        assert (out / name).is_file(), name
    assert "trials" in resumed.stdout
    trial_runs = sorted(out.glob("trial-*"))
    assert trial_runs and not any((run / "test.json").exists() for run in trial_runs)  # chosen on validation only
