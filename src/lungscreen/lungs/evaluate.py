"""Dice and IoU of a lung segmenter on held-out patients, per source and mask convention, with bootstrap CIs.

Every prediction is scored against its own row's reference at the image's size, "Ignore" pixels left out.
The U-Net is scored on the output channel of the row's convention (a heart-excluded prediction is never
compared with a mask that includes the lungs behind the heart); the classical method has one output and
is scored against whatever the row draws, which the report says. Intervals resample patients
(:func:`lungscreen.evaluation.metrics.bootstrap_ci` with patient groups), since images of one patient are
not independent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from lungscreen.data.splits import with_splits
from lungscreen.errors import LeakageError, LungscreenError
from lungscreen.evaluation.metrics import Estimate, bootstrap_ci, dice_iou
from lungscreen.io.images import read_image, read_mask_layers
from lungscreen.lungs.data import mask_rows
from lungscreen.progress import progress_or_quiet


@dataclass(frozen=True)
class GroupResult:
    """Scores of one (source, convention) group."""

    source: str
    convention: str
    images: int
    patients: int
    dice: Estimate
    iou: Estimate

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "convention": self.convention, "images": self.images,
                "patients": self.patients, "dice": self.dice.as_dict(), "iou": self.iou.as_dict()}


@dataclass
class EvaluationReport:
    """Per-image scores and their summaries.

    Attributes:
        method: ``unet`` or ``classical``.
        split: the split evaluated.
        per_image: one row per image (image_path, source, convention, patient_id, dice, iou).
        groups: per (source, convention).
        overall: mean over all images (patients resampled).
        macro: mean of the group means (each source counts once, whatever its size).
        skipped: (path, reason) of rows that could not be scored.
    """

    method: str
    split: str
    per_image: pd.DataFrame
    groups: list[GroupResult]
    overall: dict[str, Estimate]
    macro_dice: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    model: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "model": self.model, "split": self.split, "images": len(self.per_image),
                "overall": {key: value.as_dict() for key, value in self.overall.items()},
                "macro_dice": self.macro_dice, "groups": [g.as_dict() for g in self.groups],
                "skipped": len(self.skipped)}


def evaluation_rows(frame: pd.DataFrame, split: str | None = "test", default_convention: str | None = None,
                    seed: int = 0) -> pd.DataFrame:
    """The mask rows to score: ``split`` of the manifest's patient-level splits (None: every row)."""
    rows = with_splits(mask_rows(frame, default_convention), seed=seed)
    if split:
        rows = rows[rows["split"] == split]
    if rows.empty:
        raise LungscreenError(f"no mask rows in split {split!r} to evaluate")
    return rows.reset_index(drop=True)


def check_held_out(segmenter, rows: pd.DataFrame) -> None:
    """Refuse to score a trained model on the patients it was trained on."""
    trained = getattr(segmenter, "train_patients", set())
    overlap = sorted(trained & set(rows["patient_id"].astype(str)))
    if overlap:
        raise LeakageError(f"{len(overlap)} evaluated patient(s) were in the lung model's training set "
                           f"(e.g. {overlap[0]}); evaluate on held-out patients (the test split)")


def evaluate_segmenter(segmenter, rows: pd.DataFrame, *, batch_size: int = 16, progress: bool = True,
                       n_resamples: int = 1000, seed: int = 0, split: str = "test") -> EvaluationReport:
    """Score ``segmenter`` on mask ``rows`` (from :func:`evaluation_rows`).

    Raises:
        LeakageError: a trained model evaluated on its own training patients.
    """
    check_held_out(segmenter, rows)
    scores, skipped = [], []
    records = rows.to_dict("records")
    with progress_or_quiet(progress) as bar:
        task = bar.add_task(f"evaluating {segmenter.method}", total=len(records))
        for start in range(0, len(records), batch_size):
            chunk, images, references = [], [], []
            for row in records[start:start + batch_size]:
                try:
                    image = read_image(row["image_path"]).pixels
                    reference = read_mask_layers(row["mask_path"], image.shape)
                except LungscreenError as error:
                    skipped.append((row["image_path"], str(error)))
                    continue
                if not reference.lung.any():
                    skipped.append((row["mask_path"], "empty reference mask"))
                    continue
                chunk.append(row)
                images.append(image)
                references.append(reference)
            for convention in sorted({row["mask_convention"] for row in chunk}):
                index = [i for i, row in enumerate(chunk) if row["mask_convention"] == convention]
                masks = _segment(segmenter, [images[i] for i in index], convention)
                for i, mask in zip(index, masks, strict=True):
                    dice, iou = dice_iou(mask, references[i].lung, references[i].ignore)
                    row = chunk[i]
                    scores.append({"image_path": row["image_path"], "source": row["source"], "convention": convention,
                                   "patient_id": row["patient_id"], "dice": dice, "iou": iou})
            bar.advance(task, len(records[start:start + batch_size]))
    per_image = pd.DataFrame(scores, columns=["image_path", "source", "convention", "patient_id", "dice", "iou"])
    if per_image.empty:
        raise LungscreenError(f"no image could be scored ({len(skipped)} skipped, e.g. {skipped[:1]})")
    return summarize(per_image, segmenter, skipped, n_resamples=n_resamples, seed=seed, split=split)


def _segment(segmenter, images: list[np.ndarray], convention: str) -> list[np.ndarray]:
    if segmenter.method == "unet":
        return segmenter.segment_batch(images, convention=convention)
    return segmenter.segment_batch(images)


def summarize(per_image: pd.DataFrame, segmenter, skipped: list, *, n_resamples: int = 1000, seed: int = 0,
              split: str = "test") -> EvaluationReport:
    """Group means with patient-resampled bootstrap intervals."""
    def interval(values: pd.Series, patients: pd.Series) -> Estimate:
        return bootstrap_ci(values.to_numpy(), groups=patients.to_numpy(), n_resamples=n_resamples, seed=seed)

    groups = [
        GroupResult(source, convention, len(group), group["patient_id"].nunique(),
                    interval(group["dice"], group["patient_id"]), interval(group["iou"], group["patient_id"]))
        for (source, convention), group in per_image.groupby(["source", "convention"], sort=True)
    ]
    overall = {"dice": interval(per_image["dice"], per_image["patient_id"]),
               "iou": interval(per_image["iou"], per_image["patient_id"])}
    return EvaluationReport(segmenter.method, split, per_image, groups, overall,
                            float(np.mean([g.dice.value for g in groups])), skipped,
                            getattr(segmenter, "weights_sha256", None))
