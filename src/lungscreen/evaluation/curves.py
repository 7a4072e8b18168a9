"""Curves to plot (ROC, precision-recall, reliability) and the numbers that sum them up (AUC, ECE).

Thin wrappers over scikit-learn that check their inputs first (:mod:`lungscreen.evaluation.checks`):
scikit-learn answers a one-class test set with a warning and NaN, and NaN scores with an error naming no
row; these raise :class:`~lungscreen.errors.MetricError` saying what is missing and where. scikit-learn is
imported on first use: it takes seconds to load, and training imports this module long before any figure.

Example:
    >>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> fpr, tpr, thresholds = roc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    >>> fpr.tolist(), tpr.tolist()
    ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
"""

from __future__ import annotations

import math

import numpy as np

from lungscreen.errors import MetricError
from lungscreen.evaluation import checks


def auc(y_true_binary: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of one yes/no question: the chance a random positive outscores a random negative, ties half.

    The strict entry point: a test set holding one class only raises rather than returning NaN, so whoever
    asks for an AUC learns why there is none. :func:`~lungscreen.evaluation.metrics.classification_figures`
    keeps such an AUC as NaN instead, so the bootstrap can leave out resamples where it is undefined.

    Args:
        y_true_binary: 0/1 (or bool) per item, 1 the positive class.
        score: any score ordering the items by how positive they look (probability, logit).

    Raises:
        MetricError: one class only, NaN or inf scores, arrays of different lengths.
    """
    truth, score = _binary_inputs(y_true_binary, score)
    checks.both_classes(truth, "AUC")
    return _auc(truth, score)


def roc(y_true_binary: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve, for plotting: false- and true-positive rate at each threshold.

    Thresholds where the curve only runs straight on are dropped (scikit-learn's ``drop_intermediate``),
    which leaves the plot and the area unchanged.

    Returns:
        ``(fpr, tpr, thresholds)``, thresholds decreasing; the first is ``inf`` (nothing called positive),
        so the curve runs from (0, 0) to (1, 1).

    Raises:
        MetricError: as :func:`auc`; without both classes one of the two rates is undefined.
    """
    truth, score = _binary_inputs(y_true_binary, score)
    checks.both_classes(truth, "a ROC curve")
    from sklearn.metrics import roc_curve

    with checks.trusted():
        fpr, tpr, thresholds = roc_curve(truth, score)
    return fpr, tpr, thresholds


def precision_recall(y_true_binary: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The precision-recall curve, for plotting: what a screen finds against how often its alarms are right.

    Returns:
        ``(precision, recall, thresholds)`` as scikit-learn gives them: thresholds increasing, and
        precision and recall one longer, ending at the point (recall 0, precision 1) that has no threshold.

    Raises:
        MetricError: no positives (recall is undefined), NaN or inf scores, arrays of different lengths.
    """
    truth, score = _binary_inputs(y_true_binary, score)
    if not truth.any():
        raise MetricError(f"a precision-recall curve needs positives; this test set holds only negatives "
                          f"({len(truth)} items)")
    from sklearn.metrics import precision_recall_curve

    with checks.trusted():
        precision, recall, thresholds = precision_recall_curve(truth, score)
    return precision, recall, thresholds


def reliability(correct: np.ndarray, confidence: np.ndarray,
                bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reliability diagram, for plotting: in each confidence bin, how confident and how often right.

    A calibrated model is right 80 % of the time when it says 0.8, so its points lie on the diagonal.
    Bins are equal-width over [0, 1], each holding ``(low, high]`` (the first also 0), as scikit-learn's
    ``calibration_curve``.

    Args:
        correct: 0/1 (or bool) per item, whether the prediction was right.
        confidence: the probability the model gave its prediction, in [0, 1].
        bins: number of equal-width bins.

    Returns:
        ``(mean confidence, accuracy, count)`` per bin, each of length ``bins``; the first two are NaN in
        an empty bin (a plot skips those points).

    Raises:
        MetricError: NaN, inf or values outside [0, 1], arrays of different lengths, no items.
    """
    truth = checks.binary(correct, "correct")
    confidence = checks.scores(confidence, "confidence", ndim=1, unit=True)
    checks.aligned(truth, confidence)
    if len(truth) == 0:
        raise MetricError("a reliability diagram needs at least one item")
    return _reliability(truth, confidence, _bins(bins))


def expected_calibration_error(y_true: np.ndarray, y_score: np.ndarray, bins: int = 10) -> float:
    """Top-label expected calibration error: how far confidence and accuracy part, weighted by bin size.

    Each item's confidence is its highest probability and it is correct when that class is the truth; the
    ECE is the mean over equal-width confidence bins of ``|accuracy - mean confidence|``, each bin weighted
    by its share of the items (:func:`reliability`). 0 is perfectly calibrated; an overconfident model that
    says 0.9 and is right half the time scores 0.4.

    Args:
        y_true: true class index per item.
        y_score: per-class probabilities, shape (items, classes); for a yes/no question pass ``[1 - p, p]``.
        bins: number of equal-width confidence bins.

    Raises:
        MetricError: NaN, inf or values outside [0, 1], a wrong shape, labels outside the classes, no items.

    Example:
        >>> round(expected_calibration_error([0, 1, 1, 1], [[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.2, 0.8]]), 3)
        0.3
    """
    score = checks.scores(y_score, ndim=2, unit=True)
    truth = checks.labels(y_true, score.shape[1], size=len(score))
    if len(truth) == 0:
        raise MetricError("the expected calibration error needs at least one item")
    return top_label_ece(truth, score, _bins(bins))


def top_label_ece(truth: np.ndarray, score: np.ndarray, bins: int) -> float:
    """:func:`expected_calibration_error` of inputs already checked (the figure dicts call this per resample)."""
    if len(truth) == 0:
        return math.nan
    mean_confidence, accuracy, count = _reliability(score.argmax(axis=1) == truth, score.max(axis=1), bins)
    filled = count > 0
    return float(np.sum(count[filled] * np.abs(accuracy[filled] - mean_confidence[filled])) / count.sum())


def aucs_or_nan(truth: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Per-column ROC AUC of checked (items, columns) answers and scores, NaN where a column lacks a class.

    The figure dicts' lenient form of :func:`auc`. The defined columns go to scikit-learn in one call: its
    input validation costs more than the area itself, and the bootstrap pays it on every resample.
    """
    positives = np.count_nonzero(truth, axis=0)
    defined = (positives > 0) & (positives < len(truth))
    areas = np.full(truth.shape[1], math.nan)
    if defined.sum() == 1:
        column = int(np.flatnonzero(defined)[0])
        areas[column] = _auc(truth[:, column], score[:, column])
    elif defined.any():
        from sklearn.metrics import roc_auc_score

        with checks.trusted():
            areas[defined] = roc_auc_score(truth[:, defined], score[:, defined], average=None)
    return areas


def _auc(truth: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    with checks.trusted():
        return float(roc_auc_score(truth, score))


def _binary_inputs(y_true_binary: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth = checks.binary(y_true_binary, "y_true_binary")
    values = checks.scores(score, "scores", ndim=1)
    checks.aligned(truth, values)
    return truth, values


def _bins(bins: int) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 1:
        raise MetricError(f"bins must be a positive whole number, got {bins!r}")
    return int(bins)


def _reliability(correct: np.ndarray, confidence: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin mean confidence, accuracy and count; scikit-learn gives the first two for the filled bins."""
    from sklearn.calibration import calibration_curve

    with checks.trusted():
        accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=bins, strategy="uniform")
    # calibration_curve returns no counts; bin the same way it does (np.searchsorted on the inner edges).
    edges = np.linspace(0.0, 1.0, bins + 1)
    count = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=bins)
    filled = count > 0
    if filled.sum() != len(accuracy):
        raise RuntimeError("scikit-learn's calibration_curve binned differently than expected")
    per_bin = np.full((2, bins), math.nan)
    per_bin[0, filled], per_bin[1, filled] = mean_confidence, accuracy
    return per_bin[0], per_bin[1], count
