"""The one metrics module: every figure lungscreen reports, and its bootstrap confidence interval.

Small test sets are the norm in this field (paper 000 tests on 15 images), so a point estimate alone
misleads: :func:`classification_report` and :func:`bootstrap_ci` resample the evaluated items (whole
patients when given groups) and report the percentile interval. Counts, areas and curves come from
scikit-learn; what this module adds is honesty about what a test set cannot tell:

* in the figure dicts, a figure whose denominator is empty (PPV with nothing called positive, the AUC of a
  class absent from the set) is NaN, never a made-up 0 or 1; the bootstrap leaves out resamples where it
  is NaN, and an :class:`Estimate` of a figure undefined on the whole set prints as ``undefined``;
* the strict entry points (:func:`auc`, :func:`roc`, :func:`precision_recall`) raise :class:`MetricError`
  instead, saying which class is missing;
* NaN or infinite probabilities, and arrays of the wrong shape, raise :class:`MetricError` everywhere,
  naming the first bad row.

The resampling lives in :mod:`lungscreen.evaluation.bootstrap`, the curves, AUC and calibration error in
:mod:`lungscreen.evaluation.curves`; both are re-exported here, so this module is the one to import.

Example:
    >>> import numpy as np
    >>> estimate = bootstrap_ci(np.array([0.9, 0.95, 0.97, 0.92]), statistic=np.mean, seed=0)
    >>> round(estimate.value, 3), estimate.low <= estimate.value <= estimate.high
    (0.935, True)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from lungscreen.errors import MetricError
from lungscreen.evaluation import checks
from lungscreen.evaluation.bootstrap import Estimate, bootstrap_ci, bootstrap_many
from lungscreen.evaluation.curves import (
    auc,
    aucs_or_nan,
    expected_calibration_error,
    precision_recall,
    reliability,
    roc,
    top_label_ece,
)

__all__ = [
    "OVERALL", "PER_CLASS", "Estimate", "MetricError", "auc", "bootstrap_ci", "bootstrap_many",
    "classification_figures", "classification_report", "confusion_matrix", "dice_iou",
    "expected_calibration_error", "multilabel_figures", "precision_recall", "reliability", "roc",
]

#: Per-class figures, each reported one-vs-rest for every class.
PER_CLASS = ("sensitivity", "specificity", "ppv", "npv", "f1", "dor", "auc")
#: Figures of the whole prediction.
OVERALL = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece")
#: Confidence bins of the ``ece`` in :func:`classification_figures`.
ECE_BINS = 10


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
        raise MetricError(f"masks differ in shape: {predicted.shape} and {truth.shape}")
    if ignore is not None:
        valid = ~np.asarray(ignore, bool)
        if valid.shape != truth.shape:
            raise MetricError(f"the ignore mask has shape {valid.shape}, the masks {truth.shape}")
        predicted, truth = predicted & valid, truth & valid
    intersection = int(np.count_nonzero(predicted & truth))
    total = int(np.count_nonzero(predicted)) + int(np.count_nonzero(truth))
    if total == 0:
        return 1.0, 1.0
    return 2.0 * intersection / total, intersection / (total - intersection)


# --------------------------------------------------------------------------------------------------------
# Classification figures
# --------------------------------------------------------------------------------------------------------

def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]``, rows the truth as in scikit-learn, a row and column for every class.

    Example:
        >>> confusion_matrix([0, 0, 1, 2], [0, 1, 1, 1], 3).tolist()
        [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    """
    truth = checks.labels(y_true, num_classes)
    called = checks.labels(y_pred, num_classes, "y_pred", size=len(truth), other="y_true")
    return _confusion(truth, called, num_classes)


