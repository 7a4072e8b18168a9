"""Every stage of a multi-stage recipe validates on its own rows with its own task's targets.

The shipped multi-stage recipes run on a small manifest (chest X-ray phantoms and synthetic CT slices);
a callback records what each validation's figures were computed from (``TrainModule.last_kept``). Per
stage, the validation labels as the metrics saw them must count exactly what the manifest's validation
rows say for that stage's task, and the monitored figure must be recomputable from the stage's own
predictions (sklearn, not the metrics module). A stage after a self-supervised one once validated on the
placeholder targets of the stage before it (every image "non-COVID"), and chose best.pt on that.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from lungscreen.data.labels import Task, get_task
from lungscreen.data.manifest import for_task, load_manifest, save_manifest
from lungscreen.errors import ConfigError
from lungscreen.training.config import from_dict, load_config, to_raw
from lungscreen.training.engine import train
from lungscreen.training.recipe_checks import resolve_task
from lungscreen.training.stage import check_validation_classes
from training_fixtures import make_manifest, make_phantom_manifest, tiny_recipe

pytestmark = pytest.mark.slow


class ValidationRecorder(L.Callback):
    """Keeps, per stage, what the last validation epoch's figures were computed from."""

    def __init__(self) -> None:
        self.stages: list[dict] = []

    def on_fit_start(self, trainer, module) -> None:  # noqa: ANN001
        self.stages.append({"stage": module.stage_index, "name": module.stage.name, "kept": None, "figures": None})

    def on_validation_end(self, trainer, module) -> None:  # noqa: ANN001
        if not trainer.sanity_checking and module.last_validation:
            self.stages[-1].update(kept=dict(module.last_kept), figures=dict(module.last_validation))


@pytest.fixture(scope="module")
def mixed_manifest(tmp_path_factory) -> Path:
    """Chest X-ray phantoms (with masks and boxes) and synthetic CT slices in one manifest."""
    root = tmp_path_factory.mktemp("mixed")
    cxr = load_manifest(make_phantom_manifest(root / "cxr", per_label=8, size=64))
    ct = load_manifest(make_manifest(root / "ct", per_class=10, size=48, modality="CT"))
    ct["source"] = "ct-synth"
    parquet, _ = save_manifest(pd.concat([cxr, ct], ignore_index=True), root / "manifest")
    return parquet


def run_recipe(raw: dict, out: Path) -> tuple[ValidationRecorder, object]:
    recorder = ValidationRecorder()
    result = train(from_dict(raw), out=out, extra_callbacks=[recorder], quiet=True)
    return recorder, result


def shipped(name: str, manifest: Path, sizes: dict[int, int], **data: object) -> dict:
    """A shipped recipe on the small manifest: every stage one epoch at a small size."""
    overrides = [f"data.manifest={manifest}", "data.num_workers=0", "threads=1", "precision=32",
                 "data.batch_size=8"]
    raw = to_raw(load_config(name, overrides))
    raw["data"].update(data)
    for index, stage in enumerate(raw["stages"]):
        stage.update(epochs=1, image_size=sizes.get(index, 48))
    return raw


def expected_counts(manifest: Path, raw: dict, index: int) -> dict[str, np.ndarray]:
    """Per classification head of stage ``index``: the validation rows' class counts, from the manifest."""
    stage = raw["stages"][index]
    data = {**raw["data"], **(stage.get("data") or {})}
    frame = load_manifest(manifest)
    if data.get("sources"):
        frame = frame[frame["source"].isin(data["sources"])]
    frame = frame[frame["split"] == data.get("val_split", "val")]
    counts = {}
    for head, task in stage_heads(data).items():
        if task.kind not in ("multiclass", "multilabel"):
            continue
        rows = for_task(frame, task, modality=data.get("modality", "CXR"))
        if task.kind == "multiclass":
            counts[head] = np.bincount(rows["target"], minlength=len(task.classes))
        else:
            counts[head] = np.sum([task.multi_hot(t) for t in rows["target"]], axis=0)
    return counts


def stage_heads(data: dict) -> dict[str, Task]:
    """The stage's task per head ("" for a single-head model)."""
    task = resolve_task(data["task"], "data.task")
    return task if isinstance(task, dict) else {"": task}


def seen_counts(kept: dict[str, np.ndarray], head: str, classes: int, kind: str) -> np.ndarray:
    labels = kept[f"{head}/labels" if head else "labels"]
    return np.bincount(labels, minlength=classes) if kind == "multiclass" else labels.sum(axis=0)


