"""From a recipe to what a run needs: the process's place in a torchrun job, each stage's rows, the model.

Everything here can fail before the first training step, so :func:`prepare` runs every check up front
(the model zoo, the manifest's columns and splits, batch sizes, pipelines) and raises :class:`ConfigError`
naming the recipe key; the run itself (:mod:`~lungscreen.training.engine`) then only trains.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import lungscreen.lungs  # noqa: F401  (registers the segment_lungs preprocessing step)
from lungscreen.data.labels import Task
from lungscreen.errors import ConfigError, LungscreenError, ManifestError
from lungscreen.preprocessing import Pipeline
from lungscreen.training.config import DataConfig, TrainConfig
from lungscreen.training.distributed import DistEnv
from lungscreen.training.recipe_checks import TaskSpec, resolve_task
from lungscreen.training.run_folder import read_json

REQUIRED_COLUMNS = ("image_path", "label", "patient_id", "source", "split")


# ---------------------------------------------------------------------------------------------------------
# Preparation: every check that can fail before the first step
# ---------------------------------------------------------------------------------------------------------

@dataclass
class StagePlan:
    """The data of one stage: its task, its rows per split and its preprocessing.

    Stages may preprocess differently (a CXR pre-training stage none, the CT stage after it the body crop):
    each stage's checkpoints store the pipeline that stage trained with.
    """

    task: Task
    data: DataConfig
    frames: dict[str, pd.DataFrame]
    pipeline: Pipeline  # resolved: what the stage's checkpoints store in their inference spec
    already_applied: bool = False  # the manifest holds images `lungscreen preprocess` already made


@dataclass
class Prepared:
    """A checked recipe: its stages' data and the starting model."""

    config: TrainConfig
    stages: list[StagePlan]
    model: Any  # the stage-0 model built while checking (reused by a fresh run), or None

    @property
    def sizes(self) -> list[int]:
        return sorted({stage.image_size for stage in self.config.stages})


def manifest_pipeline(manifest: pd.DataFrame, path: str, configured: Any, key: str) -> tuple[Any, bool]:
    """(pipeline, already applied) for a manifest: one written by `lungscreen preprocess` names its pipeline
    in a ``pipeline`` column (and its full dict in ``<name>.pipeline.json`` beside it)."""
    if "pipeline" not in manifest.columns or not (manifest["pipeline"].astype(str) != "").all():
        return configured, False
    names = sorted(set(manifest["pipeline"].astype(str)))
    if len(names) > 1:
        raise ConfigError(f"{key}.manifest: rows preprocessed by different pipelines ({', '.join(names)})")
    name = names[0]
    configured_name = configured.get("name") if isinstance(configured, dict) else configured
    if configured_name not in (None, "none", name):
        raise ConfigError(f"{key}.pipeline: {configured_name!r}, but the manifest {path} was already preprocessed "
                          f"with {name!r}; set {key}.pipeline to {name} or none")
    spec_file = Path(path).with_suffix("").parent / f"{name}.pipeline.json"
    spec = read_json(spec_file) if spec_file.is_file() else name
    return spec, True


def manifest_columns(path: Path) -> list[str]:
    """Column names of a manifest file without loading it (so a missing column is named first)."""
    from lungscreen.data.manifest import manifest_paths

    parquet, csv = manifest_paths(path)
    if path.suffix != ".csv" and parquet.exists():
        import pyarrow.parquet as pq

        return list(pq.read_schema(parquet).names)
    if csv.exists():
        return list(pd.read_csv(csv, nrows=0).columns)
    raise ConfigError(f"data.manifest: no manifest at {path} (looked for {parquet.name} and {csv.name})")


def load_stage_manifest(path: str, key: str, cache: dict[str, pd.DataFrame]) -> pd.DataFrame:
    from lungscreen.data.manifest import check_files, load_manifest

    if path in cache:
        return cache[path]
    columns = manifest_columns(Path(path))
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ConfigError(f"{key}: manifest {path} lacks column(s) {', '.join(missing)} "
                          f"(training needs {', '.join(REQUIRED_COLUMNS)}; build one with `lungscreen data build`)")
    try:
        cache[path] = load_manifest(path)
        check_files(cache[path], path)
    except ManifestError as error:
        raise ConfigError(f"{key}: {error}") from None
    return cache[path]