def classification_figures(y_true: np.ndarray, y_score: np.ndarray, class_names: list[str] | tuple[str, ...],
                           y_pred: np.ndarray | None = None) -> dict[str, float]:
    """Point estimates of every classification figure lungscreen reports.

    Keys are ``accuracy``, ``balanced_accuracy`` (mean sensitivity over the classes present), ``macro_f1``
    (over the classes present), ``macro_auc`` (over the classes whose AUC is defined), ``ece`` (top-label
    expected calibration error of ``y_score`` in 10 bins, see :func:`expected_calibration_error`) and, for
    each class ``C`` one-vs-rest, ``sensitivity/C``, ``specificity/C``, ``ppv/C``, ``npv/C``, ``f1/C``,
    ``dor/C`` and ``auc/C``.

    A figure whose denominator is empty is NaN, never a made-up 0 or 1: sensitivity and AUC of a class absent
    from the set, PPV of a class never predicted. This is the lenient form the bootstrap needs (it leaves
    out resamples where a figure is NaN); :func:`auc` is the strict entry point that raises instead. The
    diagnostic odds ratio ``(TP·TN)/(FP·FN)`` adds 0.5 to every cell when one is empty (Haldane), so a
    perfect class gives a large finite number rather than infinity; it is NaN when the class is absent or
    is everything.

    Args:
        y_true: true class index per item.
        y_score: per-class probabilities, shape (items, classes).
        class_names: names of the classes, in index order.
        y_pred: predicted class per item; argmax of ``y_score`` by default. The ``ece`` always judges the
            argmax, the prediction the probabilities state.

    Raises:
        MetricError: NaN, inf or values outside [0, 1] in ``y_score``, a wrong shape, labels outside the
            classes, no items.
    """
    names = list(class_names)
    k = len(names)
    score = checks.scores(y_score, columns=k, unit=True)
    truth = checks.labels(y_true, k, size=len(score))
    if len(truth) == 0:
        raise MetricError("classification figures need at least one item")
    called = score.argmax(axis=1) if y_pred is None else checks.labels(y_pred, k, "y_pred", size=len(truth))
    matrix = _confusion(truth, called, k)
    total = int(matrix.sum())
    figures: dict[str, float] = {"accuracy": _ratio(np.trace(matrix), total)}
    areas = aucs_or_nan(truth[:, None] == np.arange(k), score)
    for c, name in enumerate(names):
        tp = int(matrix[c, c])
        fn = int(matrix[c].sum()) - tp
        fp = int(matrix[:, c].sum()) - tp
        tn = total - tp - fn - fp
        figures.update({f"{figure}/{name}": value for figure, value in _binary_figures(tp, fn, fp, tn).items()})
        figures[f"auc/{name}"] = float(areas[c])
    present = [name for c, name in enumerate(names) if matrix[c].sum() > 0]
    figures["balanced_accuracy"] = _mean_of(figures[f"sensitivity/{n}"] for n in present)
    figures["macro_f1"] = _mean_of(figures[f"f1/{n}"] for n in present)
    figures["macro_auc"] = _mean_of(figures[f"auc/{n}"] for n in names)
    figures["ece"] = top_label_ece(truth, score, ECE_BINS)
    return figures


def multilabel_figures(y_true: np.ndarray, y_score: np.ndarray, label_names: list[str] | tuple[str, ...],
                       threshold: float = 0.5) -> dict[str, float]:
    """Per-label figures of independent (sigmoid) outputs, each label a yes/no question of its own.

    Keys: ``auc/L``, ``sensitivity/L``, ``specificity/L``, ``ppv/L``, ``f1/L`` (at ``threshold``) for every
    label ``L``, and ``macro_auc`` over the labels whose AUC is defined (both answers present). Undefined
    figures are NaN, as in :func:`classification_figures`.

    Args:
        y_true: 0/1 per item and label, shape (items, labels).
        y_score: probability per item and label, same shape.
        label_names: names of the labels, in column order.
        threshold: probability at or above which a label is called present.

    Raises:
        MetricError: NaN, inf or values outside [0, 1] in ``y_score``, answers other than 0/1, a wrong
            shape, no items.
    """
    names = list(label_names)
    truth = checks.binary(y_true, ndim=2)
    if truth.shape[1] != len(names):
        raise MetricError(f"y_true must have shape (items, {len(names)}) for labels {names}, got {truth.shape}")
    score = checks.scores(y_score, shape=truth.shape, unit=True)
    if len(truth) == 0:
        raise MetricError("multi-label figures need at least one item")
    from sklearn.metrics import multilabel_confusion_matrix  # on first use, as in curves: slow to import

    with checks.trusted():
        matrices = multilabel_confusion_matrix(truth, score >= threshold)  # per label [[tn, fp], [fn, tp]]
    areas = aucs_or_nan(truth, score)
    figures: dict[str, float] = {}
    for column, name in enumerate(names):
        (tn, fp), (fn, tp) = matrices[column].tolist()
        figures[f"auc/{name}"] = float(areas[column])
        binary = _binary_figures(tp, fn, fp, tn)
        figures.update({f"{figure}/{name}": binary[figure] for figure in ("sensitivity", "specificity", "ppv", "f1")})
    figures["macro_auc"] = _mean_of(figures[f"auc/{n}"] for n in names)
    return figures


