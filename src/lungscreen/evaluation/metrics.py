"""The one metrics module: every figure lungscreen reports comes with a bootstrap confidence interval.

Small test sets are the norm in this field (paper 000 tests on 15 images), so a point estimate alone
misleads. :func:`bootstrap_ci` resamples the evaluated items (images, or patients when given groups) with
replacement and reports the percentile interval.

Example:
    >>> import numpy as np
    >>> estimate = bootstrap_ci(np.array([0.9, 0.95, 0.97, 0.92]), np.mean, seed=0)
    >>> round(estimate.value, 3), estimate.low <= estimate.value <= estimate.high
    (0.935, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A figure with its percentile bootstrap interval (``level`` e.g. 0.95)."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "level": self.level}


def bootstrap_ci(
    *arrays: np.ndarray,
    statistic: Callable[..., float] | None = None,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> Estimate:
    """Percentile bootstrap interval of ``statistic(*arrays)``.

    Args:
        *arrays: aligned per-item arrays (e.g. per-image Dice, or y_true and y_score).
        statistic: function of the arrays returning a float; defaults to the mean of the first array.
            A resample where it is undefined (NaN, e.g. no positives drawn) is left out.
        n_resamples: number of bootstrap resamples.
        level: coverage of the interval.
        seed: random seed, so a report is reproducible.
        groups: optional per-item cluster ids (patients); whole clusters are resampled, because images
            of one patient are not independent.
    """
    if len(arrays) == 0:
        raise ValueError("bootstrap_ci needs at least one array")
    single = statistic or _mean
    figures = bootstrap_many(*arrays, statistic=lambda *a: {"value": float(single(*a))}, n_resamples=n_resamples,
                             level=level, seed=seed, groups=groups)
    return figures["value"]


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def _clusters(groups: np.ndarray | None, size: int) -> list[np.ndarray]:
    if groups is None:
        return [np.array([i]) for i in range(size)]
    groups = np.asarray(groups)
    if len(groups) != size:
        raise ValueError("groups must align with the arrays")
    _, inverse = np.unique(groups, return_inverse=True)
    return [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)]


# --------------------------------------------------------------------------------------------------------
# Segmentation figures
# --------------------------------------------------------------------------------------------------------

def dice_iou(predicted: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None = None) -> tuple[float, float]:
    """Dice and IoU of two bool masks, pixels marked in ``ignore`` left out; both empty counts as perfect.

    Example:
        >>> a = np.zeros((4, 4), bool); a[:2] = True
        >>> b = np.zeros((4, 4), bool); b[:1] = True
        >>> tuple(round(v, 3) for v in dice_iou(a, b))
        (0.667, 0.5)
    """
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"masks differ in shape: {predicted.shape} and {truth.shape}")
    if ignore is not None:
        valid = ~np.asarray(ignore, bool)
        predicted, truth = predicted & valid, truth & valid
    intersection = int(np.count_nonzero(predicted & truth))
    total = int(np.count_nonzero(predicted)) + int(np.count_nonzero(truth))
    if total == 0:
        return 1.0, 1.0
    return 2.0 * intersection / total, intersection / (total - intersection)


# --------------------------------------------------------------------------------------------------------
# Classification figures
# --------------------------------------------------------------------------------------------------------

#: Per-class figures, each reported one-vs-rest for every class.
PER_CLASS = ("sensitivity", "specificity", "ppv", "npv", "f1", "dor", "auc")
#: Figures of the whole prediction.
OVERALL = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]`` (rows are the truth, as in scikit-learn)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank (Mann-Whitney) formula, ties counted half; NaN when one class is absent."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_figures(y_true: np.ndarray, y_score: np.ndarray, class_names: list[str] | tuple[str, ...],
                           y_pred: np.ndarray | None = None) -> dict[str, float]:
    """Point estimates of every classification figure lungscreen reports.

    Keys are ``accuracy``, ``balanced_accuracy`` (mean per-class sensitivity), ``macro_f1``, ``macro_auc``
    and, for each class ``C`` one-vs-rest, ``sensitivity/C``, ``specificity/C``, ``ppv/C``, ``npv/C``,
    ``f1/C``, ``dor/C`` (diagnostic odds ratio with the Haldane +0.5 correction when a cell is empty, so a
    perfect class gives a large finite number, not infinity) and ``auc/C``. A figure whose denominator is
    empty (no positives of a class) is NaN, never a made-up 0 or 1.

    Args:
        y_true: true class index per item.
        y_score: per-class probabilities, shape (items, classes).
        class_names: names of the classes, in index order.
        y_pred: predicted class per item; argmax of ``y_score`` by default.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_score = np.asarray(y_score, dtype=np.float64)
    k = len(class_names)
    if y_score.ndim != 2 or y_score.shape != (len(y_true), k):
        raise ValueError(f"y_score must have shape ({len(y_true)}, {k}), got {y_score.shape}")
    y_pred = y_score.argmax(axis=1) if y_pred is None else np.asarray(y_pred, dtype=np.int64)
    matrix = confusion_matrix(y_true, y_pred, k)
    total = matrix.sum()
    figures: dict[str, float] = {"accuracy": _ratio(np.trace(matrix), total)}
    for c, name in enumerate(class_names):
        tp = matrix[c, c]
        fn = matrix[c].sum() - tp
        fp = matrix[:, c].sum() - tp
        tn = total - tp - fn - fp
        sensitivity, ppv = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
        cells = np.array([tp, fn, fp, tn], dtype=np.float64)
        if (cells == 0).any():
            cells = cells + 0.5
        figures[f"sensitivity/{name}"] = sensitivity
        figures[f"specificity/{name}"] = _ratio(tn, tn + fp)
        figures[f"ppv/{name}"] = ppv
        figures[f"npv/{name}"] = _ratio(tn, tn + fn)
        figures[f"f1/{name}"] = _ratio(2 * tp, 2 * tp + fp + fn)
        figures[f"dor/{name}"] = float((cells[0] * cells[3]) / (cells[1] * cells[2])) if tp + fn and fp + tn else float("nan")
        figures[f"auc/{name}"] = _binary_auc(y_true == c, y_score[:, c])
    present = [name for c, name in enumerate(class_names) if matrix[c].sum() > 0]
    figures["balanced_accuracy"] = float(np.mean([figures[f"sensitivity/{n}"] for n in present])) if present else float("nan")
    figures["macro_f1"] = float(np.mean([figures[f"f1/{n}"] for n in present])) if present else float("nan")
    aucs = [figures[f"auc/{n}"] for n in present if np.isfinite(figures[f"auc/{n}"])]
    figures["macro_auc"] = float(np.mean(aucs)) if aucs else float("nan")
    return figures


