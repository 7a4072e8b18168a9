"""Runs: a recipe trained stage by stage into a run folder, resumable, in one process or under torchrun.

A run folder holds::

    config.yaml          the recipe as resolved (overrides applied, manifest path absolute)
    log.txt              everything the run printed
    metrics.csv          one row per epoch: stage, epoch, learning rates, train loss, every val/ figure,
                         seconds and images/s
    stages/NN-name/      last.ckpt (Lightning, for --resume), final.pt, done.json, lr_find.png/.json,
                         precision.json
    best.pt              the best epoch by ``monitor`` (lungscreen checkpoint: model, classes, preprocessing)
    best.json            which epoch that was, and its figures
    test.json            best.pt on the test split: every figure with a 95 % patient-level bootstrap interval
    summary.json         wall time, images/s per stage, best validation and test figures

Exact resume: a stage checkpoints at the end of every epoch; ``--resume RUN`` skips finished stages and
restarts the interrupted one from its last epoch. Batch order and augmentation are functions of the seed
and the epoch (:mod:`~lungscreen.training.sampling`), and the per-step RNG of ``(seed, step)``
(:mod:`~lungscreen.training.module`), so the resumed run ends with the same weights as an uninterrupted
one (on CPU, with the same thread count).

Distributed: under ``torchrun --nproc_per_node N`` the same command trains data-parallel (gloo on CPU,
nccl on GPU). ``data.batch_size`` is the global batch, split over the processes; the sampler gives each
process its part of every global batch, so the balancing holds; validation runs in full on every process
(the sets are small) so all take the same early-stopping decision; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from lungscreen.data.labels import Task
from lungscreen.errors import ConfigError, LungscreenError, ManifestError
from lungscreen.io.files import write_atomic
from lungscreen.training.config import DataConfig, TrainConfig, from_dict, resolve_task, to_raw

REQUIRED_COLUMNS = ("image_path", "label", "patient_id", "source", "split")


# ---------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls) -> DistEnv:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


# ---------------------------------------------------------------------------------------------------------
# Preparation: every check that can fail before the first step
# ---------------------------------------------------------------------------------------------------------

@dataclass
class StagePlan:
    """The data of one stage: its task and its rows per split."""

    task: Task
    data: DataConfig
    frames: dict[str, pd.DataFrame]


@dataclass
class Prepared:
    config: TrainConfig
    stages: list[StagePlan]
    base_size: int
    model: Any = None  # the stage-0 model built while checking (reused by a fresh run)
    pipeline: Any = "none"  # the preprocessing of the run (name or dict)
    already_applied: bool = False  # the manifest holds images `lungscreen preprocess` already made


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
    from lungscreen.data.manifest import load_manifest

    if path in cache:
        return cache[path]
    columns = manifest_columns(Path(path))
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ConfigError(f"{key}: manifest {path} lacks column(s) {', '.join(missing)} "
                          f"(training needs {', '.join(REQUIRED_COLUMNS)}; build one with `lungscreen data build`)")
    try:
        cache[path] = load_manifest(path)
    except ManifestError as error:
        raise ConfigError(f"{key}: {error}") from None
    return cache[path]


def stage_rows(manifest: pd.DataFrame, data: DataConfig, task: Task, key: str) -> dict[str, pd.DataFrame]:
    from lungscreen.data.manifest import FRONTAL_VIEWS, for_task

    views = tuple(data.views) if data.views else (FRONTAL_VIEWS if data.modality == "CXR" else None)
    rows = for_task(manifest, task, modality=data.modality, views=views)
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
            raise ConfigError(f"{key}.manifest: no {split!r} rows for task {task.name} ({data.modality}); "
                              "the manifest needs a split column with train and val images")
    return frames


def prepare(config: TrainConfig, *, env: DistEnv = DistEnv(), build_model: bool = True) -> Prepared:
    """Check a recipe against the model zoo and the manifest; raise :class:`ConfigError` naming the key."""
    from lungscreen import models
    from lungscreen.training.data import build_augment, load_pipeline
    from lungscreen.training.optim import selected_groups

    name = config.model.name
    if name not in models.list_models():
        import difflib

        close = difflib.get_close_matches(name, models.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(models.list_models())}"
        raise ConfigError(f"model.name: unknown model {name!r}; {hint}")
    info = models.model_info(name)
    if info.task != "classification":
        raise ConfigError(f"model.name: {name} is a {info.task} model; training recipes need a classification model")
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
    plans = []
    for index, stage in enumerate(config.stages):
        data = config.stage_data(index)
        key = f"stages.{index}.data" if stage.data else "data"
        if not data.manifest:
            raise ConfigError("data.manifest: no manifest given (set data.manifest or pass --manifest)")
        task = resolve_task(data.task, f"{key}.task")
        manifest = load_stage_manifest(data.manifest, f"{key}.manifest", manifests)
        frames = stage_rows(manifest, data, task, key)
        build_augment(data.augment, f"{key}.augment")
        load_pipeline(data.pipeline, f"{key}.pipeline")
        if data.balance.method == "covid_percent":
            positive = task.classes.index(data.balance.positive_class)
            if not (frames[data.train_split]["target"] == positive).any():
                raise ConfigError(f"{key}.balance: covid_percent needs {data.balance.positive_class} images in the "
                                  "training split")
        plans.append(StagePlan(task, data, frames))
    choices = {json.dumps(manifest_pipeline(manifests[p.data.manifest], p.data.manifest, p.data.pipeline,
                                            "data"), sort_keys=True, default=str) for p in plans}
    if len(choices) > 1:
        raise ConfigError("data.pipeline: every stage must use the same preprocessing (the checkpoint stores one)")
    pipeline, already = manifest_pipeline(manifests[plans[0].data.manifest], plans[0].data.manifest,
                                          plans[0].data.pipeline, "data")
    if model is not None:
        groups = len(model.layer_groups())
        for index, stage in enumerate(config.stages):
            selected_groups(stage.train, groups, f"stages.{index}.train")
    return Prepared(config, plans, max(s.image_size for s in config.stages), model, pipeline, already)


def checkpoint_of(path: str, key: str) -> Path:
    """A run folder's best.pt, or the checkpoint file itself."""
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / "best.pt"
    if not candidate.is_file():
        raise ConfigError(f"{key}: no checkpoint at {path} (give a run folder with best.pt or a .pt file)")
    return candidate


