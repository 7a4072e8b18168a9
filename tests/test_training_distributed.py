"""`lungscreen train` under torchrun: two gloo processes on the CPU match one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from training_fixtures import make_manifest, tiny_recipe, write_recipe


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tmp_path):
    manifest = make_manifest(tmp_path / "data", per_class=12)
    recipe = tiny_recipe(manifest)
    # No BatchNorm (SyncBatchNorm does not run on the CPU) and no dropout: then the data-parallel
    # gradient, averaged over the two halves of each global batch, is the one-process gradient.
    recipe["model"] = {"name": "squeezenet1_1", "options": {"dropout": 0.0}}
    recipe["stages"] = [{"name": "all", "epochs": 2, "image_size": 32, "train": "all",
                         "optimizer": {"lr": 1e-3}, "schedule": {"name": "step", "step_epochs": 1, "factor": 0.5}}]
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    single = subprocess.run([sys.executable, "-m", "lungscreen", "train", str(path), "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "lungscreen", "train", str(path), "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    one = torch.load(tmp_path / "one/stages/00-all/final.pt", weights_only=True)["state_dict"]
    two = torch.load(tmp_path / "two/stages/00-all/final.pt", weights_only=True)["state_dict"]
    initial_gap = 0.0
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-3, atol=1e-5), name
        initial_gap = max(initial_gap, float((one[name] - two[name]).abs().max()))
    history_one = pd.read_csv(tmp_path / "one/metrics.csv")
    history_two = pd.read_csv(tmp_path / "two/metrics.csv")
    assert len(history_two) == 2  # only rank 0 wrote
    assert history_two["val/loss"].tolist() == pytest.approx(history_one["val/loss"].tolist(), rel=1e-3)
    assert "rank 0/2" in (tmp_path / "two/log.txt").read_text()
