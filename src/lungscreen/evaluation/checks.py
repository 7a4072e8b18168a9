"""What the figure functions accept, checked up front so an impossible request fails with a clear message.

Unchecked, a NaN probability flows through ``argmax`` (which picks it) and sorting (which puts it last) into a
plausible-looking figure, and a one-class test set gets an AUC that scikit-learn only warns about. Every
public figure function passes its inputs through here and gets a :class:`~lungscreen.errors.MetricError`
naming the problem (and the first bad row) instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from lungscreen.errors import MetricError

#: How far outside [0, 1] a probability may stray by float rounding before it counts as not a probability.
TOLERANCE = 1e-6


def scores(values: object, what: str = "probabilities", *, ndim: int | None = None, columns: int | None = None,
           shape: tuple[int, ...] | None = None, unit: bool = False) -> np.ndarray:
    """``values`` as a finite float64 array, or a MetricError naming the first row holding NaN or inf.

    Args:
        values: the scores or probabilities, one row per item.
        what: how the message names them ("probabilities", "scores").
        ndim: the number of dimensions required, if any.
        columns: the number of columns required (one per class), if any.
        shape: the exact shape required, if any.
        unit: require values in [0, 1] (probabilities), clipping float rounding within :data:`TOLERANCE`.
    """
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise MetricError(f"{what} must be numbers: {error}") from None
    if array.ndim == 0 or (ndim is not None and array.ndim != ndim):
        raise MetricError(f"{what} must be a {ndim or 1}-D array, one row per item; got shape {array.shape}")
    if columns is not None and (array.ndim != 2 or array.shape[1] != columns):
        raise MetricError(f"{what} must have shape (items, {columns}), one column per class; got {array.shape}")
    if shape is not None and array.shape != shape:
        raise MetricError(f"{what} must have shape {shape}, got {array.shape}")
    finite = np.isfinite(array)
    if not finite.all():
        first = int(np.flatnonzero(~finite.ravel())[0])
        row = first // max(1, int(np.prod(array.shape[1:])))
        kind = "NaN" if np.isnan(array.ravel()[first]) else "inf"
        raise MetricError(f"{what} hold {kind} (first at row {row})")
    if unit and array.size:
        outside = (array < -TOLERANCE) | (array > 1.0 + TOLERANCE)
        if outside.any():
            first = int(np.flatnonzero(outside.ravel())[0])
            row = first // max(1, int(np.prod(array.shape[1:])))
            raise MetricError(f"{what} must lie in [0, 1]; row {row} holds {array.ravel()[first]:.6g}")
        array = np.clip(array, 0.0, 1.0)
    return array


def labels(values: object, num_classes: int, what: str = "y_true", *, size: int | None = None,
           other: str = "the probabilities") -> np.ndarray:
    """Class indices as a 1-D int64 array, each in ``[0, num_classes)`` (and ``size`` long, as ``other``)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise MetricError(f"{what} must be a 1-D array of class indices, got shape {array.shape}")
    if size is not None and len(array) != size:
        raise MetricError(f"{what} holds {len(array)} items, {other} {size}")
    if array.size == 0:
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.number) and array.dtype != bool:
        raise MetricError(f"{what} must hold class indices, got {array.dtype} values")
    with np.errstate(invalid="ignore"):  # NaN labels: the cast is garbage, and caught as wrong below
        as_int = array.astype(np.int64)
    wrong = (as_int != array) | (as_int < 0) | (as_int >= num_classes)
    if wrong.any():
        row = int(np.flatnonzero(wrong)[0])
        raise MetricError(f"{what} must hold class indices 0..{num_classes - 1}; row {row} holds {array[row].item()!r}")
    return as_int


def binary(values: object, what: str = "y_true", *, ndim: int = 1) -> np.ndarray:
    """0/1 (or bool) answers as a bool array of ``ndim`` dimensions, or a MetricError."""
    array = np.asarray(values)
    if array.ndim != ndim:
        raise MetricError(f"{what} must be a {ndim}-D array of 0/1 answers, got shape {array.shape}")
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.number):
        raise MetricError(f"{what} must hold 0/1 answers, got {array.dtype} values")
    wrong = (array != 0) & (array != 1)
    if wrong.any():
        first = int(np.flatnonzero(wrong.ravel())[0])
        row = first // max(1, int(np.prod(array.shape[1:])))
        raise MetricError(f"{what} must hold 0/1 answers; row {row} holds {array.ravel()[first].item()!r}")
    return array == 1


def aligned(truth: np.ndarray, score: np.ndarray) -> None:
    """A MetricError unless the answers and the scores describe the same items."""
    if len(truth) != len(score):
        raise MetricError(f"y_true holds {len(truth)} items, the scores {len(score)}")


def both_classes(truth: np.ndarray, figure: str) -> None:
    """A MetricError unless ``truth`` (bool) holds positives and negatives, which ``figure`` needs."""
    positives = int(np.count_nonzero(truth))
    if positives == 0 or positives == len(truth):
        held = "negatives" if positives == 0 else "positives"
        raise MetricError(f"{figure} needs positives and negatives; this test set holds only {held} "
                          f"({len(truth)} items)")


@contextmanager
def trusted() -> Iterator[None]:
    """Skip scikit-learn's second validation of inputs already checked here (cheaper inside the bootstrap)."""
    import sklearn

    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        yield