def build_initial_model(config: TrainConfig, task: Task):  # noqa: ANN201
    """The model a run starts from: fresh, ImageNet, a weights file, or another run's checkpoint."""
    import torch

    from lungscreen import models

    torch.manual_seed(config.seed)  # the same recipe and seed start from the same weights
    spec = config.model
    weights, reset = spec.weights, spec.reset_head
    if spec.init_from:
        weights = str(checkpoint_of(spec.init_from, "model.init_from"))
        reset = reset or _classes_in(weights) != list(task.classes)
    try:
        return models.create(spec.name, num_classes=len(task.classes), in_channels=spec.in_channels,
                             pretrained=spec.pretrained, weights=weights, reset_head=reset, **spec.options)
    except LungscreenError as error:
        key = "model.pretrained" if spec.pretrained else "model.init_from" if spec.init_from else \
            "model.weights" if spec.weights else "model"
        raise ConfigError(f"{key}: {error}") from None


def _classes_in(path: str) -> list[str] | None:
    from lungscreen.models.weights import read_weights_file

    _, meta = read_weights_file(path)
    return None if meta is None else list(meta.get("class_names", []))


def swap_head(model, spec, task: Task, *, current: tuple[str, ...] | None, reset: bool, seed: int = 0):  # noqa: ANN001, ANN201
    """The same network with a fresh head for ``task`` when its classes differ from ``current`` (the classes
    the model predicts now) or when ``reset`` asks for one; the model itself otherwise."""
    from lungscreen import models
    from lungscreen.models.weights import merge_state

    if not reset and current is not None and tuple(current) == tuple(task.classes):
        return model
    if not reset and current is None and model.lungscreen_spec.num_classes == len(task.classes):
        return model
    import torch

    torch.manual_seed(seed)
    fresh = models.create(spec.name, num_classes=len(task.classes), in_channels=spec.in_channels, **spec.options)
    merge_state(fresh, model.state_dict(), source="the previous stage", reset_head=True)
    return fresh


# ---------------------------------------------------------------------------------------------------------
# Run folder helpers
# ---------------------------------------------------------------------------------------------------------

def default_run_dir(config: TrainConfig, env: DistEnv) -> Path:
    if env.distributed:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if run_id in ("", "none"):
            raise ConfigError("--out: under torchrun give the run folder explicitly (every process must agree)")
        return Path("runs") / f"{config.name}-{run_id}"
    return Path("runs") / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"


def write_json(path: Path, content: Any) -> None:
    text = json.dumps(content, indent=2, default=_plain)
    write_atomic(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class _Tee:
    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.streams[0], "isatty", lambda: False)())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.streams[0], name)