def stage_views(data: DataConfig) -> tuple[str, ...] | None:
    """The views a stage trains on: the configured ones, or every frontal view for chest X-rays."""
    from lungscreen.data.manifest import FRONTAL_VIEWS

    return tuple(data.views) if data.views else (FRONTAL_VIEWS if data.modality == "CXR" else None)


def task_rows(manifest: pd.DataFrame, task: TaskSpec, *, modality: str, views: tuple[str, ...] | None) -> pd.DataFrame:
    """The rows a task can learn from, with ``target``; a multi-task run keeps every row that at least one
    head has a label for, with ``target/<head>`` (-1 where that head has none)."""
    from lungscreen.data.manifest import for_task

    if isinstance(task, Task):
        return for_task(manifest, task, modality=modality, views=views)
    rows = None
    for name, head in task.items():
        own = for_task(manifest, head, modality=modality, views=views)[["image_path", "target"]]
        own = own.rename(columns={"target": f"target/{name}"})
        rows = own if rows is None else rows.merge(own, on="image_path", how="outer")
    merged = manifest.merge(rows, on="image_path", how="inner")
    heads = [f"target/{name}" for name in task]
    merged[heads] = merged[heads].fillna(-1).astype("int64")
    merged["target"] = 0  # nothing to balance across heads
    return merged.reset_index(drop=True)


def alternation_groups(frame: pd.DataFrame, task: TaskSpec, heads: Sequence[str]) -> np.ndarray:
    """Per training image, the position in ``heads`` of the first head it has a label for (-1: none)."""
    if not isinstance(task, dict) or not heads or any(head not in task for head in heads):
        known = ", ".join(task) if isinstance(task, dict) else "none: the task has one head"
        raise ConfigError(f"data.balance.heads: alternate batches need heads of the multi-task data.task ({known}), "
                          f"got {list(heads)}")
    groups = np.full(len(frame), -1, dtype=np.int64)
    for position, head in reversed(list(enumerate(heads))):
        groups[frame[f"target/{head}"].to_numpy() >= 0] = position
    return groups


def stage_rows(manifest: pd.DataFrame, data: DataConfig, task: TaskSpec, key: str) -> dict[str, pd.DataFrame]:
    rows = task_rows(manifest, task, modality=data.modality, views=stage_views(data))
    if data.sources:
        unknown = sorted(set(data.sources) - set(manifest["source"]))
        if unknown:
            raise ConfigError(f"{key}.sources: {unknown[0]!r} is not a source of the manifest "
                              f"({', '.join(sorted(set(manifest['source'])))})")
        rows = rows[rows["source"].isin(data.sources)].reset_index(drop=True)
    frames = {}
    for split in (data.train_split, data.val_split, data.test_split):
        frames[split] = rows[rows["split"] == split].reset_index(drop=True)
    for split in (data.train_split, data.val_split):
        if frames[split].empty:
            raise ConfigError(f"{key}.manifest: no {split!r} rows for task {task_name(task)} ({data.modality}); "
                              "the manifest needs a split column with train and val images")
    return frames


def task_name(task: TaskSpec) -> str:
    return task.name if isinstance(task, Task) else "+".join(f"{n}:{t.name}" for n, t in task.items())


def task_kind(task: TaskSpec) -> str:
    return task.kind if isinstance(task, Task) else "multitask"


def check_model_task(name: str, model_task: str, task: TaskSpec, key: str) -> None:
    """Refuse a model that cannot learn the recipe's task (a classifier on masks, a U-Net on labels)."""
    kind = task_kind(task)
    fits = {"classification": ("multiclass", "multilabel"), "multilabel": ("multiclass", "multilabel"),
            "segmentation": ("segmentation",), "multitask": ("multitask",)}
    if kind not in fits.get(model_task, ()):
        raise ConfigError(f"{key}: model {name} is a {model_task} model; it cannot learn the {kind} task "
                          f"{task_name(task)} ({model_task} models learn {' or '.join(fits.get(model_task, ()))} tasks)")


