"""One stage of a run: its loaders, its objective, the network it trains, and Lightning's fit.

:func:`run_stage` builds what one stage needs from its :class:`~lungscreen.training.prepare.StagePlan` -
datasets over the run's shared images with the stage's own targets, the balancing sampler, the objective
of its task (with the loss terms and heads the recipe adds), the learning rate (given, or Lightning's range
test) and the precision - trains it, and leaves ``final.pt`` and ``done.json`` in the stage's folder.
"""

from __future__ import annotations

import copy
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungscreen import interrupts
from lungscreen.errors import ConfigError, LungscreenError
from lungscreen.training.callbacks import make_callbacks
from lungscreen.training.config import StageConfig
from lungscreen.training.heads import unwrapped
from lungscreen.training.prepare import StagePlan, TaskSpec, alternation_groups, head_classes
from lungscreen.training.run_context import RunContext
from lungscreen.training.run_folder import read_json, say, write_json


def run_stage(context: RunContext, index: int, stage_dir: Path, model, plan: StagePlan,  # noqa: ANN001
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
    train_set, train_loader, val_loader = loaders(context, index, plan)
    objective = stage_objective(stage, plan, train_set.targets, model, seed=config.seed + index,
                                sources=site_names(train_set.frame))
    lr = stage.optimizer.lr
    if lr == "find" and stage.objective != "supervised":
        raise ConfigError(f"stages.{index}.optimizer.lr: the LR range test needs labels; give a rate for the "
                          f"{stage.objective} stage")
    if lr == "find":
        lr = _find_lr(context, index, stage_dir, model, objective, train_loader)
    precision = _choose_precision(context, stage_dir, model, stage, plan)
    trained = training_network(stage, plan, model, train_set.frame)
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


def training_network(stage: StageConfig, plan: StagePlan, model, train_frame: pd.DataFrame):  # noqa: ANN001, ANN201
    """What the stage trains: the model itself, or the model inside a training-only head (SimCLR's projection,
    a site adversary); the checkpoints store :func:`~lungscreen.training.heads.unwrapped`."""
    if stage.objective == "simclr":
        from lungscreen.training.contrastive import Pretrainer

        return Pretrainer(model, hidden_dim=stage.simclr.hidden_dim, out_dim=stage.simclr.out_dim)
    if stage.adversary is not None:
        from lungscreen.training.heads import SiteAdversary

        adversary = stage.adversary
        return SiteAdversary(model, sources=site_names(train_frame), classes=len(plan.task.classes),
                             class_conditional=adversary.class_conditional, hidden_dim=adversary.hidden_dim,
                             weight=adversary.weight, gamma=adversary.gamma, mode=adversary.mode)
    return model


def site_names(frame: pd.DataFrame) -> list[str]:
    """The sources a site adversary tells apart: those of the stage's training images, sorted."""
    return sorted(frame["source"].astype(str).unique())


def loaders(context: RunContext, index: int, plan: StagePlan):  # noqa: ANN202
    from torch.utils.data import DataLoader

    from lungscreen.training.augment import build_augment
    from lungscreen.training.data import ManifestDataset, collate
    from lungscreen.training.sampling import EpochSampler

    stage, data, env = context.config.stages[index], plan.data, context.env
    spec = context.spec(index).input
    train_store, val_store = context.store(plan, data.train_split), context.store(plan, data.val_split)
    if stage.objective == "simclr":
        from lungscreen.training.contrastive import TwoViewDataset

        views = {"min_scale": stage.simclr.min_scale, "rotation": stage.simclr.rotation}
        train_set = TwoViewDataset(train_store, stage.image_size, spec, plan.task, **views)
        val_set = TwoViewDataset(val_store, stage.image_size, spec, plan.task, **views)
    else:
        train_set = ManifestDataset(train_store, stage.image_size, spec, plan.task, build_augment(data.augment))
        val_set = ManifestDataset(val_store, stage.image_size, spec, plan.task)
    if stage.objective == "supervised":
        check_validation_classes(index, stage.name, plan.task, val_set.targets, data.val_split)
    classes = getattr(plan.task, "classes", ())
    positive = classes.index(data.balance.positive_class) if data.balance.positive_class in classes else None
    targets = alternation_groups(train_set.frame, plan.task, data.balance.heads) \
        if data.balance.method == "alternate" else train_set.targets
    method = data.balance.method if stage.objective == "supervised" else "none"  # no labels to balance
    sampler = EpochSampler(targets, method=method, batch_size=data.batch_size,
                           seed=int(np.random.SeedSequence([context.config.seed, index]).generate_state(1)[0]),
                           positive=positive, covid_percent=data.balance.covid_percent, rank=env.rank,
                           world_size=env.world_size, sources=train_set.frame["source"].astype(str).tolist(),
                           partial_sources=data.balance.partial_sources, partial_share=data.balance.partial_share,
                           source_weights=data.balance.source_weights)
    workers = data.num_workers
    # Workers leave SIGINT/SIGTERM to this process, which stops between batches and shuts them down.
    train_loader = DataLoader(train_set, batch_size=sampler.per_rank_batch, sampler=sampler, collate_fn=collate,
                              num_workers=workers, persistent_workers=False, drop_last=False,
                              worker_init_fn=_quiet_worker if workers else None)
    val_loader = DataLoader(val_set, batch_size=data.eval_batch_size, shuffle=False, collate_fn=collate,
                            num_workers=workers, worker_init_fn=_quiet_worker if workers else None)
    return train_set, train_loader, val_loader


def check_validation_classes(index: int, name: str, task: TaskSpec, targets: np.ndarray, split: str) -> None:
    """Refuse a classification stage whose validation images hold fewer than two of its classes: its
    monitor could not tell a model that learned from one that names the only class present.

    Raises:
        ConfigError: naming the stage and the validation counts per class.
    """
    if isinstance(task, dict) or task.kind != "multiclass":
        return
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=len(task.classes))
    if np.count_nonzero(counts) < 2:
        shown = ", ".join(f"{cls} {int(n)}" for cls, n in zip(task.classes, counts, strict=True))
        raise ConfigError(f"stages.{index} ({name}): its {split!r} images hold {shown}; a classifier cannot be "
                          f"validated on fewer than two classes (check the manifest's {split} split or the "
                          "stage's data)")


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


def stage_objective(stage: StageConfig, plan: StagePlan, train_targets: np.ndarray, model, *,  # noqa: ANN001, ANN202
                    seed: int = 0, sources: Sequence[str] = ()):
    """The stage's objective, with its class weights resolved on the training rows, the model's anchor grid
    (box heads), the stage's teacher forcing and its site adversary (over ``sources``)."""
    from lungscreen.training.losses import resolve_class_weights
    from lungscreen.training.objectives import TeacherForcing, build_objective

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
    objective = build_objective(plan.task, stage.loss, weights, grid=getattr(model, "grid", None),
                                teacher_forcing=forcing)
    if stage.adversary is not None:
        from lungscreen.training.heads import SiteAdversaryObjective

        return SiteAdversaryObjective(objective, sources, class_conditional=stage.adversary.class_conditional)
    return objective


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