@contextlib.contextmanager
def run_log(path: Path | None) -> Iterator[None]:
    """Copy everything printed (stdout, stderr, Lightning's log) to ``path``, appended."""
    if path is None:
        yield
        return
    import logging

    with path.open("a", encoding="utf-8", buffering=1) as handle:
        handler = logging.StreamHandler(handle)
        handler.setFormatter(logging.Formatter("%(message)s"))
        loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lungscreen")]
        for logger in loggers:
            logger.addHandler(handler)
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(stdout, handle), _Tee(stderr, handle)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = stdout, stderr
            for logger in loggers:
                logger.removeHandler(handler)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's banners and the warnings that do not apply here (we choose 0 loader workers
    on purpose: images are in memory; the run folder is reused on resume)."""
    import logging
    import warnings

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for pattern in (".*does not have many workers.*", ".*LeafSpec.*", ".*exists and is not empty.*",
                        ".*is smaller than the logging interval.*", ".*ModelCheckpoint.*monitor.*",
                        ".*module\\(s\\) in eval mode.*", ".*but have no `val_dataloader`.*"):
            warnings.filterwarnings("ignore", message=pattern)
        try:
            yield
        finally:
            logger.setLevel(level)


def say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------------------

def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def make_callbacks():  # noqa: ANN201 - defined lazily so importing this module does not import Lightning
    import lightning as L

    class EpochRecorder(L.Callback):
        """Times each epoch and appends its row to metrics.csv (rank 0), forwarding it to a tracker."""

        def __init__(self, run: RunContext, stage_index: int, offset: int, world_size: int) -> None:
            self.run, self.stage_index, self.offset, self.world_size = run, stage_index, offset, world_size
            self._start = self._train_seconds = 0.0
            self._images = 0

        def on_train_epoch_start(self, trainer, module) -> None:  # noqa: ANN001
            self._start, self._images = time.perf_counter(), 0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self._images += len(batch["label"]) * self.world_size

        def on_validation_start(self, trainer, module) -> None:  # noqa: ANN001
            if not trainer.sanity_checking:
                self._train_seconds = time.perf_counter() - self._start

        def on_validation_end(self, trainer, module) -> None:  # noqa: ANN001
            if trainer.sanity_checking or not module.last_validation:
                return
            seconds = time.perf_counter() - self._start
            groups = trainer.optimizers[0].param_groups
            row = {"stage": self.stage_index, "stage_name": module.stage.name, "epoch": trainer.current_epoch,
                   "run_epoch": self.offset + trainer.current_epoch, "image_size": module.stage.image_size,
                   "lr_first": groups[0]["lr"], "lr_last": groups[-1]["lr"], **module.last_validation,
                   "train_seconds": round(self._train_seconds, 3), "epoch_seconds": round(seconds, 3),
                   "images_per_s": round(self._images / self._train_seconds, 2) if self._train_seconds else float("nan")}
            self.run.record_epoch(row)

    class BestCheckpoint(L.Callback):
        """Keeps best.pt: the epoch with the best ``monitor`` figure, ties broken by the lower val loss."""

        def __init__(self, run: RunContext, stage_index: int) -> None:
            self.run, self.stage_index = run, stage_index

        def on_validation_end(self, trainer, module) -> None:  # noqa: ANN001
            if trainer.sanity_checking or not module.last_validation:
                return
            metric, mode = self.run.monitor
            value = module.last_validation.get(metric, float("nan"))
            tie = module.last_validation.get("val/loss", float("inf"))
            if not _finite(value):
                return
            best = self.run.best
            sign = 1.0 if mode == "max" else -1.0
            if best and (sign * value, -tie) <= (sign * best["value"], -best["tie"]):
                return
            self.run.save_best(module, value=value, tie=tie, epoch=trainer.current_epoch, stage_index=self.stage_index)

    class StopOnRequest(L.Callback):
        """Stops the trainer when the run was asked to stop (a pruned search trial)."""

        def __init__(self, run: RunContext) -> None:
            self.run = run

        def on_validation_end(self, trainer, module) -> None:  # noqa: ANN001
            if self.run.stop_requested:
                trainer.should_stop = True

    return EpochRecorder, BestCheckpoint, StopOnRequest


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    """What a finished (or pruned) run produced."""

    run_dir: Path
    best: dict[str, Any] | None
    test: dict[str, Any] | None
    summary: dict[str, Any]
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    stopped: bool = False


class RunContext:
    """State shared by the stages of one run: its folder, history, best epoch and tracker."""

    def __init__(self, run_dir: Path, config: TrainConfig, prepared: Prepared, env: DistEnv,
                 listeners: Sequence[Any] = ()) -> None:
        self.dir = run_dir
        self.config = config
        self.prepared = prepared
        self.env = env
        self.monitor = config.monitor_metric()
        self.listeners = list(listeners)
        self.stop_requested = False
        self.tracker = None
        best_path = run_dir / "best.json"
        self.best: dict[str, Any] | None = read_json(best_path) if best_path.exists() else None
        self.preprocessing: dict[str, Any] = {}
        self.class_names: tuple[str, ...] = prepared.stages[-1].task.classes

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.csv"

    def history(self) -> pd.DataFrame:
        return pd.read_csv(self.metrics_path) if self.metrics_path.exists() else pd.DataFrame()

    def record_epoch(self, row: dict[str, Any]) -> None:
        if any([bool(listener(row)) for listener in self.listeners]):  # a listener asks to stop (pruning)
            self.stop_requested = True
        if not self.env.is_zero:
            return
        frame = self.history()
        if not frame.empty:  # a resumed epoch replaces the row of its interrupted first attempt
            frame = frame[~((frame["stage"] == row["stage"]) & (frame["epoch"] >= row["epoch"]))]
        frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)
        write_atomic(self.metrics_path, lambda tmp: frame.to_csv(tmp, index=False))
        shown = {k: row[k] for k in ("train/loss", "val/loss", "val/accuracy") if k in row}
        metric = self.monitor[0]
        if metric in row:
            shown[metric] = row[metric]
        text = "  ".join(f"{k} {v:.4f}" for k, v in shown.items())
        say(f"[{row['stage_name']}] epoch {row['epoch'] + 1}  {text}  {row['images_per_s']:.1f} img/s  "
            f"lr {row['lr_last']:.2e}")
        if self.tracker is not None:
            self.tracker.log_epoch(row)

    def save_best(self, module, *, value: float, tie: float, epoch: int, stage_index: int) -> None:  # noqa: ANN001
        from lungscreen.models import save_checkpoint

        stage = self.config.stages[stage_index]
        self.best = {"metric": self.monitor[0], "mode": self.monitor[1], "value": value, "tie": tie,
                     "stage": stage_index, "stage_name": stage.name, "epoch": epoch, "image_size": stage.image_size,
                     "figures": {k: v for k, v in module.last_validation.items() if _finite(v)}}
        if not self.env.is_zero:
            return
        extra = {"image_size": stage.image_size, "task": self.prepared.stages[stage_index].task.name,
                 "best": self.best, "run": self.config.name, "seed": self.config.seed}
        save_checkpoint(self.dir / "best.pt", module.model, class_names=list(self.class_names),
                        preprocessing=self.preprocessing, extra=extra)
        write_json(self.dir / "best.json", self.best)


def train(config: TrainConfig, *, out: str | Path | None = None, resume: str | Path | None = None,
          listeners: Sequence[Any] = (), extra_callbacks: Sequence[Any] = (), quiet: bool = False) -> RunResult:
    """Train a recipe into a run folder (or resume one); see the module docstring for the folder.

    Args:
        config: the validated recipe (ignored when resuming: the run's own config.yaml is used).
        out: run folder; default ``runs/<name>-<time>``.
        resume: a run folder to continue.
        listeners: callables receiving each epoch's metrics row; one returning True stops the run (pruning).
        extra_callbacks: more Lightning callbacks for every stage.
        quiet: no progress bars.
    """
    env = DistEnv.from_environ()
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume: {run_dir} is not a run folder (no config.yaml)")
        config = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")))
    else:
        run_dir = Path(out) if out is not None else default_run_dir(config, env)
        if (run_dir / "config.yaml").exists():
            raise ConfigError(f"--out: {run_dir} already holds a run; resume it with --resume {run_dir}")
    _set_threads(config, env)
    prepared = prepare(config, env=env, build_model=resume is None or not any(
        (run_dir / "stages").glob("*/done.json")))
    if env.is_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume is None:
            resolved = to_raw(config)
            write_atomic(run_dir / "config.yaml",
                         lambda tmp: tmp.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8"))
    with run_log(run_dir / "log.txt" if env.is_zero else None), quiet_lightning():
        return _run(config, prepared, run_dir, env, listeners, extra_callbacks, quiet, resumed=resume is not None)


def _set_threads(config: TrainConfig, env: DistEnv) -> None:
    import torch

    cores = os.cpu_count() or 1
    threads = config.threads or max(1, cores // env.local_world_size)
    torch.set_num_threads(threads)


def _run(config: TrainConfig, prepared: Prepared, run_dir: Path, env: DistEnv, listeners: Sequence[Any],
         extra_callbacks: Sequence[Any], quiet: bool, *, resumed: bool) -> RunResult:
    from lungscreen.training.data import ImageStore, Preprocessor

    started = time.perf_counter()
    context = RunContext(run_dir, config, prepared, env, listeners)
    say(f"run {run_dir}  model {config.model.name}  task {prepared.stages[-1].task.name}  "
        f"{len(config.stages)} stage(s)" + (f"  rank {env.rank}/{env.world_size}" if env.distributed else "")
        + ("  (resumed)" if resumed else ""))
    if config.tracking.mlflow and env.is_zero:
        context.tracker = MlflowTracker(config, run_dir)
    preprocessor = Preprocessor(prepared.pipeline, prepared.base_size, prepared.stages[0].data.cache_dir,
                                already_applied=prepared.already_applied)
    context.preprocessing = preprocessor.describe()
    stores: dict[tuple[str, str], ImageStore] = {}
    model = prepared.model
    current = _initial_classes(config, prepared)
    offset = 0
    stage_reports = []
    for index, stage in enumerate(config.stages):
        stage_dir = run_dir / "stages" / f"{index:02d}-{stage.name}"
        done = stage_dir / "done.json"
        if done.exists():
            stage_reports.append(read_json(done))
            model = None  # reloaded from final.pt when a later stage needs it
            offset += stage.epochs
            continue
        if model is None:
            model, current = _reload_previous(run_dir, config, index, prepared)
        plan = prepared.stages[index]
        if stage.init_from:
            model = _from_checkpoint(config, stage.init_from, plan.task, f"stages.{index}.init_from")
        else:
            model = swap_head(model, config.model, plan.task, current=current, reset=stage.reset_head,
                              seed=config.seed + index)
        current = plan.task.classes
        report = _run_stage(context, index, stage_dir, model, plan, preprocessor, stores, offset, extra_callbacks, quiet)
        stage_reports.append(report)
        offset += stage.epochs
        if context.stop_requested:
            break
    summary = _finish(context, stage_reports, preprocessor, stores, started)
    return RunResult(run_dir, context.best, summary.get("test"), summary, context.history(), context.stop_requested)


def _initial_classes(config: TrainConfig, prepared: Prepared) -> tuple[str, ...]:
    """Classes the starting model predicts: the first stage's (init_from checkpoints get their head swapped
    for them when they differ, in :func:`build_initial_model`)."""
    return prepared.stages[0].task.classes


def _reload_previous(run_dir: Path, config: TrainConfig, index: int, prepared: Prepared):  # noqa: ANN202
    """(model, its classes) to start stage ``index`` from, after a resume skipped the stages before it."""
    if index == 0:
        return build_initial_model(config, prepared.stages[0].task), prepared.stages[0].task.classes
    from lungscreen.models import load_checkpoint

    previous = run_dir / "stages" / f"{index - 1:02d}-{config.stages[index - 1].name}" / "final.pt"
    model, meta = load_checkpoint(previous)
    return model.train(), tuple(meta["class_names"])


def _from_checkpoint(config: TrainConfig, path: str, task: Task, key: str):  # noqa: ANN202
    import torch

    from lungscreen import models

    torch.manual_seed(config.seed)
    weights = str(checkpoint_of(path, key))
    reset = _classes_in(weights) != list(task.classes)
    spec = config.model
    return models.create(spec.name, num_classes=len(task.classes), in_channels=spec.in_channels, weights=weights,
                         reset_head=reset, **spec.options)


def _store_for(plan: StagePlan, preprocessor, stores: dict, split: str):  # noqa: ANN001, ANN202
    from rich.progress import Progress

    from lungscreen.training.data import ImageStore

    frame = plan.frames[split]
    key = (str(plan.data.manifest), split, plan.task.name, len(frame))
    if key not in stores:
        store = ImageStore(frame, preprocessor)
        with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
            job = progress.add_task(f"loading {split} images", total=len(store))
            store.load_all(lambda i: progress.advance(job))
        stores[key] = store
    return stores[key]


def _loaders(context: RunContext, index: int, plan: StagePlan, preprocessor, stores: dict):  # noqa: ANN001, ANN202
    from torch.utils.data import DataLoader

    from lungscreen.training.data import ManifestDataset, build_augment, collate
    from lungscreen.training.sampling import EpochSampler

    stage, data, env = context.config.stages[index], plan.data, context.env
    train_store = _store_for(plan, preprocessor, stores, data.train_split)
    val_store = _store_for(plan, preprocessor, stores, data.val_split)
    for store in (train_store, val_store):
        store.keep_only(stage.image_size)
    train_set = ManifestDataset(plan.frames[data.train_split], train_store, stage.image_size, build_augment(data.augment))
    val_set = ManifestDataset(plan.frames[data.val_split], val_store, stage.image_size)
    positive = plan.task.classes.index(data.balance.positive_class) if data.balance.positive_class in plan.task.classes else None
    sampler = EpochSampler(train_set.targets, method=data.balance.method, batch_size=data.batch_size,
                           seed=int(np.random.SeedSequence([context.config.seed, index]).generate_state(1)[0]),
                           positive=positive, covid_percent=data.balance.covid_percent, rank=env.rank,
                           world_size=env.world_size)
    workers = data.num_workers
    train_loader = DataLoader(train_set, batch_size=sampler.per_rank_batch, sampler=sampler, collate_fn=collate,
                              num_workers=workers, persistent_workers=False, drop_last=False)
    val_loader = DataLoader(val_set, batch_size=data.eval_batch_size, shuffle=False, collate_fn=collate,
                            num_workers=workers)
    return train_set, train_loader, val_loader


def _trainer_kwargs(context: RunContext, stage_epochs: int, precision: str, quiet: bool) -> dict[str, Any]:
    env = context.env
    kwargs: dict[str, Any] = {
        "max_epochs": stage_epochs, "logger": False, "num_sanity_val_steps": 0, "use_distributed_sampler": False,
        "enable_model_summary": False, "precision": "bf16-mixed" if precision == "bf16" else "32-true",
        "enable_progress_bar": not quiet and sys.stderr.isatty(), "deterministic": False,
    }
    if env.distributed:
        import torch
        from lightning.pytorch.strategies import DDPStrategy

        cuda = torch.cuda.is_available()
        backend = context.config.distributed.backend
        backend = ("nccl" if cuda else "gloo") if backend == "auto" else backend
        kwargs.update(accelerator="gpu" if cuda else "cpu", devices=env.local_world_size,
                      num_nodes=env.world_size // env.local_world_size,
                      strategy=DDPStrategy(process_group_backend=backend),
                      sync_batchnorm=cuda and context.config.distributed.sync_batchnorm)
    else:
        kwargs.update(accelerator="auto", devices=1)
    return kwargs


def _run_stage(context: RunContext, index: int, stage_dir: Path, model, plan: StagePlan, preprocessor, stores: dict,  # noqa: ANN001
               offset: int, extra_callbacks: Sequence[Any], quiet: bool) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from lungscreen.training.module import ClassifierModule
    from lungscreen.training.optim import resolve_class_weights

    config, env = context.config, context.env
    stage = config.stages[index]
    if env.is_zero:
        stage_dir.mkdir(parents=True, exist_ok=True)
    say(f"stage {index + 1}/{len(config.stages)} {stage.name}: {stage.epochs} epoch(s) at {stage.image_size} px, "
        f"train {stage.train}, {stage.optimizer.name} lr {stage.optimizer.lr}, schedule {stage.schedule.name}")
    train_set, train_loader, val_loader = _loaders(context, index, plan, preprocessor, stores)
    weights = resolve_class_weights(stage.loss.class_weights, plan.task.classes, train_set.targets)
    lr = stage.optimizer.lr
    if lr == "find":
        lr = _find_lr(context, index, stage_dir, model, plan, train_loader, weights)
    precision = _choose_precision(context, stage_dir, model, stage, plan)
    module = ClassifierModule(model, class_names=plan.task.classes, stage=stage, lr=lr, class_weights=weights,
                              seed=config.seed, stage_index=index, monitor_mode=context.monitor[1])
    EpochRecorder, BestCheckpoint, StopOnRequest = make_callbacks()
    callbacks = [EpochRecorder(context, index, offset, env.world_size), StopOnRequest(context), *extra_callbacks]
    final_task = plan.task.classes == context.class_names
    metric, mode = context.monitor
    if final_task:
        callbacks.append(BestCheckpoint(context, index))
        if config.monitor.patience is not None:
            callbacks.append(EarlyStopping(monitor=metric, mode=mode, patience=config.monitor.patience,
                                           min_delta=config.monitor.min_delta, check_finite=False, verbose=False))
    callbacks.append(ModelCheckpoint(dirpath=stage_dir, filename="last", save_top_k=1, monitor=None,
                                     enable_version_counter=False, save_on_train_epoch_end=False))
    trainer = L.Trainer(callbacks=callbacks, default_root_dir=stage_dir,
                        **_trainer_kwargs(context, stage.epochs, precision, quiet))
    module.train()  # Lightning keeps the modes it finds: frozen groups' BatchNorm layers start (and stay) in eval
    checkpoint = stage_dir / "last.ckpt"
    started = time.perf_counter()
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(checkpoint) if checkpoint.exists() else None)
    seconds = time.perf_counter() - started
    history = context.history()
    rows = history[history["stage"] == index] if not history.empty else history
    report = {"stage": index, "name": stage.name, "image_size": stage.image_size, "epochs_run": int(len(rows)),
              "precision": precision, "lr": list(lr) if isinstance(lr, tuple) else lr,
              "images_per_s": float(rows["images_per_s"].median()) if len(rows) else None,
              "train_seconds": float(rows["train_seconds"].sum()) if len(rows) else None,
              "seconds_this_session": round(seconds, 2), "train_images": len(train_set),
              "stopped_early": bool(trainer.should_stop and len(rows) < stage.epochs)}
    if env.is_zero:
        from lungscreen.models import save_checkpoint

        save_checkpoint(stage_dir / "final.pt", module.model, class_names=list(plan.task.classes),
                        preprocessing=context.preprocessing, extra={"stage": index, "image_size": stage.image_size})
        write_json(stage_dir / "done.json", report)
    if env.distributed:
        trainer.strategy.barrier()
    return report


def _find_lr(context: RunContext, index: int, stage_dir: Path, model, plan: StagePlan, loader,  # noqa: ANN001
             weights) -> float | tuple[float, float]:  # noqa: ANN001
    """LR range test (Lightning's Tuner) on a copy of the model; the result is stored so a resume reuses it."""
    import lightning as L
    from lightning.pytorch.tuner import Tuner

    from lungscreen.training.module import ClassifierModule

    stage = context.config.stages[index]
    saved = stage_dir / "lr_find.json"
    if saved.exists():
        found = read_json(saved)["suggestion"]
    else:
        probe = ClassifierModule(copy.deepcopy(model), class_names=plan.task.classes, stage=stage, lr=1e-3,
                                 class_weights=weights, seed=context.config.seed, stage_index=index).train()
        trainer = L.Trainer(max_epochs=10_000, logger=False, enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                            accelerator="cpu" if context.env.distributed else "auto", devices=1,
                            default_root_dir=stage_dir if context.env.is_zero else None, limit_val_batches=0)
        finder = Tuner(trainer).lr_find(probe, train_dataloaders=loader, min_lr=stage.lr_find.min_lr,
                                        max_lr=stage.lr_find.max_lr, num_training=stage.lr_find.steps,
                                        update_attr=False)
        found = finder.suggestion() if finder is not None else None
        if found is None:
            raise LungscreenError(f"stages.{index}.optimizer.lr: the LR range test found no usable rate "
                                  "(too few steps? raise lr_find.steps)")
        if context.env.is_zero:
            figure = finder.plot(suggest=True)
            figure.savefig(stage_dir / "lr_find.png", dpi=100)
            import matplotlib.pyplot as plt

            plt.close(figure)
            write_json(saved, {"suggestion": found, "lr": finder.results["lr"], "loss": finder.results["loss"]})
    say(f"  LR range test: {found:.2e}" + (f" (first group {found / stage.optimizer.lr_spread:.2e})"
                                           if stage.optimizer.lr_spread > 1 else ""))
    return (found / stage.optimizer.lr_spread, found) if stage.optimizer.lr_spread > 1 else found


def measure_precision(model, image_size: int, batch_size: int, in_channels: int = 1, repeats: int = 3) -> dict[str, float]:  # noqa: ANN001
    """Seconds per training step in float32 and in bf16 autocast (a copy of the model; best of ``repeats``)."""
    import torch

    probe = copy.deepcopy(model).train()
    images = torch.rand(batch_size, in_channels, image_size, image_size)
    labels = torch.zeros(batch_size, dtype=torch.long)
    optimizer = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad] or list(probe.parameters()), lr=0.0)
    timings = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        best = float("inf")
        for attempt in range(repeats + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                loss = torch.nn.functional.cross_entropy(probe(images).float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if attempt:  # the first is a warm-up
                best = min(best, time.perf_counter() - start)
        timings[f"{name}_step_s"] = best
    return timings


def _choose_precision(context: RunContext, stage_dir: Path, model, stage, plan: StagePlan) -> str:  # noqa: ANN001
    """``32`` / ``bf16`` as configured; ``auto`` measures both on this machine and keeps the faster."""
    wanted = context.config.precision
    if wanted != "auto":
        return "bf16" if wanted == "bf16" else "32"
    saved = stage_dir / "precision.json"
    if saved.exists():
        return read_json(saved)["choice"]
    import torch

    if not torch.backends.mkldnn.is_available():
        choice, timings = "32", {}
    else:
        timings = measure_precision(model, stage.image_size, max(2, plan.data.batch_size // context.env.world_size),
                                    context.config.model.in_channels)
        choice = "bf16" if timings["bf16_step_s"] < 0.9 * timings["fp32_step_s"] else "32"
    say(f"  precision auto: fp32 {timings.get('fp32_step_s', float('nan')):.3f} s/step, "
        f"bf16 {timings.get('bf16_step_s', float('nan')):.3f} s/step -> {choice}")
    if context.env.is_zero:
        write_json(saved, {"choice": choice, **timings})
    return choice


# ---------------------------------------------------------------------------------------------------------
# End of a run: test evaluation and summary
# ---------------------------------------------------------------------------------------------------------

def evaluate_checkpoint(path: Path, frame: pd.DataFrame, store, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """Class probabilities of a checkpoint on the rows of ``frame`` (images from ``store``)."""
    import torch
    from torch.utils.data import DataLoader

    from lungscreen.models import load_checkpoint
    from lungscreen.training.data import ManifestDataset, collate

    model, meta = load_checkpoint(path)
    dataset = ManifestDataset(frame, store, int(meta["extra"]["image_size"]))
    probs = []
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            probs.append(torch.softmax(model(batch["image"]).float(), dim=1))
    return torch.cat(probs).numpy(), dataset.targets


def _finish(context: RunContext, stage_reports: list[dict], preprocessor, stores: dict, started: float) -> dict[str, Any]:  # noqa: ANN001
    from lungscreen.evaluation.metrics import classification_report

    config, env = context.config, context.env
    summary: dict[str, Any] = {
        "run": str(context.dir), "config": config.name, "model": config.model.name,
        "task": context.prepared.stages[-1].task.name, "classes": list(context.class_names),
        "stages": stage_reports, "best": context.best, "stopped": context.stop_requested,
        "train_seconds": round(sum(r.get("train_seconds") or 0.0 for r in stage_reports), 2),
    }
    plan = context.prepared.stages[-1]
    test_frame = plan.frames.get(plan.data.test_split, pd.DataFrame())
    if (config.test and env.is_zero and not context.stop_requested and context.best is not None
            and not test_frame.empty):
        store = _store_for(plan, preprocessor, stores, plan.data.test_split)
        probs, targets = evaluate_checkpoint(context.dir / "best.pt", test_frame, store)
        report = classification_report(targets, probs, context.class_names, groups=test_frame["patient_id"].to_numpy())
        test = {"images": int(len(targets)), "patients": int(test_frame["patient_id"].nunique()),
                "counts": {name: int((targets == i).sum()) for i, name in enumerate(context.class_names)},
                "figures": {k: v.as_dict() for k, v in report.items()}}
        write_json(context.dir / "test.json", test)
        summary["test"] = test
        for name in ("accuracy", "balanced_accuracy", "sensitivity/COVID-19", "ppv/COVID-19"):
            if name in report:
                say(f"test {name}: {report[name]}")
    summary["wall_seconds_this_session"] = round(time.perf_counter() - started, 2)
    if env.is_zero:
        write_json(context.dir / "summary.json", summary)
        if context.tracker is not None:
            context.tracker.finish(summary)
    return summary


class MlflowTracker:
    """Logs a run to MLflow (parameters once, each epoch's figures, the summary and best.pt at the end).

    MLflow is an optional dependency (the ``dev`` extra), imported only when tracking is on. The MLflow
    run id is kept in the run folder, so a resumed run continues the same MLflow run.
    """

    def __init__(self, config: TrainConfig, run_dir: Path) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError("tracking.mlflow: MLflow is not installed (pip install 'lungscreen[dev]' or mlflow)") from None
        self.client = mlflow.MlflowClient(tracking_uri=config.tracking.uri)
        self.run_dir = run_dir
        id_file = run_dir / "mlflow.json"
        if id_file.exists():
            self.run_id = read_json(id_file)["run_id"]
            return
        experiment = self.client.get_experiment_by_name(config.tracking.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(config.tracking.experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        write_json(id_file, {"run_id": self.run_id, "uri": config.tracking.uri})
        from mlflow.entities import Param

        raw = to_raw(config)
        raw.pop("tune", None)  # the search space is not a parameter of this run
        params = [Param(re.sub(r"[^\w\-. /]", "_", key), str(value)[:500]) for key, value in _flatten(raw).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log_epoch(self, row: dict[str, Any]) -> None:
        step = int(row["run_epoch"])
        for key, value in row.items():
            if isinstance(value, (int, float)) and _finite(value) and key not in ("stage", "epoch", "run_epoch"):
                self.client.log_metric(self.run_id, key, float(value), step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        for name, estimate in (summary.get("test") or {}).get("figures", {}).items():
            if _finite(estimate["value"]):
                self.client.log_metric(self.run_id, f"test/{name}", float(estimate["value"]))
        for artifact in ("metrics.csv", "summary.json", "config.yaml"):
            if (self.run_dir / artifact).exists():
                self.client.log_artifact(self.run_id, str(self.run_dir / artifact))
        self.client.set_terminated(self.run_id)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out = {}
        for index, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}.{index}"))
        return out
    return {prefix: value}
