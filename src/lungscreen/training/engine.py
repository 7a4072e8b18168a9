"""Runs: a recipe trained stage by stage into a run folder, resumable, in one process or under torchrun.

A run folder holds::

    config.yaml          the recipe as resolved (overrides applied, manifest path absolute)
    log.txt              everything the run printed
    metrics.csv          one row per epoch: stage, epoch, learning rates, train loss, every val/ figure,
                         seconds and images/s
    stages/NN-name/      last.ckpt (Lightning, for --resume), final.pt, done.json, lr_find.png/.json,
                         precision.json
    best.pt              the best epoch by ``monitor`` (lungscreen checkpoint: the model and its inference spec)
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

Preparation lives in :mod:`~lungscreen.training.prepare`, the run folder's files and log in
:mod:`~lungscreen.training.run_folder`, the Lightning callbacks in :mod:`~lungscreen.training.callbacks` and
MLflow tracking in :mod:`~lungscreen.training.tracking`.
"""

from __future__ import annotations

import copy
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from lungscreen import interrupts
from lungscreen.errors import ConfigError, LungscreenError
from lungscreen.io.files import write_atomic
from lungscreen.inference.scoring import original_images
from lungscreen.models.inference_spec import Head, InferenceSpec, InputSpec, IntensityReference
from lungscreen.preprocessing.model_input import intensity_reference
from lungscreen.training.callbacks import is_finite, make_callbacks
from lungscreen.training.config import StageConfig, TrainConfig, from_dict, to_raw
from lungscreen.training.contrastive import unwrapped
from lungscreen.training.prepare import (
    DistEnv,
    Prepared,
    StagePlan,
    TaskSpec,
    alternation_groups,
    build_initial_model,
    checkpoint_classes,
    checkpoint_of,
    head_classes,
    head_sizes,
    prepare,
    stage_views,
    swap_head,
    task_name,
)
from lungscreen.training.run_folder import (
    default_run_dir,
    quiet_lightning,
    read_json,
    run_log,
    say,
    terminal_stream,
    write_json,
)
from lungscreen.training.tracking import MlflowTracker

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
        self.classes = head_classes(prepared.stages[-1].task)  # what best.pt predicts
        self.stores: dict[tuple[str, ...], Any] = {}  # the image stores of every (manifest, split, task)
        self._references: dict[tuple[int, int], IntensityReference] = {}
        self.train_patients = sorted({str(p) for plan in prepared.stages
                                      for p in plan.frames[plan.data.train_split]["patient_id"]})

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.csv"

    def chooses_best(self, stage_index: int) -> bool:
        """Whether stage ``stage_index`` may give best.pt: only when it validates on the last stage's images,
        task and preprocessing (what best.pt is for). A pre-training stage on another task, modality or
        pipeline scores other answers."""
        def validated_on(index: int) -> tuple:
            data = self.config.stage_data(index)
            return data.manifest, data.task, data.modality, data.views, data.sources, data.val_split, \
                data.pipeline

        return validated_on(stage_index) == validated_on(len(self.config.stages) - 1)

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

    def spec(self, stage_index: int) -> InferenceSpec:
        """The inference spec of the model as stage ``stage_index`` trains it."""
        stage, plan = self.config.stages[stage_index], self.prepared.stages[stage_index]
        return inference_spec(stage, plan, self.config.model.in_channels,
                              self.reference(stage_index))

    def reference(self, stage_index: int) -> IntensityReference:
        """The intensity histogram of the stage's training inputs (for predict's out-of-distribution flag)."""
        stage, plan = self.config.stages[stage_index], self.prepared.stages[stage_index]
        key = (stage_index, stage.image_size)
        if key not in self._references:
            store = _store_for(self, plan, plan.data.train_split)
            self._references[key] = intensity_reference([store.sample(i, stage.image_size).image
                                                         for i in range(len(store))])
        return self._references[key]

    def save_best(self, module, *, value: float, tie: float, epoch: int, stage_index: int) -> None:  # noqa: ANN001
        from lungscreen.models import save_checkpoint

        stage = self.config.stages[stage_index]
        self.best = {"metric": self.monitor[0], "mode": self.monitor[1], "value": value, "tie": tie,
                     "stage": stage_index, "stage_name": stage.name, "epoch": epoch, "image_size": stage.image_size,
                     "figures": {k: v for k, v in module.last_validation.items() if is_finite(v)}}
        if not self.env.is_zero:
            return
        extra = {"best": self.best, "run": self.config.name, "seed": self.config.seed,
                 "train_patients": self.train_patients}
        save_checkpoint(self.dir / "best.pt", unwrapped(module.model), spec=self.spec(stage_index), extra=extra)
        write_json(self.dir / "best.json", self.best)


