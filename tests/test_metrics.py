"""The metrics module against hand-computed tables: each expected figure below is derived by hand from a
confusion matrix written out in the test, not from the code under test or from scikit-learn."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy.stats import rankdata

from lungscreen.errors import LungscreenError, MetricError
from lungscreen.evaluation.metrics import (
    OVERALL,
    PER_CLASS,
    Estimate,
    auc,
    bootstrap_ci,
    bootstrap_many,
    classification_figures,
    classification_report,
    confusion_matrix,
    expected_calibration_error,
    multilabel_figures,
    precision_recall,
    reliability,
    roc,
)


def items_of(matrix: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items realising a confusion matrix ``[true][predicted]``: truth, prediction, and probabilities whose
    argmax is the prediction (0.6 on it, the rest spread evenly)."""
    k = len(matrix)
    truth = np.array([t for t in range(k) for p in range(k) for _ in range(matrix[t][p])])
    called = np.array([p for t in range(k) for p in range(k) for _ in range(matrix[t][p])])
    score = np.full((len(truth), k), 0.4 / (k - 1))
    score[np.arange(len(truth)), called] = 0.6
    return truth, called, score


def rank_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """The module's former AUC: the rank (Mann-Whitney) formula, ties counted half."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ---- hand-computed confusion matrices --------------------------------------------------------------------

TWO_CLASS = [[8, 2],   # truth neg: 8 called neg, 2 called pos
             [1, 4]]   # truth pos: 1 called neg, 4 called pos
# pos: TP 4, FN 1, FP 2, TN 8.   neg: TP 8, FN 2, FP 1, TN 4.
TWO_CLASS_EXPECTED = {
    "sensitivity/pos": 4 / 5, "specificity/pos": 8 / 10, "ppv/pos": 4 / 6, "npv/pos": 8 / 9,
    "f1/pos": 2 * 4 / (2 * 4 + 2 + 1), "dor/pos": (4 * 8) / (1 * 2),
    "sensitivity/neg": 8 / 10, "specificity/neg": 4 / 5, "ppv/neg": 8 / 9, "npv/neg": 4 / 6,
    "f1/neg": 2 * 8 / (2 * 8 + 1 + 2), "dor/neg": (8 * 4) / (2 * 1),
    "accuracy": 12 / 15, "balanced_accuracy": (4 / 5 + 8 / 10) / 2, "macro_f1": (8 / 11 + 16 / 19) / 2,
}

THREE_CLASS = [[5, 1, 0],   # truth a
               [2, 6, 2],   # truth b
               [0, 1, 3]]   # truth c
# a: TP 5, FN 1, FP 2 (column a 7 - 5), TN 20 - 8 = 12.
# b: TP 6, FN 4, FP 2 (column b 8 - 6), TN 20 - 12 = 8.
# c: TP 3, FN 1, FP 2 (column c 5 - 3), TN 20 - 6 = 14.
THREE_CLASS_EXPECTED = {
    "sensitivity/a": 5 / 6, "specificity/a": 12 / 14, "ppv/a": 5 / 7, "npv/a": 12 / 13, "f1/a": 10 / 13,
    "dor/a": (5 * 12) / (1 * 2),
    "sensitivity/b": 6 / 10, "specificity/b": 8 / 10, "ppv/b": 6 / 8, "npv/b": 8 / 12, "f1/b": 12 / 18,
    "dor/b": (6 * 8) / (4 * 2),
    "sensitivity/c": 3 / 4, "specificity/c": 14 / 16, "ppv/c": 3 / 5, "npv/c": 14 / 15, "f1/c": 6 / 9,
    "dor/c": (3 * 14) / (1 * 2),
    "accuracy": 14 / 20, "balanced_accuracy": (5 / 6 + 6 / 10 + 3 / 4) / 3, "macro_f1": (10 / 13 + 12 / 18 + 6 / 9) / 3,
}


@pytest.mark.parametrize("matrix, names, expected", [
    (TWO_CLASS, ["neg", "pos"], TWO_CLASS_EXPECTED),
    (THREE_CLASS, ["a", "b", "c"], THREE_CLASS_EXPECTED),
], ids=["2-class", "3-class"])
def test_figures_match_hand_computed_matrix(matrix, names, expected):
    truth, called, score = items_of(matrix)
    assert confusion_matrix(truth, called, len(names)).tolist() == matrix
    from_argmax = classification_figures(truth, score, names)
    from_prediction = classification_figures(truth, np.full_like(score, 1 / len(names)), names, y_pred=called)
    for figures in (from_argmax, from_prediction):
        assert set(figures) == set(OVERALL) | {f"{figure}/{name}" for figure in PER_CLASS for name in names}
        for key, value in expected.items():
            assert figures[key] == pytest.approx(value), key


def test_figures_agree_with_scikit_learn_where_it_has_them():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, 150)
    score = rng.dirichlet(np.ones(3), 150) + np.eye(3)[truth] * 0.5
    score /= score.sum(1, keepdims=True)
    figures = classification_figures(truth, score, ["a", "b", "c"])
    assert figures["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, score.argmax(1)))
    assert figures["macro_auc"] == pytest.approx(roc_auc_score(truth, score, multi_class="ovr", average="macro"))


# ---- zero cells ----------------------------------------------------------------------------------------

def test_dor_adds_half_to_every_cell_when_one_is_empty():
    truth, _, score = items_of([[10, 0], [2, 3]])  # pos: TP 3, FN 2, FP 0, TN 10
    figures = classification_figures(truth, score, ["neg", "pos"])
    assert figures["dor/pos"] == pytest.approx((3.5 * 10.5) / (2.5 * 0.5))  # 29.4
    assert figures["dor/neg"] == pytest.approx((10.5 * 3.5) / (0.5 * 2.5))  # neg: TP 10, FN 0, FP 2, TN 3
    assert figures["ppv/pos"] == 1.0
    perfect = classification_figures(*items_of([[5, 0], [0, 5]])[::2], ["neg", "pos"])
    assert perfect["dor/pos"] == pytest.approx((5.5 * 5.5) / (0.5 * 0.5))  # 121, finite, not infinity


def test_nothing_called_positive_leaves_ppv_undefined():
    truth, _, score = items_of([[10, 0], [5, 0]])  # pos: TP 0, FN 5, FP 0, TN 10
    figures = classification_figures(truth, score, ["neg", "pos"])
    assert math.isnan(figures["ppv/pos"])  # 0 / 0: no made-up 0 or 1
    assert math.isnan(figures["npv/neg"])  # neg: TP 10, FN 0, FP 5, TN 0 -> TN / (TN + FN) = 0 / 0
    assert figures["sensitivity/pos"] == 0.0
    assert figures["f1/pos"] == 0.0  # 2·0 / (0 + 0 + 5): defined, and zero
    assert figures["dor/pos"] == pytest.approx((0.5 * 10.5) / (5.5 * 0.5))


# ---- one class only ------------------------------------------------------------------------------------

def test_strict_auc_refuses_a_single_class_set():
    with pytest.raises(MetricError, match=r"^AUC needs positives and negatives; this test set holds only negatives"):
        auc([0, 0, 0], [0.2, 0.5, 0.9])
    with pytest.raises(MetricError, match="holds only positives"):
        auc(np.ones(4, bool), [0.2, 0.5, 0.9, 0.1])
    with pytest.raises(MetricError, match="ROC curve needs positives and negatives"):
        roc([1, 1], [0.2, 0.5])
    assert isinstance(MetricError("x"), LungscreenError) and isinstance(MetricError("x"), ValueError)


def test_figures_keep_an_absent_class_auc_undefined():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 60)  # classes a and b only; c absent
    score = rng.dirichlet(np.ones(3), 60)
    figures = classification_figures(truth, score, ["a", "b", "c"])
    assert math.isnan(figures["auc/c"]) and math.isnan(figures["sensitivity/c"]) and math.isnan(figures["dor/c"])
    assert figures["macro_auc"] == pytest.approx((figures["auc/a"] + figures["auc/b"]) / 2)
    assert figures["auc/a"] == pytest.approx(auc(truth == 0, score[:, 0]))
    with pytest.raises(MetricError, match="only negatives"):
        auc(truth == 2, score[:, 2])
    everything_one_class = classification_figures([1, 1, 1], [[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]], ["a", "b"])
    assert math.isnan(everything_one_class["macro_auc"])


# ---- bad input -----------------------------------------------------------------------------------------

def test_nan_or_inf_probabilities_name_the_row():
    truth, _, score = items_of(TWO_CLASS)
    score[3, 1] = np.nan
    score[7, 0] = np.inf
    message = re.escape("probabilities hold NaN (first at row 3)")
    with pytest.raises(MetricError, match=message):
        classification_figures(truth, score, ["neg", "pos"])
    with pytest.raises(MetricError, match=message):
        classification_report(truth, score, ["neg", "pos"], n_resamples=5)
    with pytest.raises(MetricError, match=message):
        expected_calibration_error(truth, score)
    with pytest.raises(MetricError, match=message):
        multilabel_figures(np.eye(2)[truth], score, ["neg", "pos"])
    with pytest.raises(MetricError, match=re.escape("probabilities hold inf (first at row 7)")):
        classification_figures(truth, np.nan_to_num(score, nan=0.5, posinf=np.inf), ["neg", "pos"])
    with pytest.raises(MetricError, match=re.escape("scores hold NaN (first at row 3)")):
        auc(truth, score[:, 1])
    with pytest.raises(MetricError, match=re.escape("confidence hold NaN (first at row 1)")):
        reliability([1, 0], [0.5, np.nan])


def test_wrong_shapes_and_labels_are_refused():
    truth, _, score = items_of(THREE_CLASS)
    with pytest.raises(MetricError, match=re.escape("must have shape (items, 2), one column per class; got (20, 3)")):
        classification_figures(truth, score, ["a", "b"])
    with pytest.raises(MetricError, match="y_true holds 20 items, the probabilities 19"):
        classification_figures(truth, score[:-1], ["a", "b", "c"])
    with pytest.raises(MetricError, match=re.escape("one column per class; got (20,)")):
        classification_figures(truth, score[:, 0], ["a", "b", "c"])
    with pytest.raises(MetricError, match="class indices 0..2; row 0 holds 7"):
        classification_figures(np.r_[7, truth[1:]], score, ["a", "b", "c"])
    with pytest.raises(MetricError, match="must lie in \\[0, 1\\]; row 0 holds 1.5"):
        classification_figures(truth, score * 2.5, ["a", "b", "c"])
    with pytest.raises(MetricError, match="y_pred holds 2 items, y_true 3"):
        confusion_matrix([0, 1, 1], [0, 1], 2)
    with pytest.raises(MetricError, match="y_true holds 3 items, the scores 2"):
        auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(MetricError, match="0/1 answers; row 1 holds 2"):
        auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(MetricError, match="masks differ in shape"):
        from lungscreen.evaluation.metrics import dice_iou

        dice_iou(np.zeros((2, 2)), np.zeros((3, 3)))


# ---- calibration ---------------------------------------------------------------------------------------

def test_ece_is_zero_when_confidence_matches_accuracy():
    # 10 items said 0.8 and right 8 times; 5 said 0.6 and right 3 times: accuracy equals confidence per bin.
    score = np.array([[0.2, 0.8]] * 10 + [[0.6, 0.4]] * 5)
    truth = np.array([1] * 8 + [0] * 2 + [0] * 3 + [1] * 2)
    assert expected_calibration_error(truth, score) == pytest.approx(0.0, abs=1e-12)
    assert classification_figures(truth, score, ["a", "b"])["ece"] == pytest.approx(0.0, abs=1e-12)


def test_ece_of_an_overconfident_model():
    # 4 items said 0.9 and all wrong (gap 0.9); 6 said 0.6 and right 3 times (gap 0.1):
    # ECE = 4/10 · 0.9 + 6/10 · 0.1 = 0.42.
    score = np.array([[0.9, 0.1]] * 4 + [[0.4, 0.6]] * 6)
    truth = np.array([1] * 4 + [1] * 3 + [0] * 3)
    assert expected_calibration_error(truth, score) == pytest.approx(0.42)
    assert classification_figures(truth, score, ["a", "b"])["ece"] == pytest.approx(0.42)
    correct = score.argmax(1) == truth
    mean_confidence, accuracy, count = reliability(correct, score.max(1), bins=10)
    assert mean_confidence.shape == accuracy.shape == count.shape == (10,)
    assert count.tolist() == [0, 0, 0, 0, 0, 6, 0, 0, 4, 0]  # (0.5, 0.6] and (0.8, 0.9]
    assert mean_confidence[[5, 8]] == pytest.approx([0.6, 0.9]) and accuracy[[5, 8]] == pytest.approx([0.5, 0.0])
    assert np.isnan(accuracy[count == 0]).all() and np.isnan(mean_confidence[count == 0]).all()


# ---- curves --------------------------------------------------------------------------------------------

def test_curve_shapes():
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 2, 80)
    score = np.round(rng.random(80) * 0.7 + truth * 0.3, 2)  # ties included
    fpr, tpr, thresholds = roc(truth, score)
    assert fpr.shape == tpr.shape == thresholds.shape and fpr.ndim == 1
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0) and np.isinf(thresholds[0])
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all() and (np.diff(thresholds) < 0).all()
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc(truth, score))
    precision, recall, cuts = precision_recall(truth, score)
    assert precision.shape == recall.shape == (len(cuts) + 1,)
    assert (precision[-1], recall[-1]) == (1.0, 0.0) and recall[0] == 1.0
    assert precision_recall([1, 1], [0.2, 0.4])[0].tolist() == [1.0, 1.0, 1.0]  # no negatives: still defined
    with pytest.raises(MetricError, match="precision-recall curve needs positives"):
        precision_recall([0, 0], [0.2, 0.4])


@pytest.mark.parametrize("seed", range(5))
def test_auc_agrees_with_the_rank_formula(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, 120)
    score = np.round(rng.dirichlet(np.ones(3), 120) + np.eye(3)[truth] * rng.random(), 2)  # ties included
    score /= score.sum(1, keepdims=True)
    figures = classification_figures(truth, score, ["a", "b", "c"])
    for c, name in enumerate("abc"):
        assert auc(truth == c, score[:, c]) == pytest.approx(rank_auc(truth == c, score[:, c]))
        assert figures[f"auc/{name}"] == pytest.approx(rank_auc(truth == c, score[:, c]))


def test_multilabel_figures_by_hand():
    truth = np.array([[1, 0], [1, 1], [0, 0], [0, 1], [1, 0]])
    score = np.array([[0.9, 0.2], [0.4, 0.7], [0.6, 0.1], [0.2, 0.3], [0.7, 0.8]])
    # label x called at 0.5: rows 0, 2, 4 -> TP 2 (0, 4), FN 1 (1), FP 1 (2), TN 1 (3).
    # label y called: rows 1, 4 -> TP 1 (1), FN 1 (3), FP 1 (4), TN 2 (0, 2).
    figures = multilabel_figures(truth, score, ["x", "y"])
    assert figures["sensitivity/x"] == pytest.approx(2 / 3) and figures["specificity/x"] == pytest.approx(1 / 2)
    assert figures["ppv/x"] == pytest.approx(2 / 3) and figures["f1/x"] == pytest.approx(4 / 6)
    assert figures["sensitivity/y"] == pytest.approx(1 / 2) and figures["specificity/y"] == pytest.approx(2 / 3)
    assert figures["ppv/y"] == pytest.approx(1 / 2) and figures["f1/y"] == pytest.approx(2 / 4)
    # x: positives 0.9, 0.4, 0.7 against negatives 0.6, 0.2: 5 of 6 pairs ordered right.
    assert figures["auc/x"] == pytest.approx(5 / 6)
    assert figures["macro_auc"] == pytest.approx((figures["auc/x"] + figures["auc/y"]) / 2)


# ---- bootstrap -----------------------------------------------------------------------------------------

def test_patient_bootstrap_intervals_contain_the_point_estimate():
    rng = np.random.default_rng(4)
    patients = np.repeat(np.arange(40), 3)  # three images per patient, one truth per patient
    truth = np.repeat(rng.integers(0, 3, 40), 3)
    score = rng.dirichlet(np.ones(3), 120) + np.eye(3)[truth] * 0.4
    score /= score.sum(1, keepdims=True)
    report = classification_report(truth, score, ["a", "b", "c"], groups=patients, n_resamples=200)
    for name, estimate in report.items():
        assert estimate.low <= estimate.value <= estimate.high, name


def test_bootstrap_draws_whole_patients():
    patients = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    sizes = np.bincount(patients)

    def statistic(index: np.ndarray) -> dict[str, float]:
        drawn = np.bincount(patients[index], minlength=len(sizes))
        assert (drawn % sizes == 0).all()  # every patient drawn with all of its images, or not at all
        return {"images": float(len(index))}

    bootstrap_many(np.arange(10), statistic=statistic, n_resamples=50, groups=patients)
    # Identical images of one patient are one observation: resampling patients widens the interval.
    values = np.repeat(np.r_[np.ones(6), np.zeros(4)], 5)
    by_image = bootstrap_ci(values, n_resamples=400)
    by_patient = bootstrap_ci(values, n_resamples=400, groups=np.repeat(np.arange(10), 5))
    assert by_patient.high - by_patient.low > by_image.high - by_image.low


def test_undefined_point_estimate_gets_no_interval():
    truth = np.array([0, 1, 0, 1, 1, 0])
    score = np.eye(3)[truth] * 0.5 + 0.5 / 3  # class c absent
    report = classification_report(truth, score, ["a", "b", "c"], n_resamples=50)
    assert not report["auc/c"].defined and math.isnan(report["auc/c"].low) and math.isnan(report["auc/c"].high)
    assert str(report["auc/c"]) == "undefined"
    # NaN on the whole set but defined on resamples that repeat an item: still no interval.
    odd = bootstrap_ci(np.arange(6.0), statistic=lambda v: math.nan if len(set(v)) == len(v) else 1.0,
                       n_resamples=50)
    assert math.isnan(odd.value) and math.isnan(odd.low) and math.isnan(odd.high)
    assert str(Estimate(0.5, math.nan, math.nan)) == "0.500 [no interval]"


def test_strict_statistic_skips_resamples_where_it_is_undefined():
    truth = np.array([0, 1, 0, 1])
    score = np.array([0.2, 0.9, 0.4, 0.6])
    estimate = bootstrap_ci(truth, score, statistic=auc, n_resamples=200)  # many resamples draw one class
    assert estimate.value == 1.0 and estimate.low == estimate.high == 1.0
    with pytest.raises(MetricError, match="only negatives"):
        bootstrap_ci(np.zeros(4), score, statistic=auc)
    with pytest.raises(MetricError, match="pass it as statistic="):
        bootstrap_ci(score, np.mean)