def multilabel_figures(y_true: np.ndarray, y_score: np.ndarray, label_names: list[str] | tuple[str, ...],
                       threshold: float = 0.5) -> dict[str, float]:
    """Per-label figures of independent (sigmoid) outputs, each label a yes/no question of its own.

    Keys: ``auc/L``, ``sensitivity/L``, ``specificity/L``, ``ppv/L``, ``f1/L`` (at ``threshold``) for every
    label ``L``, and ``macro_auc`` over the labels whose AUC is defined (both answers present).

    Args:
        y_true: 0/1 per item and label, shape (items, labels).
        y_score: probability per item and label, same shape.
        label_names: names of the labels, in column order.
        threshold: probability at or above which a label is called present.
    """
    y_true = np.asarray(y_true, dtype=np.float64) > 0.5
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_score.shape != y_true.shape or y_score.ndim != 2 or y_score.shape[1] != len(label_names):
        raise ValueError(f"y_true and y_score must both have shape (items, {len(label_names)}), "
                         f"got {y_true.shape} and {y_score.shape}")
    figures: dict[str, float] = {}
    for column, name in enumerate(label_names):
        truth, called = y_true[:, column], y_score[:, column] >= threshold
        tp, fp = int((truth & called).sum()), int((~truth & called).sum())
        fn, tn = int((truth & ~called).sum()), int((~truth & ~called).sum())
        figures[f"auc/{name}"] = _binary_auc(truth, y_score[:, column])
        figures[f"sensitivity/{name}"] = _ratio(tp, tp + fn)
        figures[f"specificity/{name}"] = _ratio(tn, tn + fp)
        figures[f"ppv/{name}"] = _ratio(tp, tp + fp)
        figures[f"f1/{name}"] = _ratio(2 * tp, 2 * tp + fp + fn)
    aucs = [figures[f"auc/{n}"] for n in label_names if np.isfinite(figures[f"auc/{n}"])]
    figures["macro_auc"] = float(np.mean(aucs)) if aucs else float("nan")
    return figures


def bootstrap_many(*arrays: np.ndarray, statistic: Callable[..., dict[str, float]], n_resamples: int = 1000,
                   level: float = 0.95, seed: int = 0, groups: np.ndarray | None = None) -> dict[str, Estimate]:
    """Like :func:`bootstrap_ci` for a statistic returning several named figures at once.

    One set of resamples serves every figure, so the intervals of, say, sensitivity and PPV come from the
    same resampled test sets, and a report costs one bootstrap instead of one per figure.
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    size = len(arrays[0])
    if size == 0:
        raise ValueError("bootstrap needs at least one item")
    if any(len(a) != size for a in arrays):
        raise ValueError("bootstrap arrays must have the same length")
    point = statistic(*arrays)
    rng = np.random.default_rng(seed)
    clusters = _clusters(groups, size)
    samples: dict[str, list[float]] = {name: [] for name in point}
    for _ in range(n_resamples):
        chosen = rng.integers(0, len(clusters), len(clusters))
        index = np.concatenate([clusters[i] for i in chosen])
        for name, value in statistic(*(a[index] for a in arrays)).items():
            if np.isfinite(value):
                samples[name].append(float(value))
    tail = (1.0 - level) / 2.0
    result = {}
    for name, value in point.items():
        if samples[name]:
            low, high = np.quantile(samples[name], [tail, 1.0 - tail])
            result[name] = Estimate(float(value), float(low), float(high), level)
        else:
            result[name] = Estimate(float(value), float("nan"), float("nan"), level)
    return result


def classification_report(y_true: np.ndarray, y_score: np.ndarray, class_names: list[str] | tuple[str, ...], *,
                          groups: np.ndarray | None = None, n_resamples: int = 1000, level: float = 0.95,
                          seed: int = 0) -> dict[str, Estimate]:
    """Every figure of :func:`classification_figures` with its bootstrap interval.

    Args:
        y_true: true class index per image.
        y_score: per-class probabilities, shape (images, classes).
        class_names: class names in index order.
        groups: patient id per image; whole patients are resampled (their images are not independent).
        n_resamples: bootstrap resamples.
        level: coverage of the intervals (0.95 for 95 %).
        seed: random seed of the resampling.

    Example:
        >>> report = classification_report([0, 1, 1], [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], ["a", "b"],
        ...                                n_resamples=50)
        >>> round(report["accuracy"].value, 3)
        0.667
    """
    names = list(class_names)

    def statistic(truth: np.ndarray, score: np.ndarray) -> dict[str, float]:
        return classification_figures(truth, score, names)

    return bootstrap_many(np.asarray(y_true), np.asarray(y_score, dtype=np.float64), statistic=statistic,
                          n_resamples=n_resamples, level=level, seed=seed, groups=groups)