def inference_spec(stage: StageConfig, plan: StagePlan, in_channels: int,
                   reference: IntensityReference | None = None) -> InferenceSpec:
    """What a model trained by ``stage`` eats and emits: written into every checkpoint of the run."""
    task = plan.task
    if isinstance(task, dict):
        heads = [Head(name=name, kind=head.kind, classes=list(head.classes)) for name, head in task.items()]
    else:
        heads = [Head(kind=task.kind, classes=list(task.classes))]
    views = stage_views(plan.data)
    return InferenceSpec(input=InputSpec(size=stage.image_size, channels=in_channels, pipeline=plan.pipeline.to_dict()),
                         heads=heads, task=task_name(task), modality=plan.data.modality,
                         task_definition=None if isinstance(task, dict) else task.to_dict(),
                         views=list(views) if views else None, reference=reference)


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
        if env.is_zero and (run_dir / "config.yaml").exists():  # other ranks may start after rank 0 wrote it
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
        try:
            return _run(config, prepared, run_dir, env, listeners, extra_callbacks, quiet, resumed=resume is not None)
        except interrupts.Interrupted as stop:
            stop.hint = stop.hint or f"resume with lungscreen train --resume {run_dir}"
            say(stop.message())  # into log.txt too
            raise


def _set_threads(config: TrainConfig, env: DistEnv) -> None:
    import torch

    cores = os.cpu_count() or 1
    threads = config.threads or max(1, cores // env.local_world_size)
    torch.set_num_threads(threads)


def _run(config: TrainConfig, prepared: Prepared, run_dir: Path, env: DistEnv, listeners: Sequence[Any],
         extra_callbacks: Sequence[Any], quiet: bool, *, resumed: bool) -> RunResult:
    started = time.perf_counter()
    context = RunContext(run_dir, config, prepared, env, listeners)
    say(f"run {run_dir}  model {config.model.name}  task {task_name(prepared.stages[-1].task)}  "
        f"{len(config.stages)} stage(s)" + (f"  rank {env.rank}/{env.world_size}" if env.distributed else "")
        + ("  (resumed)" if resumed else ""))
    if config.tracking.mlflow and env.is_zero:
        context.tracker = MlflowTracker(config, run_dir)
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
        current = head_classes(plan.task)
        report = _run_stage(context, index, stage_dir, model, plan, offset, extra_callbacks, quiet)
        stage_reports.append(report)
        offset += stage.epochs
        if context.stop_requested:
            break
    summary = _finish(context, stage_reports, started)
    return RunResult(run_dir, context.best, summary.get("test"), summary, context.history(), context.stop_requested)


def _initial_classes(config: TrainConfig, prepared: Prepared) -> Any:
    """What the starting model predicts: the first stage's classes (init_from checkpoints get their head
    swapped for them when they differ, in :func:`build_initial_model`)."""
    return head_classes(prepared.stages[0].task)


def _reload_previous(run_dir: Path, config: TrainConfig, index: int, prepared: Prepared):  # noqa: ANN202
    """(model, its classes) to start stage ``index`` from, after a resume skipped the stages before it."""
    if index == 0:
        return build_initial_model(config, prepared.stages[0].task), head_classes(prepared.stages[0].task)
    from lungscreen.models import load_checkpoint

    previous = run_dir / "stages" / f"{index - 1:02d}-{config.stages[index - 1].name}" / "final.pt"
    return load_checkpoint(previous).model.train(), checkpoint_classes(str(previous))


def _from_checkpoint(config: TrainConfig, path: str, task: TaskSpec, key: str):  # noqa: ANN202
    import torch

    from lungscreen import models

    torch.manual_seed(config.seed)
    weights = str(checkpoint_of(path, key))
    reset = checkpoint_classes(weights) != head_classes(task)
    spec = config.model
    return models.create(spec.name, num_classes=head_sizes(task), in_channels=spec.in_channels, weights=weights,
                         reset_head=reset, **spec.options)


def _store_for(context: RunContext, plan: StagePlan, split: str):  # noqa: ANN202
    """The image store of one split of a stage's data (shared by the stages that use the same rows)."""
    from rich.console import Console
    from rich.progress import Progress

    from lungscreen.training.data import ImageStore

    frame = plan.frames[split]
    key = (str(plan.data.manifest), split, task_name(plan.task), len(frame), plan.pipeline)  # pipelines hash
    stores = context.stores
    if key not in stores:
        store = ImageStore(frame, plan.pipeline, context.prepared.sizes, cache_dir=plan.data.cache_dir,
                           already_applied=plan.already_applied, with_masks=needs_masks(plan.task))
        terminal = Console(file=terminal_stream())  # drawn on the terminal, never into log.txt
        with Progress(console=terminal, transient=True, disable=not terminal.is_terminal) as progress:
            job = progress.add_task(f"loading {split} images", total=len(store))
            store.load_all(lambda i: progress.advance(job))
        if store.failures:
            _report_skipped(context, split, store.failures)
        if store.frame.empty:
            raise LungscreenError(f"no usable {split!r} image ({len(store.failures)} skipped; see "
                                  f"{context.dir / 'skipped.csv'})")
        stores[key] = store
    return stores[key]


def _report_skipped(context: RunContext, split: str, failures: list[tuple[str, str]]) -> None:
    """Say how many images a split lost and why (the first three here, all of them in skipped.csv)."""
    say(f"  {len(failures)} {split} image(s) skipped, e.g. {failures[0][1]}")
    if context.env.is_zero:
        path = context.dir / "skipped.csv"
        frame = pd.DataFrame([(split, p, r) for p, r in failures], columns=["split", "image_path", "reason"])
        if path.exists():
            frame = pd.concat([pd.read_csv(path), frame], ignore_index=True).drop_duplicates()
        write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


def needs_masks(task: TaskSpec) -> bool:
    """Whether the task's targets come from the rows' reference masks or boxes."""
    tasks = task.values() if isinstance(task, dict) else [task]
    return any(t.kind in ("segmentation", "detection") for t in tasks)


def _loaders(context: RunContext, index: int, plan: StagePlan):  # noqa: ANN202
    from torch.utils.data import DataLoader

    from lungscreen.training.augment import build_augment
    from lungscreen.training.data import ManifestDataset, collate
    from lungscreen.training.sampling import EpochSampler

    stage, data, env = context.config.stages[index], plan.data, context.env
    spec = context.spec(index).input
    train_store, val_store = _store_for(context, plan, data.train_split), _store_for(context, plan, data.val_split)
    if stage.objective == "simclr":
        from lungscreen.training.contrastive import TwoViewDataset

        views = {"min_scale": stage.simclr.min_scale, "rotation": stage.simclr.rotation}
        train_set = TwoViewDataset(train_store, stage.image_size, spec, plan.task, **views)
        val_set = TwoViewDataset(val_store, stage.image_size, spec, plan.task, **views)
    else:
        train_set = ManifestDataset(train_store, stage.image_size, spec, plan.task, build_augment(data.augment))
        val_set = ManifestDataset(val_store, stage.image_size, spec, plan.task)
    classes = getattr(plan.task, "classes", ())
    positive = classes.index(data.balance.positive_class) if data.balance.positive_class in classes else None
    targets = alternation_groups(train_set.frame, plan.task, data.balance.heads) \
        if data.balance.method == "alternate" else train_set.targets
    method = data.balance.method if stage.objective == "supervised" else "none"  # no labels to balance
    sampler = EpochSampler(targets, method=method, batch_size=data.batch_size,
                           seed=int(np.random.SeedSequence([context.config.seed, index]).generate_state(1)[0]),
                           positive=positive, covid_percent=data.balance.covid_percent, rank=env.rank,
                           world_size=env.world_size)
    workers = data.num_workers
    # Workers leave SIGINT/SIGTERM to this process, which stops between batches and shuts them down.
    train_loader = DataLoader(train_set, batch_size=sampler.per_rank_batch, sampler=sampler, collate_fn=collate,
                              num_workers=workers, persistent_workers=False, drop_last=False,
                              worker_init_fn=_quiet_worker if workers else None)
    val_loader = DataLoader(val_set, batch_size=data.eval_batch_size, shuffle=False, collate_fn=collate,
                            num_workers=workers, worker_init_fn=_quiet_worker if workers else None)
    return train_set, train_loader, val_loader


def _quiet_worker(worker_id: int) -> None:
    interrupts.ignore_in_worker()


def _trainer_kwargs(context: RunContext, stage_epochs: int, precision: str, quiet: bool) -> dict[str, Any]:
    from lungscreen.training.callbacks import show_progress  # the bar itself: progress_bars() in _run_stage

    env = context.env
    kwargs: dict[str, Any] = {
        "max_epochs": stage_epochs, "logger": False, "num_sanity_val_steps": 0, "use_distributed_sampler": False,
        "enable_model_summary": False, "precision": "bf16-mixed" if precision == "bf16" else "32-true",
        "enable_progress_bar": show_progress(quiet), "deterministic": False,
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


def _run_stage(context: RunContext, index: int, stage_dir: Path, model, plan: StagePlan,  # noqa: ANN001
               offset: int, extra_callbacks: Sequence[Any], quiet: bool) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lungscreen.training.module import TrainModule

    config, env = context.config, context.env
    stage = config.stages[index]
    if env.is_zero:
        stage_dir.mkdir(parents=True, exist_ok=True)
    say(f"stage {index + 1}/{len(config.stages)} {stage.name}: {stage.epochs} epoch(s) at {stage.image_size} px, "
        f"train {stage.train}, {stage.optimizer.name} lr {stage.optimizer.lr}, schedule {stage.schedule.name}")
    train_set, train_loader, val_loader = _loaders(context, index, plan)
    objective = _objective(stage, plan, train_set.targets, model, seed=config.seed + index)
    lr = stage.optimizer.lr
    if lr == "find" and stage.objective != "supervised":
        raise ConfigError(f"stages.{index}.optimizer.lr: the LR range test needs labels; give a rate for the "
                          f"{stage.objective} stage")
    if lr == "find":
        lr = _find_lr(context, index, stage_dir, model, objective, train_loader)
    precision = _choose_precision(context, stage_dir, model, stage, plan)
    trained = model
    if stage.objective == "simclr":
        from lungscreen.training.contrastive import Pretrainer

        trained = Pretrainer(model, hidden_dim=stage.simclr.hidden_dim, out_dim=stage.simclr.out_dim)
    module = TrainModule(trained, objective=objective, stage=stage, lr=lr, seed=config.seed, stage_index=index,
                         monitor_mode=context.monitor[1])
    EpochRecorder, BestCheckpoint, StopOnRequest, StopOnSignal = make_callbacks()
    from lungscreen.training.callbacks import progress_bars

    callbacks = [EpochRecorder(context, index, offset, env.world_size), StopOnRequest(context),
                 *progress_bars(stage.name, stage.epochs, quiet), *extra_callbacks]
    final_task = head_classes(plan.task) == context.classes
    metric, mode = context.monitor
    if final_task:
        callbacks.append(BestCheckpoint(context, index))
        if config.monitor.patience is not None:
            callbacks.append(EarlyStopping(monitor=metric, mode=mode, patience=config.monitor.patience,
                                           min_delta=config.monitor.min_delta, check_finite=False, verbose=False))
    callbacks.append(ModelCheckpoint(dirpath=stage_dir, filename="last", save_top_k=1, monitor=None,
                                     enable_version_counter=False, save_on_train_epoch_end=False))
    callbacks.append(StopOnSignal())
    trainer = L.Trainer(callbacks=callbacks, default_root_dir=stage_dir,
                        **_trainer_kwargs(context, stage.epochs, precision, quiet))
    module.train()  # Lightning keeps the modes it finds: frozen groups' BatchNorm layers start (and stay) in eval
    checkpoint = stage_dir / "last.ckpt"
    started = time.perf_counter()
    with interrupts.deferred():  # a signal stops training between batches, never inside a checkpoint write
        try:
            trainer.fit(module, train_loader, val_loader, ckpt_path=str(checkpoint) if checkpoint.exists() else None)
        except (interrupts.Interrupted, SIGTERMException) as stop:
            signum = stop.signum if isinstance(stop, interrupts.Interrupted) else signal.SIGTERM
            raise interrupts.Interrupted(signum, f"at epoch {trainer.current_epoch + 1}/{stage.epochs} of stage "
                                                 f"{stage.name}") from None
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

        save_checkpoint(stage_dir / "final.pt", unwrapped(module.model), spec=context.spec(index), extra={"stage": index})
        write_json(stage_dir / "done.json", report)
    if env.distributed:
        trainer.strategy.barrier()
    return report


def _objective(stage: StageConfig, plan: StagePlan, train_targets: np.ndarray, model, *,  # noqa: ANN001, ANN202
               seed: int = 0):
    """The stage's objective, with its class weights resolved on the training rows, the model's anchor grid
    (box heads) and the stage's teacher forcing."""
    from lungscreen.training.objectives import TeacherForcing, build_objective
    from lungscreen.training.optim import resolve_class_weights

    if stage.objective == "simclr":
        from lungscreen.training.contrastive import ContrastiveObjective

        return ContrastiveObjective(plan.task, stage.simclr.temperature)
    weights = None
    if not isinstance(plan.task, dict) and plan.task.kind in ("multiclass", "multilabel"):
        weights = resolve_class_weights(stage.loss.class_weights, plan.task.classes, train_targets)
    forcing = None
    if stage.teacher_forcing is not None:
        gate = stage.teacher_forcing.gate
        if not isinstance(plan.task, dict) or gate not in plan.task:
            raise ConfigError(f"stages.{stage.name}.teacher_forcing.gate: {gate!r} is not a head of the stage's "
                              "multi-task data.task")
        forcing = TeacherForcing(stage.teacher_forcing.p, gate, stage.teacher_forcing.threshold, seed)
    return build_objective(plan.task, stage.loss, weights, grid=getattr(model, "grid", None), teacher_forcing=forcing)


def _find_lr(context: RunContext, index: int, stage_dir: Path, model, objective, loader  # noqa: ANN001
             ) -> float | tuple[float, float]:
    """LR range test (Lightning's Tuner) on a copy of the model; the result is stored so a resume reuses it."""
    import lightning as L
    from lightning.pytorch.tuner import Tuner

    from lungscreen.training.module import TrainModule

    stage = context.config.stages[index]
    saved = stage_dir / "lr_find.json"
    if saved.exists():
        found = read_json(saved)["suggestion"]
    else:
        probe = TrainModule(copy.deepcopy(model), objective=objective, stage=stage, lr=1e-3, seed=context.config.seed,
                            stage_index=index).train()
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


def _choose_precision(context: RunContext, stage_dir: Path, model, stage, plan: StagePlan) -> str:  # noqa: ANN001
    """``32`` / ``bf16`` as configured (no measurement); ``auto`` decides from the hardware, with a timing of
    this model as a veto only (:mod:`~lungscreen.training.precision`), so machine load cannot flip it. The
    decision and why are printed and kept in ``precision.json``, which a resume reuses."""
    wanted = context.config.precision
    if wanted != "auto":
        return "bf16" if wanted == "bf16" else "32"
    saved = stage_dir / "precision.json"
    if saved.exists():
        return read_json(saved)["choice"]
    from lungscreen.training.precision import choose_precision

    record = choose_precision(model, stage.image_size, max(2, plan.data.batch_size // context.env.world_size),
                              context.config.model.in_channels)
    say(f"  precision auto: {'bf16' if record['choice'] == 'bf16' else 'fp32'}: {record['reason']}")
    if context.env.is_zero:
        write_json(saved, record)
    return record["choice"]


# ---------------------------------------------------------------------------------------------------------
# End of a run: test evaluation and summary
# ---------------------------------------------------------------------------------------------------------

def _operating_point(context: RunContext, plan: StagePlan) -> dict[str, Any] | None:
    """Choose best.pt's decision threshold on the validation split (a single-label classifier whose task has
    the configured positive class), store it in its inference spec, and say so."""
    from lungscreen.errors import MetricError
    from lungscreen.training.testing import choose_operating_point

    wanted = context.config.operating_point
    task = plan.task
    positive = wanted.positive_class or ("COVID-19" if "COVID-19" in getattr(task, "classes", ()) else None)
    if isinstance(task, dict) or task.kind != "multiclass" or positive is None or not wanted.enabled:
        return None
    try:
        point = choose_operating_point(context.dir / "best.pt", original_images(plan.frames[plan.data.val_split]),
                                       positive, wanted.sensitivity, chosen_on=f"{plan.data.val_split} split")
    except MetricError as error:
        say(f"  no operating point: {error}")
        return None
    say(f"operating point: {positive} when its probability >= {point.threshold:.4f} "
        f"(validation sensitivity {point.figures['sensitivity']:.3f}, specificity {point.figures['specificity']:.3f})")
    return point.model_dump()


def _test(context: RunContext, plan: StagePlan, frame: pd.DataFrame) -> dict[str, Any]:
    """best.pt on the test split: test.json (and test_predictions.csv for a classifier)."""
    from lungscreen.training.testing import score_checkpoint, test_classifier, test_report

    best = context.dir / "best.pt"
    if not isinstance(plan.task, dict) and plan.task.kind == "multiclass":
        table, test = test_classifier(best, original_images(frame))
        write_atomic(context.dir / "test_predictions.csv", lambda tmp: table.to_csv(tmp, index=False, float_format="%.8g"))
    else:
        from lungscreen.models import load_checkpoint

        objective = _objective(context.config.stages[-1], plan, plan.frames[plan.data.train_split]["target"].to_numpy(),
                               load_checkpoint(best).model)
        store = _store_for(context, plan, plan.data.test_split)
        kept, patients = score_checkpoint(best, store, plan.task, objective)
        tested = store.frame
        test = {"images": int(len(tested)), "patients": int(tested["patient_id"].nunique()),
                "skipped": len(store.failures),
                "counts": {str(k): int(v) for k, v in tested["target_name"].value_counts().sort_index().items()}
                if "target_name" in tested else {},
                "figures": test_report(objective, kept, patients)}
    write_json(context.dir / "test.json", test)
    for name in ("accuracy", "balanced_accuracy", "sensitivity/COVID-19", "ppv/COVID-19", "macro_auc", "dice"):
        if name in test["figures"]:
            figure = test["figures"][name]
            say(f"test {name}: {figure['value']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}]")
    return test


def _finish(context: RunContext, stage_reports: list[dict], started: float) -> dict[str, Any]:
    config, env = context.config, context.env
    plan = context.prepared.stages[-1]
    summary: dict[str, Any] = {
        "run": str(context.dir), "config": config.name, "model": config.model.name,
        "task": task_name(plan.task), "classes": context.classes,
        "stages": stage_reports, "best": context.best, "stopped": context.stop_requested,
        "train_seconds": round(sum(r.get("train_seconds") or 0.0 for r in stage_reports), 2),
    }
    finished = env.is_zero and not context.stop_requested and context.best is not None
    supervised = config.stages[-1].objective == "supervised"  # a pre-training run has no answers to test
    if finished and supervised:
        summary["operating_point"] = _operating_point(context, plan)
    test_frame = plan.frames.get(plan.data.test_split, pd.DataFrame())
    if config.test and finished and supervised and not test_frame.empty:
        summary["test"] = _test(context, plan, test_frame)
    summary["wall_seconds_this_session"] = round(time.perf_counter() - started, 2)
    if env.is_zero:
        write_json(context.dir / "summary.json", summary)
        if context.tracker is not None:
            context.tracker.finish(summary)
    return summary