def prepare(config: TrainConfig, *, env: DistEnv = DistEnv(), build_model: bool = True) -> Prepared:
    """Check a recipe against the model zoo and the manifest; raise :class:`ConfigError` naming the key."""
    from lungscreen import models
    from lungscreen.training.augment import build_augment
    from lungscreen.training.optim import layer_groups, selected_groups

    name = config.model.name
    if name not in models.list_models():
        import difflib

        close = difflib.get_close_matches(name, models.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(models.list_models())}"
        raise ConfigError(f"model.name: unknown model {name!r}; {hint}")
    info = models.model_info(name)
    for index in range(len(config.stages)):
        check_model_task(name, info.task, resolve_task(config.stage_data(index).task, "data.task"), "data.task")
    # The built model knows its own minimum (architecture options such as conv8's padding change it).
    model = build_initial_model(config, resolve_task(config.stage_data(0).task, "data.task")) if build_model else None
    minimum = int(getattr(model, "min_input_size", info.min_input_size))
    for index, stage in enumerate(config.stages):
        if stage.image_size < minimum:
            options = f" with options {config.model.options}" if config.model.options else ""
            raise ConfigError(f"stages.{index}.image_size: {stage.image_size} is below the minimum input size "
                              f"{minimum} of model {name}{options}")
    if config.data.batch_size % env.world_size:
        raise ConfigError(f"data.batch_size: the global batch {config.data.batch_size} does not divide by "
                          f"{env.world_size} processes")
    for index, stage in enumerate(config.stages):
        if stage.init_from:
            checkpoint_of(stage.init_from, f"stages.{index}.init_from")
    manifests: dict[str, pd.DataFrame] = {}
    resolved: dict[str, Pipeline] = {}
    plans = []
    for index, stage in enumerate(config.stages):
        data = config.stage_data(index)
        key = f"stages.{index}.data" if stage.data else "data"
        if not data.manifest:
            raise ConfigError("data.manifest: no manifest given (set data.manifest or pass --manifest)")
        task = resolve_task(data.task, f"{key}.task")
        manifest = load_stage_manifest(data.manifest, f"{key}.manifest", manifests)
        if stage.objective == "simclr":
            from lungscreen.training.contrastive import unlabelled_rows

            frames = unlabelled_rows(manifest, data, stage_views(data))
            if frames[data.train_split].empty or frames[data.val_split].empty:
                raise ConfigError(f"{key}.manifest: no {data.modality} images outside the test split, or none in "
                                  f"the {data.val_split!r} split, for the self-supervised stage {stage.name!r}")
        else:
            frames = stage_rows(manifest, data, task, key)
        build_augment(data.augment, f"{key}.augment")
        pipeline, already = manifest_pipeline(manifest, data.manifest, data.pipeline, key)
        pipeline = resolved_once(pipeline, f"{key}.pipeline", resolved)
        if data.balance.method not in ("none", "alternate") and not isinstance(task, Task):
            raise ConfigError(f"{key}.balance: a multi-task run has no single class to balance; use method none "
                              "(or alternate, batches from one head's data at a time)")
        if data.balance.method == "alternate":
            alternation_groups(frames[data.train_split], task, data.balance.heads)
        if data.balance.method == "source_label" and stage.objective == "supervised":
            from lungscreen.training.sampling import source_label_weights

            train = frames[data.train_split]
            try:
                source_label_weights(train["target"], train["source"].astype(str), data.balance.partial_sources,
                                     data.balance.partial_share, data.balance.source_weights)
            except ValueError as error:
                raise ConfigError(f"{key}.balance: {error}") from None
        if data.balance.method == "covid_percent" and stage.objective == "supervised":
            positive = task.classes.index(data.balance.positive_class)
            if not (frames[data.train_split]["target"] == positive).any():
                raise ConfigError(f"{key}.balance: covid_percent needs {data.balance.positive_class} images in the "
                                  "training split")
        plans.append(StagePlan(task, data, frames, pipeline, already))
    if model is not None:
        groups = len(layer_groups(model))
        for index, stage in enumerate(config.stages):
            selected_groups(stage.train, groups, f"stages.{index}.train")
    return Prepared(config, plans, model)