def recomputed(metric: str, kept: dict[str, np.ndarray]) -> float:
    """The monitored figure from the kept predictions, by sklearn."""
    head, _, name = metric.removeprefix("val/").rpartition("/") if "findings/" in metric else ("", "", metric[4:])
    prefix = f"{head}/" if head else ""
    probs, labels = kept[f"{prefix}probs"], kept[f"{prefix}labels"]
    if name == "accuracy":
        return accuracy_score(labels, probs.argmax(1))
    if name == "balanced_accuracy":
        return balanced_accuracy_score(labels, probs.argmax(1))
    if name == "macro_auc":
        aucs = [roc_auc_score(labels[:, i], probs[:, i]) for i in range(labels.shape[1]) if len(set(labels[:, i])) == 2]
        return float(np.mean(aucs))
    raise AssertionError(f"no recomputation for {metric}")


def check_every_stage(recorder: ValidationRecorder, raw: dict, manifest: Path, run_dir: Path) -> None:
    metric = raw.get("monitor", {}).get("metric", "val/loss")
    history = pd.read_csv(run_dir / "metrics.csv")
    assert [s["stage"] for s in recorder.stages] == list(range(len(raw["stages"])))
    for index, seen in enumerate(recorder.stages):
        stage = raw["stages"][index]
        if stage.get("objective", "supervised") != "supervised":
            continue
        heads = stage_heads({**raw["data"], **(stage.get("data") or {})})
        for head, wanted in expected_counts(manifest, raw, index).items():
            task = heads[head]
            got = seen_counts(seen["kept"], head, len(task.classes), task.kind)
            assert got.tolist() == wanted.tolist(), f"stage {index} ({seen['name']}) head {head or 'output'}"
        if metric in seen["figures"] and not metric.endswith("loss"):
            again = recomputed(metric, seen["kept"])
            assert seen["figures"][metric] == pytest.approx(again, abs=1e-9)
            logged = history[history["stage"] == index][metric].iloc[-1]
            assert logged == pytest.approx(again, abs=1e-9)


@pytest.mark.parametrize("name", ["ct-resnet-cpu", "light-ct-simclr-cpu"])
def test_a_stage_after_self_supervised_pretraining_validates_on_its_labels(name, mixed_manifest, tmp_path):
    raw = shipped(name, mixed_manifest, {}, sources=["ct-synth"])
    raw["stages"][0].setdefault("data", {})["sources"] = None
    recorder, result = run_recipe(raw, tmp_path / "run")
    check_every_stage(recorder, raw, mixed_manifest, result.run_dir)
    counts = expected_counts(mixed_manifest, raw, 1)[""]
    assert (counts > 0).all()  # both classes in the fine-tuning stage's validation
    assert result.best["stage"] == 1


def test_a_chest_xray_stage_before_the_ct_stages(mixed_manifest, tmp_path):
    raw = shipped("ct-resnet-cpu", mixed_manifest, {}, sources=["ct-synth"])
    raw["stages"][0].setdefault("data", {})["sources"] = None
    cxr = {**raw["stages"][-1], "name": "cxr", "data": {"modality": "CXR", "sources": ["phantoms"],
                                                        "augment": None, "pipeline": "none"}}
    raw["stages"].insert(0, cxr)
    recorder, result = run_recipe(raw, tmp_path / "run")
    check_every_stage(recorder, raw, mixed_manifest, result.run_dir)
    assert result.best["stage"] == 2


def test_multichexnet_stages_validate_on_their_own_heads(mixed_manifest, tmp_path):
    raw = shipped("multichexnet-cpu", mixed_manifest, {i: 64 for i in range(4)})
    raw["model"].setdefault("options", {})["head_width"] = 8
    recorder, result = run_recipe(raw, tmp_path / "run")
    check_every_stage(recorder, raw, mixed_manifest, result.run_dir)


def test_tartaglione_pretraining_then_covid(mixed_manifest, tmp_path):
    raw = shipped("tartaglione", mixed_manifest, {0: 48, 1: 48}, pipeline="none", sources=["phantoms"])
    raw["model"] = {"name": "resnet18", "options": {"width": 8}}
    recorder, result = run_recipe(raw, tmp_path / "run")
    check_every_stage(recorder, raw, mixed_manifest, result.run_dir)


def test_a_validation_split_of_one_class_stops_the_stage_with_its_counts(tmp_path):
    task = get_task("binary")
    with pytest.raises(ConfigError, match=r"stages\.1 \(train\): its 'val' images hold non-COVID 12, COVID-19 0"):
        check_validation_classes(1, "train", task, np.zeros(12, np.int64), "val")
    check_validation_classes(1, "train", task, np.array([0, 1]), "val")  # two classes: fine

    manifest = make_manifest(tmp_path / "data", per_class=6)
    frame = load_manifest(manifest)
    frame.loc[(frame["split"] == "val") & (frame["label"] != "normal"), "split"] = "train"
    save_manifest(frame, tmp_path / "data" / "manifest")
    with pytest.raises(ConfigError, match=r"stages\.0 \(head\): its 'val' images hold normal \d+, pneumonia 0, "
                                          r"COVID-19 0"):
        train(from_dict(tiny_recipe(manifest)), out=tmp_path / "run", quiet=True)
