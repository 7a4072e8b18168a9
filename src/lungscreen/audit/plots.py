"""The figures of evaluation and audit pages, drawn from plain arrays.

Each function returns a bare :class:`matplotlib.figure.Figure`: no pyplot, so no global figure state, no
GUI backend and nothing to close; :meth:`lungscreen.audit.report.Page.figure` renders it with Agg. They take
numbers the metrics module already computed and compute nothing themselves (one metrics module).

Example:
    >>> figure = roc_figure({"cohen": (fpr, tpr, 0.91)})        # doctest: +SKIP
    >>> page.figure(figure, "ROC on the test split")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from lungscreen.audit.report import format_value

#: Colours that stay distinguishable for colour-blind readers and in greyscale print (Okabe-Ito first).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
           "#999999", "#882255", "#44AA99", "#117733")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def confusion_matrix_figure(matrix: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Counts and row percentages (the share of each true class predicted as each class); the colour is
    the row percentage, so a rare class's errors are as visible as a common one's."""
    counts = np.asarray(matrix, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(totals > 0, counts / totals, np.nan)
    side = 1.6 + 0.9 * len(class_names)
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(np.nan_to_num(shares), cmap="Blues", vmin=0, vmax=1)
    for (row, column), count in np.ndenumerate(counts):
        share = "n/a" if np.isnan(shares[row, column]) else f"{100 * shares[row, column]:.1f} %"
        dark = not np.isnan(shares[row, column]) and shares[row, column] > 0.55
        axes.text(column, row, f"{int(count)}\n{share}", ha="center", va="center", fontsize=9,
                  color="white" if dark else "black")
    _label_grid(axes, class_names, class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    figure.colorbar(image, ax=axes, label="share of the true class", shrink=0.8)
    return figure


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray, Any]]) -> Figure:
    """ROC curves, one per name (class or source): ``{name: (fpr, tpr, auc)}``; ``auc`` may be an estimate
    with its interval, shown in the legend."""
    figure, axes = _square_axes()
    axes.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1, label="chance")
    for index, (name, (fpr, tpr, auc)) in enumerate(curves.items()):
        axes.plot(fpr, tpr, color=_colour(index), linewidth=1.8, label=_plain(f"{name} (AUC {format_value(auc)})"))
    axes.set_xlabel("false positive rate (1 - specificity)")
    axes.set_ylabel("true positive rate (sensitivity)")
    axes.legend(loc="lower right", fontsize=8)
    return figure


def precision_recall_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray, Any]]) -> Figure:
    """Precision-recall curves, ``{name: (recall, precision, average precision)}``: more telling than ROC
    when positives are rare. Recall comes first (the x axis); ``evaluation.curves.precision_recall`` returns
    precision first, as scikit-learn does, so swap them."""
    figure, axes = _square_axes()
    for index, (name, (recall, precision, ap)) in enumerate(curves.items()):
        axes.step(recall, precision, where="post", color=_colour(index), linewidth=1.8,
                  label=_plain(f"{name} (AP {format_value(ap)})"))
    axes.set_xlabel("recall (sensitivity)")
    axes.set_ylabel("precision (positive predictive value)")
    axes.legend(loc="lower left", fontsize=8)
    return figure


def reliability_figure(mean_confidence: np.ndarray, accuracy: np.ndarray, counts: np.ndarray) -> Figure:
    """A reliability diagram: per confidence bin, accuracy against mean confidence (on the diagonal when
    calibrated), with the number of images per bin below; empty bins (count 0 or NaN) are left out."""
    confidence, hits, sizes = (np.asarray(values, dtype=float) for values in (mean_confidence, accuracy, counts))
    kept = (sizes > 0) & np.isfinite(confidence) & np.isfinite(hits)
    figure = Figure(figsize=(4.8, 5.4), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1, label="perfectly calibrated")
    top.plot(confidence[kept], hits[kept], marker="o", color=PALETTE[0], linewidth=1.8, label="model")
    top.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    width = 0.8 / max(len(confidence), 1)
    bottom.bar(confidence[kept], sizes[kept], width=width, color=PALETTE[4], edgecolor=PALETTE[0])
    bottom.set(xlabel="mean confidence in the bin", ylabel="images")
    return figure