def pipeline_of(spec: Any, key: str = "data.pipeline") -> Pipeline:
    """The preprocessing pipeline named or described by ``spec`` (None means ``none``)."""
    from lungscreen import preprocessing

    try:
        return preprocessing.load_pipeline("none" if spec is None else spec)
    except LungscreenError as error:
        raise ConfigError(f"{key}: {error}") from None


def resolved_once(spec: Any, key: str, resolved: dict[str, Pipeline]) -> Pipeline:
    """:func:`resolved_pipeline`, once per distinct spec of a run (resolving may hash a segmenter's file)."""
    text = json.dumps(spec, sort_keys=True, default=str)
    if text not in resolved:
        resolved[text] = resolved_pipeline(spec, key)
    return resolved[text]


def resolved_pipeline(spec: Any, key: str) -> Pipeline:
    """The run's pipeline with its run-time choices fixed (which lung segmenter, the model file's hash):
    what the checkpoint's inference spec stores."""
    try:
        return pipeline_of(spec, key).resolved()
    except LungscreenError as error:
        raise ConfigError(f"{key}: {error}") from None


def checkpoint_of(path: str, key: str) -> Path:
    """A run folder's best.pt, or the checkpoint file itself; :class:`ConfigError` naming ``key`` otherwise."""
    from lungscreen.models import resolve_checkpoint

    return resolve_checkpoint(path, key)


def head_sizes(task: TaskSpec) -> int | dict[str, int]:
    """``num_classes`` of a model for ``task``: one count, or head name -> count for a multi-task model."""
    return len(task.classes) if isinstance(task, Task) else {name: len(t.classes) for name, t in task.items()}


def head_classes(task: TaskSpec) -> Any:
    """What a model for ``task`` predicts: its class names, or head name -> class names."""
    return tuple(task.classes) if isinstance(task, Task) else {name: tuple(t.classes) for name, t in task.items()}


def build_initial_model(config: TrainConfig, task: Task):  # noqa: ANN201
    """The model a run starts from: fresh, ImageNet, a weights file, or another run's checkpoint."""
    import torch

    from lungscreen import models

    torch.manual_seed(config.seed)  # the same recipe and seed start from the same weights
    spec = config.model
    weights, reset = spec.weights, spec.reset_head
    if spec.init_from:
        weights = str(checkpoint_of(spec.init_from, "model.init_from"))
        reset = reset or checkpoint_classes(weights) != head_classes(task)
    try:
        return models.create(spec.name, num_classes=head_sizes(task), in_channels=spec.in_channels,
                             pretrained=spec.pretrained, weights=weights, reset_head=reset, **spec.options)
    except LungscreenError as error:
        key = "model.pretrained" if spec.pretrained else "model.init_from" if spec.init_from else \
            "model.weights" if spec.weights else "model.options" if "option" in str(error) else "model"
        raise ConfigError(f"{key}: {error}") from None


def checkpoint_classes(path: str) -> Any:
    """What the checkpoint's model predicts (as :func:`head_classes`), or None for a plain weights file."""
    from lungscreen.models import read_checkpoint
    from lungscreen.models.weights import read_weights_file

    _, meta = read_weights_file(path)
    if meta is None:
        return None
    _, spec, _ = read_checkpoint(path)
    if len(spec.heads) == 1 and spec.heads[0].name == "output":
        return tuple(spec.heads[0].classes)
    return {head.name: tuple(head.classes) for head in spec.heads}


def swap_head(model, spec, task: TaskSpec, *, current: Any, reset: bool, seed: int = 0):  # noqa: ANN001, ANN201
    """The same network with a fresh head for ``task`` when its classes differ from ``current`` (what the
    model predicts now) or when ``reset`` asks for one; the model itself otherwise."""
    from lungscreen import models
    from lungscreen.models.weights import merge_state

    wanted = head_classes(task)
    if not reset and current == wanted:
        return model
    import torch

    torch.manual_seed(seed)
    fresh = models.create(spec.name, num_classes=head_sizes(task), in_channels=spec.in_channels, **spec.options)
    # a multi-task model gaining or losing heads keeps its classifier when that head's classes stay
    kept = isinstance(current, dict) and isinstance(wanted, dict) and all(
        current.get(name, classes) == classes for name, classes in wanted.items())
    merge_state(fresh, model.state_dict(), source="the previous stage", reset_head=reset or not kept)
    return fresh
