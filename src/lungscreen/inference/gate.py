"""The out-of-distribution gate: an image unlike what the model learned from is refused, not answered.

A flag beside a diagnosis is not a refusal: a CT slice, a lateral film, a photograph or noise given to a
chest X-ray model still gets a probability, and a reader sees a diagnosis. The gate refuses such an image
("not screened: <reason>") on three independent measurements, each calibrated at the end of training:

* **features**: the model's own pooled embedding (its penultimate layer) against the training images'
  Gaussian - a Mahalanobis distance on the leading principal axes plus the residual off them (Lee et al.
  2018, "A simple unified framework for detecting out-of-distribution samples"), divided by the dimension;
* **intensity**: the input's grey-level histogram against the training inputs' mean (the spec's
  ``reference``), in units of that reference's own threshold;
* **lungs** (pipelines that segment them): the share of the input the lungs cover, the share of the image
  the lung crop spans, and the smaller lung over the larger - a lateral film or a CT slice segments into
  one lung, a sliver or the whole picture.

The limits are chosen on the validation split so that together they refuse at most ``target`` of its
images (the validation images are in distribution by construction): each limit starts at its validation
quantile and the feature limit - the most discriminating - takes what is left of the budget.

Example:
    >>> reasons = refusals(spec.gate, features, intensity, lungs)        # doctest: +SKIP
    >>> reasons[0]                                                        # doctest: +SKIP
    'its features lie 14.2x beyond the training images (limit 1.0)'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lungscreen.models.inference_spec import OodGate
from lungscreen.preprocessing import LUNGS, Sample

#: Principal axes kept of the embedding (the rest is summarised by one residual variance).
COMPONENTS = 64
#: Quantile of the validation images each of the intensity and lung limits starts from (taken at an actual
#: image's value, never between two: on a small validation split that is its extreme).
EDGE_QUANTILE = 0.995
#: Share of validation images the gate may refuse (the issue's bound is 5 %; the margin covers the test split).
TARGET = 0.03
#: The lung statistics the gate checks (:func:`lung_statistics`).
LUNG_STATISTICS = ("lung_share", "span_share", "balance")


def feature_distances(gate: OodGate, features: np.ndarray) -> np.ndarray:
    """Per image, the squared Mahalanobis distance to the training embeddings over their dimension (about 1
    for a typical training image), on the principal axes plus the residual off them."""
    centred = np.asarray(features, np.float64) - np.asarray(gate.mean)
    components = np.asarray(gate.components)
    projected = centred @ components.T
    residual = centred - projected @ components
    inside = (projected ** 2 / np.asarray(gate.variances)).sum(axis=1)
    outside = (residual ** 2).sum(axis=1) / gate.residual_variance
    return (inside + outside) / centred.shape[1]


def lung_statistics(sample: Sample) -> dict[str, float] | None:
    """The lung mask's statistics of a prepared sample (None when its pipeline drew no lungs):
    ``lung_share`` (of the model's input), ``span_share`` (of the original image the input shows: the lung
    crop's window) and ``balance`` (the second largest region over the largest; 0 for one region)."""
    import cv2

    mask = sample.masks.get(LUNGS)
    if mask is None:
        return None
    mask = np.asarray(mask) > 0
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = sorted(stats[1:, cv2.CC_STAT_AREA].tolist(), reverse=True) if count > 1 else []
    geometry = sample.geometry
    span = 1.0
    if geometry is not None:
        x0, y0, x1, y1 = geometry.box
        span = (x1 - x0) * (y1 - y0) / max(1, geometry.width * geometry.height)
    return {"lung_share": float(mask.mean()), "span_share": float(span),
            "balance": float(areas[1] / areas[0]) if len(areas) > 1 else 0.0}


def refusals(gate: OodGate | None, features: np.ndarray, intensity: Sequence[float],
             lungs: Sequence[dict[str, float] | None]) -> list[str]:
    """Per image, why the gate refuses it ('' when it does not).

    Args:
        features: (N, D) pooled embeddings.
        intensity: per image, the intensity distance in units of the reference's threshold (NaN: none).
        lungs: per image, :func:`lung_statistics` (None where the pipeline drew no lungs).
    """
    if gate is None:
        return [""] * len(intensity)
    distances = feature_distances(gate, features)
    out = []
    for distance, shift, stats in zip(distances, intensity, lungs, strict=True):
        reasons = []
        if distance > gate.feature_threshold:
            reasons.append(f"the model's features lie {distance / gate.feature_threshold:.1f}x beyond its training "
                           "images")
        if np.isfinite(shift) and shift > gate.intensity_threshold:
            reasons.append(f"its grey levels are {shift / gate.intensity_threshold:.1f}x farther from the training "
                           "images' than allowed")
        for name, (low, high) in gate.lung_ranges.items():
            value = (stats or {}).get(name)
            if value is not None and not low <= value <= high:
                reasons.append(f"its lungs look unlike a frontal chest film ({name.replace('_', ' ')} {value:.2f}, "
                               f"training range {low:.2f}-{high:.2f})")
        out.append("; ".join(reasons))
    return out


def fit_gate(train_features: np.ndarray, val_features: np.ndarray, val_intensity: Sequence[float],
             val_lungs: Sequence[dict[str, float] | None], *, target: float = TARGET,
             chosen_on: str = "val split") -> OodGate:
    """The gate of a model: the embedding's Gaussian from its training images, the limits from its
    validation images (module docstring).

    Raises:
        ValueError: fewer than 20 training or 10 validation images.
    """
    train = np.asarray(train_features, np.float64)
    if len(train) < 20 or len(val_features) < 10:
        raise ValueError(f"an OOD gate needs >= 20 training and >= 10 validation images, got {len(train)} and "
                         f"{len(val_features)}")
    mean = train.mean(axis=0)
    centred = train - mean
    _, singular, axes = np.linalg.svd(centred, full_matrices=False)
    variances = singular ** 2 / max(1, len(train) - 1)
    keep = int(min(COMPONENTS, np.count_nonzero(variances > variances[0] * 1e-6), len(train) - 1))
    floor = max(float(variances[0]) * 1e-4, 1e-8)  # shrinkage: no axis narrower than this
    residual = float(max(variances[keep:].sum() / max(1, train.shape[1] - keep), floor))
    provisional = OodGate(mean=mean.tolist(), components=axes[:keep].tolist(),
                          variances=np.maximum(variances[:keep], floor).tolist(), residual_variance=residual,
                          feature_threshold=1.0, intensity_threshold=1.0, target=target, rejected_on_validation=0.0,
                          validation_images=len(val_features))
    distances = feature_distances(provisional, val_features)
    shifts = np.asarray(val_intensity, np.float64)
    edge = (1 - EDGE_QUANTILE) / 2
    ranges: dict[str, tuple[float, float]] = {}
    present = [stats for stats in val_lungs if stats is not None]
    if len(present) == len(val_lungs):
        for name in LUNG_STATISTICS:
            values = np.array([stats[name] for stats in present])
            ranges[name] = (float(np.quantile(values, edge, method="lower")),
                            float(np.quantile(values, 1 - edge, method="higher")))
    finite = shifts[np.isfinite(shifts)]
    intensity = float(np.quantile(finite, EDGE_QUANTILE, method="higher")) if len(finite) else float("inf")
    intensity = max(intensity, 1e-6) if np.isfinite(intensity) else 1e6
    others = (np.isfinite(shifts) & (shifts > intensity)) | _outside(val_lungs, ranges)
    # the feature limit: the smallest distance whose refusals, with the others', stay within the target
    allowed = int(np.floor(target * len(distances)))
    candidates = np.sort(distances)[::-1]
    threshold = float(candidates[0]) * 1.0001
    for value in candidates:
        if np.count_nonzero(others | (distances >= value)) > allowed:
            break
        threshold = float(value)
    threshold = max(threshold, 1e-6)
    refused = others | (distances > threshold)
    return provisional.model_copy(update={"feature_threshold": threshold, "intensity_threshold": intensity,
                                          "lung_ranges": ranges, "chosen_on": chosen_on,
                                          "rejected_on_validation": float(refused.mean())})


def _outside(lungs: Sequence[dict[str, float] | None], ranges: dict[str, tuple[float, float]]) -> np.ndarray:
    return np.array([any(not low <= (stats or {}).get(name, low) <= high for name, (low, high) in ranges.items())
                     for stats in lungs], dtype=bool)


def gate_report(gate: OodGate) -> dict[str, Any]:
    """The gate in a few numbers, for logs and summaries."""
    return {"rejected_on_validation": round(gate.rejected_on_validation, 4), "target": gate.target,
            "validation_images": gate.validation_images, "feature_threshold": round(gate.feature_threshold, 3),
            "intensity_threshold": round(gate.intensity_threshold, 3), "lung_ranges": gate.lung_ranges}


__all__ = ["COMPONENTS", "LUNG_STATISTICS", "TARGET", "feature_distances", "fit_gate", "gate_report",
           "lung_statistics", "refusals"]
