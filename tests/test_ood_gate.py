"""The out-of-distribution gate refuses what a model was not made for, and leaves its own kind of image alone.

Unit: the limits are set on validation within the target, far embeddings are refused, each reason names its
check. End to end: a small run gets a gate at the end of training, predict answers "not screened: ..."
for the out-of-scope set and scores its own test images, --force scores with the reason in the note, the
viewer's screening raises OutOfScope, an ONNX export carries the embedding the gate reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lungscreen.data.manifest import load_manifest
from lungscreen.data.out_of_scope import kind_of, write_out_of_scope
from lungscreen.errors import OutOfScope
from lungscreen.inference.gate import feature_distances, fit_gate, refusals
from lungscreen.inference.predict import Predictor, predict_paths
from lungscreen.io.images import read_image
from training_fixtures import make_manifest, tiny_recipe


@pytest.fixture(scope="session")
def shared_data_or_none() -> Path | None:
    """The public images when present (the CT slice and the lateral film join the set), else None."""
    from conftest import SHARED_DATA

    return SHARED_DATA if (SHARED_DATA / "README.md").is_file() else None


def test_the_limits_refuse_at_most_the_target_of_validation_and_far_embeddings_always():
    rng = np.random.default_rng(0)
    train, val = rng.normal(size=(400, 16)), rng.normal(size=(200, 16))
    gate = fit_gate(train, val, rng.random(200) * 0.5, [None] * 200, target=0.05)
    assert gate.rejected_on_validation <= 0.05
    assert np.median(feature_distances(gate, val)) == pytest.approx(1.0, abs=0.25)  # about 1 in distribution
    far = rng.normal(size=(20, 16)) * 6 + 3
    reasons = refusals(gate, far, [0.1] * 20, [None] * 20)
    assert all("features lie" in reason for reason in reasons)
    inside = int(np.argmin(feature_distances(gate, val)))
    shifted = refusals(gate, val[[inside, inside]], [50.0, 0.1], [None] * 2)
    assert "grey levels" in shifted[0] and shifted[1] == ""


def test_lung_statistics_outside_the_validation_range_are_refused():
    rng = np.random.default_rng(1)
    lungs = [{"lung_share": s, "span_share": 0.6, "balance": 0.8} for s in rng.uniform(0.3, 0.5, 100)]
    gate = fit_gate(rng.normal(size=(100, 8)), rng.normal(size=(100, 8)), [0.1] * 100, lungs)
    assert gate.lung_ranges["lung_share"][0] >= 0.29
    one_lung = {"lung_share": 0.4, "span_share": 0.6, "balance": 0.0}
    assert "lungs look unlike" in refusals(gate, np.zeros((1, 8)), [0.1], [one_lung])[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    from lungscreen.training.config import from_dict
    from lungscreen.training.engine import train

    root = tmp_path_factory.mktemp("gate")
    manifest = make_manifest(root / "data", per_class=30, size=64)
    recipe = tiny_recipe(manifest, model={"name": "resnet18", "options": {"width": 8}})
    recipe["stages"] = [{"name": "all", "epochs": 4, "image_size": 64, "train": "all",
                         "optimizer": {"name": "adam", "lr": 3e-3}}]
    return train(from_dict(recipe), out=root / "run", quiet=True).run_dir, manifest


def test_training_fits_the_gate_and_predict_refuses_what_is_out_of_scope(run, tmp_path, shared_data_or_none):
    folder, manifest = run
    predictor = Predictor(folder)
    gate = predictor.spec.gate
    assert gate is not None and gate.rejected_on_validation <= 0.03
    summary = pd.read_json(folder / "summary.json", typ="series")
    assert summary["ood_gate"]["validation_images"] == gate.validation_images
    outside = write_out_of_scope(tmp_path / "oos", shared=shared_data_or_none)
    table = predict_paths(predictor, [tmp_path / "oos"])
    assert len(table) == len(outside)
    assert table["error"].str.len().gt(0).all(), table[["path", "error"]]
    assert table["prediction"].eq("").all() and table["COVID-19"].isna().all()
    refused_by_gate = table[table["error"].str.startswith("not screened:")]
    assert len(refused_by_gate) >= len(outside) - 1  # the blank film is refused earlier, as blank
    own = load_manifest(manifest)
    test = predict_paths(predictor, own.loc[own["split"] == "test", "image_path"].tolist())
    assert (test["error"] != "").mean() <= 0.25  # 12 test images of a model trained for seconds


def test_force_scores_beyond_the_gate_and_says_so(run, tmp_path):
    folder, _ = run
    paths = write_out_of_scope(tmp_path / "oos")
    noise = next(p for p in paths if kind_of(p) == "uniform-noise")
    table = predict_paths(Predictor(folder, force=True), [noise])
    assert table.loc[0, "error"] == "" and not np.isnan(table.loc[0, "COVID-19"])
    assert "beyond the OOD gate" in table.loc[0, "note"] and bool(table.loc[0, "ood"])


def test_the_screening_raises_out_of_scope(run, tmp_path):
    from lungscreen.audit.screening import screen_image

    folder, _ = run
    noise = next(p for p in write_out_of_scope(tmp_path / "oos") if kind_of(p) == "gaussian-noise")
    with pytest.raises(OutOfScope, match="^not screened: "):
        screen_image(Predictor(folder), read_image(noise), explain=False)


def test_an_onnx_export_carries_the_embedding_the_gate_reads(run, tmp_path):
    from lungscreen.inference.export import export_run

    folder, manifest = run
    export_run(folder, tmp_path / "model.onnx")
    exported, original = Predictor(tmp_path / "model.onnx"), Predictor(folder)
    assert exported.spec.gate == original.spec.gate
    oos = write_out_of_scope(tmp_path / "oos")
    own = load_manifest(manifest)
    inputs = [*oos, *own.loc[own["split"] == "test", "image_path"].tolist()]
    a, b = predict_paths(exported, inputs), predict_paths(original, inputs)
    assert (a["error"] != "").tolist() == (b["error"] != "").tolist()
