"""Percentile bootstrap intervals, resampling whole patients, because a point estimate alone misleads.

Small test sets are the norm in this field (paper 000 tests on 15 images). The bootstrap redraws the test set
with replacement many times and reports the spread of a figure; when the items carry patient ids, whole
patients are redrawn, since images of one patient are not independent and resampling them one by one
makes the interval too narrow.

Example:
    >>> import numpy as np
    >>> estimate = bootstrap_ci(np.array([0.9, 0.95, 0.97, 0.92]), seed=0)
    >>> round(estimate.value, 3), estimate.low <= estimate.value <= estimate.high
    (0.935, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lungscreen.errors import MetricError


@dataclass(frozen=True)
class Estimate:
    """A figure with its percentile bootstrap interval (``level`` e.g. 0.95).

    ``value`` is NaN when the figure is undefined on the test set (an AUC of an absent class); ``low`` and
    ``high`` are NaN then too, and also when no resample defined the figure.
    """

    value: float
    low: float
    high: float
    level: float = 0.95

    @property
    def defined(self) -> bool:
        """Whether the test set defines the figure at all."""
        return math.isfinite(self.value)

    def __str__(self) -> str:
        if not self.defined:
            return "undefined"
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return f"{self.value:.3f} [no interval]"
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
            A resample where it is undefined (NaN, or a :class:`MetricError` such as a strict AUC drawing
            one class only) is left out.
        n_resamples: number of bootstrap resamples.
        level: coverage of the interval.
        seed: random seed, so a report is reproducible.
        groups: optional per-item cluster ids (patients); whole clusters are resampled, because images
            of one patient are not independent.
    """
    if len(arrays) == 0:
        raise MetricError("bootstrap_ci needs at least one array")
    single = statistic or _mean
    figures = bootstrap_many(*arrays, statistic=lambda *a: {"value": float(single(*a))}, n_resamples=n_resamples,
                             level=level, seed=seed, groups=groups)
    return figures["value"]


def bootstrap_many(*arrays: np.ndarray, statistic: Callable[..., dict[str, float]], n_resamples: int = 1000,
                   level: float = 0.95, seed: int = 0, groups: np.ndarray | None = None) -> dict[str, Estimate]:
    """Like :func:`bootstrap_ci` for a statistic returning several named figures at once.

    One set of resamples serves every figure, so the intervals of, say, sensitivity and PPV come from the
    same resampled test sets, and a report costs one bootstrap instead of one per figure. A figure that is
    undefined (NaN) on the whole test set gets an :class:`Estimate` with NaN bounds, not an interval made
    of the resamples that happen to define it; resamples where a figure is undefined are left out of its
    interval (so an interval of, say, a rare class's AUC describes the resamples that hold the class).
    """
    if not 0.0 < level < 1.0:
        raise MetricError(f"the interval's level must lie strictly between 0 and 1, got {level}")
    if n_resamples < 1:
        raise MetricError(f"the bootstrap needs at least one resample, got n_resamples={n_resamples}")
    if any(callable(a) for a in arrays):
        raise MetricError("bootstrap got a function among its arrays; pass it as statistic=...")
    arrays = tuple(np.asarray(a) for a in arrays)
    if any(a.ndim == 0 for a in arrays):
        raise MetricError("bootstrap arrays must hold one entry per item, got a single value")
    size = len(arrays[0])
    if size == 0:
        raise MetricError("bootstrap needs at least one item")
    if any(len(a) != size for a in arrays):
        raise MetricError(f"bootstrap arrays must have the same length, got {[len(a) for a in arrays]}")
    point = {name: float(value) for name, value in statistic(*arrays).items()}
    rng = np.random.default_rng(seed)
    clusters = _clusters(groups, size)
    samples: dict[str, list[float]] = {name: [] for name in point}
    for _ in range(n_resamples):
        chosen = rng.integers(0, len(clusters), len(clusters))
        index = np.concatenate([clusters[i] for i in chosen])
        try:
            figures = statistic(*(a[index] for a in arrays))
        except MetricError:
            continue  # undefined on this resample (a strict figure that drew one class only)
        for name, values in samples.items():
            value = float(figures.get(name, math.nan))
            if math.isfinite(value):
                values.append(value)
    tail = (1.0 - level) / 2.0
    result = {}
    for name, value in point.items():
        if math.isfinite(value) and samples[name]:
            low, high = np.quantile(samples[name], [tail, 1.0 - tail])
            result[name] = Estimate(value, float(low), float(high), level)
        else:
            result[name] = Estimate(value, math.nan, math.nan, level)
    return result


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def _clusters(groups: np.ndarray | None, size: int) -> list[np.ndarray]:
    """Item indices of each cluster (patient); each item its own cluster without groups."""
    if groups is None:
        return [np.array([i]) for i in range(size)]
    groups = np.asarray(groups)
    if len(groups) != size:
        raise MetricError(f"groups hold {len(groups)} ids for {size} items; they must align with the arrays")
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
