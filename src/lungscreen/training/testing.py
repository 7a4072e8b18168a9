"""The end of a run: the operating point chosen on validation, then best.pt scored on the test split through
its own inference spec, every figure with a 95 % interval that resamples whole patients, per source too,
and a per-image table of what it predicted.

Reported, never used to choose: recipes, thresholds and epochs are chosen on validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungscreen.models import OperatingPoint, load_checkpoint, save_checkpoint
from lungscreen.training.prepare import TaskSpec


def choose_operating_point(path: Path, frame: pd.DataFrame, positive_class: str, sensitivity: float,
                           chosen_on: str) -> OperatingPoint:
    """The threshold on ``positive_class``'s probability that reaches ``sensitivity`` on ``frame`` (the
    validation rows), written into the checkpoint's inference spec; later predictions apply it unchanged.

    Raises:
        MetricError: the validation rows hold no positive or no negative image.
    """
    from lungscreen.evaluation.operating_point import threshold_for_sensitivity
    from lungscreen.inference.predict import Predictor
    from lungscreen.inference.scoring import score_rows, scored

    table = scored(score_rows(Predictor(path), frame))
    chosen = threshold_for_sensitivity(table["truth"] == positive_class, table[positive_class], sensitivity)
    point = OperatingPoint(positive_class=positive_class, threshold=chosen.threshold,
                           rule=f"sensitivity/{positive_class} >= {sensitivity:g}", chosen_on=chosen_on,
                           figures=chosen.as_dict())
    checkpoint = load_checkpoint(path)
    save_checkpoint(path, checkpoint.model, spec=checkpoint.spec.with_operating_point(point),
                    extra=checkpoint.meta.get("extra"))
    return point


def test_classifier(path: Path, frame: pd.DataFrame, *, n_resamples: int = 1000) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The scored test table and its report: overall figures and per source, each with intervals."""
    from lungscreen.evaluation.tables import figures_of, per_source
    from lungscreen.inference.predict import Predictor
    from lungscreen.inference.scoring import score_rows, scored

    predictor = Predictor(path)
    table = score_rows(predictor, frame)
    rows = scored(table)
    classes = predictor.class_names
    report = {"images": int(len(rows)), "patients": int(rows["patient_id"].nunique()),
              "skipped": int((table["error"] != "").sum()),
              "counts": {str(k): int(v) for k, v in rows["truth"].value_counts().sort_index().items()},
              "operating_point": predictor.spec.operating_point.model_dump() if predictor.spec.operating_point else None,
              "figures": {k: v.as_dict() for k, v in figures_of(rows, classes, n_resamples=n_resamples).items()},
              "per_source": per_source(rows, classes, n_resamples=n_resamples)}
    return table, report


def score_checkpoint(path: Path, store, task: TaskSpec, objective, *,  # noqa: ANN001
                     batch_size: int = 64) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """What ``objective`` keeps of a checkpoint's outputs on a loaded store's rows, and the patient of every
    image, through the checkpoint's own inference spec."""
    import torch
    from torch.utils.data import DataLoader

    from lungscreen.models import load_checkpoint
    from lungscreen.training.data import ManifestDataset, collate
    from lungscreen.training.module import channels_last

    checkpoint = load_checkpoint(path)
    dataset = ManifestDataset(store, checkpoint.spec.input.size, checkpoint.spec.input, task)
    kept: list[dict[str, np.ndarray]] = []
    model = checkpoint.model.to(memory_format=torch.channels_last)
    offset = 0
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            part = objective.keep(model(channels_last(batch["image"])), batch)
            kept.append({key: value + offset if key.endswith("row") else value for key, value in part.items()})
            offset += len(batch["image"])
    merged = {key: np.concatenate([k[key] for k in kept if key in k]) for key in {key for k in kept for key in k}}
    return merged, store.frame["patient_id"].astype(str).to_numpy()


def test_report(objective, kept: dict[str, np.ndarray], patients: np.ndarray, *, n_resamples: int = 1000,  # noqa: ANN001
                seed: int = 0) -> dict[str, Any]:
    """Every figure of the objective with its 95 % bootstrap interval, whole patients resampled."""
    from lungscreen.evaluation.metrics import bootstrap_many
    from lungscreen.training.objectives import MultitaskObjective, head_of

    if isinstance(objective, MultitaskObjective):
        report: dict[str, Any] = {}
        for name, head in objective.heads.items():
            own = head_of(kept, name)
            if own:
                report.update({f"{name}/{key}": value for key, value in test_report(head, own, patients).items()})
        return report
    rows = kept["row"]

    def statistic(index: np.ndarray) -> dict[str, float]:
        return objective.figures({key: value[index] for key, value in kept.items()})

    figures = bootstrap_many(np.arange(len(rows)), statistic=statistic, n_resamples=n_resamples, seed=seed,
                             groups=patients[rows])
    return {key: value.as_dict() for key, value in figures.items()}
