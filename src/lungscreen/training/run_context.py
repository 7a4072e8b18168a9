"""The state one run's stages share: its folder, its history, best.pt, and the images each stage reads.

A :class:`RunContext` lives for one ``train`` call. The stages append their epochs to ``metrics.csv``
through it, offer their best epochs for ``best.pt`` (only the stages validated like the last one may give
it: :meth:`RunContext.chooses_best`), and get their images from it: every (image list, preprocessing) is
read and preprocessed once per run and handed to each stage under that stage's own rows and targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lungscreen.errors import LungscreenError
from lungscreen.io.files import write_atomic
from lungscreen.models.inference_spec import Head, InferenceSpec, InputSpec, IntensityReference
from lungscreen.preprocessing.model_input import intensity_reference
from lungscreen.training.config import StageConfig, TrainConfig
from lungscreen.training.distributed import DistEnv
from lungscreen.training.heads import unwrapped
from lungscreen.training.prepare import Prepared, StagePlan, TaskSpec, head_classes, stage_views, task_name
from lungscreen.training.run_folder import read_json, say, terminal_stream, write_json


def is_finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


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
        self.stores: dict[tuple, Any] = {}  # the loaded images of every (image list, pipeline) of the run
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
            store = self.store(plan, plan.data.train_split)
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

    def store(self, plan: StagePlan, split: str):  # noqa: ANN201
        """The image store of one split of a stage's data, with that stage's own rows and targets.

        Stages reading the same images the same way share the loaded pictures (the key is the images and how
        they are prepared, never the task or the row count), and each gets them under its own rows: a
        supervised stage after a self-supervised one on the same split validates on its labels, not on the
        placeholder targets of the stage before.
        """
        from rich.console import Console
        from rich.progress import Progress

        from lungscreen.training.data import ImageStore

        frame = plan.frames[split]
        masks = needs_masks(plan.task)
        images = tuple(frame["image_path"].astype(str)), tuple(frame.get("mask_path", pd.Series(dtype=str)).astype(str))
        key = (images, plan.pipeline, plan.already_applied, masks, plan.data.cache_dir)  # pipelines hash
        stores = self.stores
        if key not in stores:
            store = ImageStore(frame, plan.pipeline, self.prepared.sizes, cache_dir=plan.data.cache_dir,
                               already_applied=plan.already_applied, with_masks=masks)
            terminal = Console(file=terminal_stream())  # drawn on the terminal, never into log.txt
            with Progress(console=terminal, transient=True, disable=not terminal.is_terminal) as progress:
                job = progress.add_task(f"loading {split} images", total=len(store))
                store.load_all(lambda i: progress.advance(job))
            if store.failures:
                report_skipped(self, split, store.failures)
            if store.frame.empty:
                raise LungscreenError(f"no usable {split!r} image ({len(store.failures)} skipped; see "
                                      f"{self.dir / 'skipped.csv'})")
            stores[key] = store
        return stores[key].with_rows(frame)


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


def report_skipped(context: RunContext, split: str, failures: list[tuple[str, str]]) -> None:
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
