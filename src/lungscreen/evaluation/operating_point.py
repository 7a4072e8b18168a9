"""Choosing a decision threshold on validation data, to be applied unchanged everywhere after.

A screening tool must say in advance how it decides: the threshold is chosen once, on the validation
split (or on the training sources when a source is held out), for a stated target (by default a COVID-19
sensitivity of 0.95: few missed cases, at whatever specificity that costs), and then applied to test and
to every later prediction. Choosing it on the test split would report a sensitivity nobody can rely on.

Example:
    >>> point = threshold_for_sensitivity([0, 0, 1, 1, 1, 0], [0.1, 0.4, 0.35, 0.8, 0.9, 0.2], 0.95)
    >>> point.threshold, point.sensitivity, round(point.specificity, 3)
    (0.35, 1.0, 0.667)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lungscreen.errors import MetricError


@dataclass(frozen=True)
class Threshold:
    """A threshold and what it reached where it was chosen."""

    threshold: float
    sensitivity: float
    specificity: float
    target: float

    def as_dict(self) -> dict[str, float]:
        return {"sensitivity": self.sensitivity, "specificity": self.specificity, "target_sensitivity": self.target}


def threshold_for_sensitivity(positive: np.ndarray, score: np.ndarray, target: float = 0.95) -> Threshold:
    """The highest threshold whose sensitivity (score >= threshold among positives) reaches ``target``:
    the most specific rule that still finds the share of cases asked for.

    Raises:
        MetricError: no positive or no negative example, NaN scores, or a target outside (0, 1].
    """
    from sklearn.metrics import roc_curve

    positive = np.asarray(positive).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    if not 0 < target <= 1:
        raise MetricError(f"target sensitivity must lie in (0, 1], got {target}")
    if not np.isfinite(score).all():
        raise MetricError(f"scores hold NaN or inf (first at row {int(np.flatnonzero(~np.isfinite(score))[0])})")
    if positive.all() or not positive.any():
        raise MetricError("choosing a threshold needs positive and negative examples; the set holds only "
                          + ("positives" if positive.any() else "negatives"))
    false_positive_rate, true_positive_rate, thresholds = roc_curve(positive, score)
    reaching = np.flatnonzero(true_positive_rate >= target - 1e-12)
    index = int(reaching[0])  # thresholds decrease: the first that reaches the target is the highest
    threshold = float(min(thresholds[index], 1.0))  # sklearn's first threshold is +inf (nothing positive)
    return Threshold(threshold, float(true_positive_rate[index]), float(1.0 - false_positive_rate[index]), target)
