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

Preparation lives in :mod:`~lungscreen.training.prepare`, the state the stages share in
:mod:`~lungscreen.training.run_context`, one stage in :mod:`~lungscreen.training.stage`, the end of a run
(operating point, test, summary) in :mod:`~lungscreen.training.testing`, the run folder's files and log in
:mod:`~lungscreen.training.run_folder`, the Lightning callbacks in :mod:`~lungscreen.training.callbacks` and
MLflow tracking in :mod:`~lungscreen.training.tracking`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from lungscreen import interrupts
from lungscreen.errors import ConfigError
from lungscreen.io.files import write_atomic
from lungscreen.training.config import TrainConfig, from_dict, to_raw
from lungscreen.training.distributed import DistEnv
from lungscreen.training.prepare import (
    Prepared,
    TaskSpec,
    build_initial_model,
    checkpoint_classes,
    checkpoint_of,
    head_classes,
    head_sizes,
    prepare,
    swap_head,
    task_name,
)
from lungscreen.training.run_context import RunContext
from lungscreen.training.run_folder import default_run_dir, log_only, quiet_lightning, read_json, run_log, say
from lungscreen.training.stage import run_stage
from lungscreen.training.testing import finish
from lungscreen.training.tracking import MlflowTracker


@dataclass
class RunResult:
    """What a finished (or pruned) run produced."""

    run_dir: Path
    best: dict[str, Any] | None
    test: dict[str, Any] | None
    summary: dict[str, Any]
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    stopped: bool = False


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
            log_only(stop.message())  # the terminal gets it from the command line's boundary
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
        report = run_stage(context, index, stage_dir, model, plan, offset, extra_callbacks, quiet)
        stage_reports.append(report)
        offset += stage.epochs
        if context.stop_requested:
            break
    summary = finish(context, stage_reports, started)
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
