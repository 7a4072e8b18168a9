"""The end of a run: best.pt scored on the test split through its own inference spec, every figure with a
95 % interval that resamples whole patients, and a per-image table of what it predicted.

Reported, never used to choose: recipes, thresholds and epochs are chosen on validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungscreen.io.files import write_atomic
from lungscreen.training.prepare import TaskSpec


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


def write_predictions(path: Path, frame: pd.DataFrame, kept: dict[str, np.ndarray], classes: Sequence[str]) -> None:
    """One row per test image: what it is, and best.pt's probability for each class."""
    table = frame.loc[kept["row"], ["image_path", "patient_id", "source", "target_name"]].reset_index(drop=True)
    table = table.rename(columns={"target_name": "truth"})
    for column, name in enumerate(classes):
        table[name] = kept["probs"][:, column]
    write_atomic(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.8g"))