def detection_figures(predictions: list[dict[str, np.ndarray]], truths: list[dict[str, np.ndarray]],
                      iou_threshold: float = 0.5) -> dict[str, float]:
    """Box figures of a set of images: ``map50`` (COCO mean average precision at IoU ``iou_threshold``, from
    torchmetrics with the faster-coco-eval backend, not a hand-written mAP) and ``mean_iou`` (each true box's
    best IoU with a predicted box of its image, 0 where none, averaged over the true boxes).

    Args:
        predictions: per image ``boxes`` (k, 4) xyxy, ``scores`` (k,), ``labels`` (k,).
        truths: per image ``boxes`` (n, 4) xyxy and ``labels`` (n,); images without boxes count too (their
            predictions are false positives).

    Raises:
        MetricError: lists of different lengths, no image, or NaN coordinates or scores.
    """
    if len(predictions) != len(truths) or not truths:
        raise MetricError(f"detection figures need one prediction per image and at least one image, got "
                          f"{len(predictions)} predictions for {len(truths)} images")
    import torch
    from torchmetrics.detection import MeanAveragePrecision
    from torchvision.ops import box_iou

    def tensors(item: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        out = {key: torch.as_tensor(np.asarray(item[key])) for key in keys}
        out["boxes"] = out["boxes"].float().reshape(-1, 4)
        out["labels"] = out["labels"].long().reshape(-1)
        if not torch.isfinite(out["boxes"]).all() or ("scores" in out and not torch.isfinite(out["scores"]).all()):
            raise MetricError("detection figures: NaN or infinite box coordinates or scores")
        return out

    preds = [tensors(p, ("boxes", "scores", "labels")) for p in predictions]
    targets = [tensors(t, ("boxes", "labels")) for t in truths]
    metric = MeanAveragePrecision(iou_type="bbox", iou_thresholds=[iou_threshold], backend="faster_coco_eval")
    metric.update(preds, targets)
    average_precision = float(metric.compute()["map"])
    best = [box_iou(t["boxes"], p["boxes"]).max(dim=1).values if len(p["boxes"]) else torch.zeros(len(t["boxes"]))
            for p, t in zip(preds, targets, strict=True) if len(t["boxes"])]
    ious = torch.cat(best) if best else torch.zeros(0)
    return {"map50": average_precision if average_precision >= 0 else float("nan"),  # -1: no true box at all
            "mean_iou": float(ious.mean()) if len(ious) else float("nan")}


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


def _confusion(truth: np.ndarray, called: np.ndarray, num_classes: int) -> np.ndarray:
    if len(truth) == 0:
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

    with checks.trusted():
        return sklearn_confusion_matrix(truth, called, labels=np.arange(num_classes))


def _binary_figures(tp: int, fn: int, fp: int, tn: int) -> dict[str, float]:
    """The figures of one yes/no question's 2×2 table, NaN where a denominator is empty."""
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "dor": _odds_ratio(tp, fn, fp, tn),
    }


def _odds_ratio(tp: int, fn: int, fp: int, tn: int) -> float:
    """Diagnostic odds ratio, 0.5 added to every cell when one is empty (Haldane); NaN without both classes."""
    if tp + fn == 0 or fp + tn == 0:
        return math.nan
    cells = np.array([tp, fn, fp, tn], dtype=np.float64)
    if (cells == 0).any():
        cells += 0.5
    return float(cells[0] * cells[3] / (cells[1] * cells[2]))


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else math.nan


def _mean_of(values: Iterable[float]) -> float:
    """Mean of the defined (finite) values; NaN when none is."""
    finite = [float(v) for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan
