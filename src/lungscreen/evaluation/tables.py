"""Figures of a scored table (one row per image, as the scoring runner writes it), overall and per source.

A figure pooled over sources of which some hold one class only measures whether the model knows the
source, not the disease (all of one source COVID-19, all of another normal: a source detector scores
well). So every report carries the per-source figures, marks the sources that hold one class only (their
AUC and specificity or sensitivity are undefined there), and gives the pooled figure only beside them.

Every figure has a 95 % interval from a bootstrap that resamples whole patients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from lungscreen.evaluation.metrics import Estimate, bootstrap_many, classification_figures


def figures_of(table: pd.DataFrame, classes: Sequence[str], *, n_resamples: int = 1000,
               seed: int = 0) -> dict[str, Estimate]:
    """Every classification figure of the scored rows with its interval (patients resampled).

    Threshold figures use the table's ``prediction`` (the model's operating point when it has one); AUCs
    use the probabilities. Rows need ``target``, ``patient_id``, ``prediction`` and a column per class.
    """
    classes = list(classes)
    truth = table["target"].to_numpy(dtype=np.int64)
    scores = table[classes].to_numpy(dtype=np.float64)
    predicted = np.array([classes.index(name) for name in table["prediction"]], dtype=np.int64)

    def statistic(index: np.ndarray) -> dict[str, float]:
        return classification_figures(truth[index], scores[index], classes, y_pred=predicted[index])

    return bootstrap_many(np.arange(len(table)), statistic=statistic, n_resamples=n_resamples, seed=seed,
                          groups=table["patient_id"].astype(str).to_numpy())


def per_source(table: pd.DataFrame, classes: Sequence[str], *, n_resamples: int = 1000,
               seed: int = 0) -> list[dict[str, Any]]:
    """One entry per source: its size, the classes present, whether it holds one class only, its figures."""
    entries = []
    for source, rows in table.groupby("source", sort=True):
        present = sorted({classes[int(t)] for t in rows["target"]}, key=list(classes).index)
        entries.append({
            "source": str(source), "images": int(len(rows)), "patients": int(rows["patient_id"].nunique()),
            "classes_present": present, "single_class": len(present) == 1,
            "figures": {name: value.as_dict() for name, value in
                        figures_of(rows, classes, n_resamples=n_resamples, seed=seed).items()},
        })
    return entries


def composition(table: pd.DataFrame) -> pd.DataFrame:
    """Images per source and class: what was tested (paper 000's Table I, for one split)."""
    return pd.crosstab(table["source"], table["truth"], margins=True, margins_name="all")