def scatter_figure(points_2d: np.ndarray, colour_by: Sequence[str], title: str) -> Figure:
    """A 2-D embedding (e.g. t-SNE) coloured by a label or source, with a legend giving each group's size.

    Axes carry no ticks: t-SNE coordinates have no units, only neighbourhoods mean something.
    """
    points = np.asarray(points_2d, dtype=float)
    groups = np.asarray([str(value) for value in colour_by])
    if points.ndim != 2 or points.shape[1] != 2 or len(points) != len(groups):
        raise ValueError(f"need N x 2 points and N labels, got points {points.shape} and {len(groups)} labels")
    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    axes = figure.add_subplot()
    for index, name in enumerate(sorted(set(groups))):
        chosen = groups == name
        axes.scatter(points[chosen, 0], points[chosen, 1], s=12, alpha=0.75, color=_colour(index),
                     marker=MARKERS[(index // len(PALETTE)) % len(MARKERS)], label=_plain(f"{name} ({chosen.sum()})"),
                     linewidths=0)
    axes.set(xticks=[], yticks=[], title=_plain(title))
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False, markerscale=1.5)
    return figure


def matrix_figure(values: np.ndarray, row_names: Sequence[str], column_names: Sequence[str], title: str,
                  fmt: str = ".2f", *, vmin: float | None = None, vmax: float | None = None,
                  row_label: str | None = None, column_label: str | None = None) -> Figure:
    """A heat-map table, e.g. balanced accuracy trained on one source (rows) and tested on another
    (columns); NaN cells (not measured, or undefined) read "n/a" on a hatched grey background."""
    grid = np.asarray(values, dtype=float)
    if grid.shape != (len(row_names), len(column_names)):
        raise ValueError(f"values are {grid.shape} but names give {len(row_names)} x {len(column_names)}")
    figure = Figure(figsize=(2.4 + 0.95 * len(column_names), 1.6 + 0.55 * len(row_names)), layout="constrained")
    axes = figure.add_subplot()
    axes.set_facecolor("#eeeeee")
    finite = grid[np.isfinite(grid)]
    low = vmin if vmin is not None else (finite.min() if finite.size else 0.0)
    high = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
    image = axes.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=low, vmax=high, aspect="auto")
    for (row, column), value in np.ndenumerate(grid):
        if np.isnan(value):
            axes.add_patch(_hatched_cell(row, column))
            axes.text(column, row, "n/a", ha="center", va="center", fontsize=9, color="#555555")
        else:
            bright = (value - low) / (high - low) > 0.6 if high > low else False
            axes.text(column, row, format(value, fmt), ha="center", va="center", fontsize=9,
                      color="black" if bright else "white")
    _label_grid(axes, row_names, column_names)
    axes.set(title=_plain(title), ylabel=_plain(row_label or ""), xlabel=_plain(column_label or ""))
    figure.colorbar(image, ax=axes, shrink=0.8)
    return figure


# -- helpers -----------------------------------------------------------------------------------------------
def _square_axes() -> tuple[Figure, Axes]:
    figure = Figure(figsize=(5.0, 4.8), layout="constrained")
    axes = figure.add_subplot()
    axes.set(xlim=(0, 1), ylim=(0, 1.02), aspect="equal")
    axes.grid(alpha=0.3)
    return figure, axes


def _colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _plain(text: object) -> str:
    """Text from data drawn as written: a ``$`` would start mathtext, a leading ``_`` hides a legend entry."""
    plain = str(text).replace("$", r"\$")
    return f" {plain}" if plain.startswith("_") else plain


def _label_grid(axes: Axes, row_names: Sequence[str], column_names: Sequence[str]) -> None:
    axes.set_xticks(range(len(column_names)), [_plain(name) for name in column_names], rotation=30, ha="right")
    axes.set_yticks(range(len(row_names)), [_plain(name) for name in row_names])
    axes.tick_params(length=0)


def _hatched_cell(row: int, column: int) -> Rectangle:
    return Rectangle((column - 0.5, row - 0.5), 1, 1, facecolor="#eeeeee", edgecolor="#bbbbbb", hatch="//",
                     linewidth=0)
