"""The one input path: a decoded image becomes the tensor a model eats, the same way everywhere.

Training, predict, evaluation, explanations, export and the server all call these functions with the
:class:`InputSpec` stored in the checkpoint, so a model never sees its inputs prepared two ways::

    decoded float image  --preprocess-->  8-bit picture  --fit-->  size x size  --to_tensor-->  (N, C, S, S)
                          (the pipeline)   (as cached)      (masks, boxes and    (scale to [0, 1], normalise,
                                                            geometry follow)     repeat gray channels)

* :func:`preprocess` runs the named pipeline (equalisation, lung masking, crops...) and quantises the
  result to 8 bits: the picture the preprocessing cache stores, so a cached and a freshly computed image
  are the same bytes.
* :func:`fit` resizes to the model's square side (area averaging when shrinking, bilinear when growing;
  masks nearest-neighbour; boxes scaled). The sample's :class:`~lungscreen.preprocessing.geometry.Geometry`
  keeps the window of the original image it shows, so a heat-map maps back onto the original.
* :func:`to_tensor` = :func:`scale` (uint8 -> [0, 1]) then :func:`normalize` (``(x - mean) / std`` and the
  gray image repeated to the model's channels). Training augments between the two.

Example:
    >>> spec = InputSpec(size=64, pipeline={"name": "none", "steps": [{"name": "normalize"}]})
    >>> sample = prepare(np.random.default_rng(0).random((90, 120), dtype=np.float32), spec)
    >>> sample.image.shape, sample.image.dtype
    ((64, 64), dtype('uint8'))
    >>> tuple(to_tensor([sample.image], spec).shape)
    (1, 1, 64, 64)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lungscreen.models.inference_spec import InputSpec, IntensityReference
from lungscreen.preprocessing.pipelines import Pipeline, load_pipeline
from lungscreen.preprocessing.transforms import Sample, resize, to_uint8

if TYPE_CHECKING:
    import torch


def preprocess(sample: Sample | np.ndarray, pipeline: Pipeline) -> Sample:
    """Run the pipeline, then quantise to 8 bits (the picture the cache stores); masks and boxes follow."""
    sample = sample if isinstance(sample, Sample) else Sample(np.asarray(sample, np.float32))
    out = pipeline.apply(sample)
    return out.replace(image=to_uint8(out.image))


def fit(sample: Sample, size: int) -> Sample:
    """The preprocessed picture at the model's ``size`` x ``size`` (masks, boxes and geometry follow)."""
    return resize(sample, size, size)


def spec_pipeline(spec: InputSpec) -> Pipeline:
    """The preprocessing pipeline an input spec names (steps rebuilt from their stored parameters)."""
    return load_pipeline(spec.pipeline)


def prepare(image: Sample | np.ndarray, spec: InputSpec, pipeline: Pipeline | None = None) -> Sample:
    """:func:`preprocess` then :func:`fit`: an image ready for :func:`to_tensor`.

    Args:
        image: a decoded float image in [0, 1] (or a :class:`Sample` carrying masks and boxes).
        spec: the model's input spec.
        pipeline: the spec's pipeline, already loaded (callers preparing many images load it once).
    """
    return fit(preprocess(image, pipeline or spec_pipeline(spec)), spec.size)


def scale(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (S, S) -> float32 tensor (1, S, S) in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32).div_(255.0).unsqueeze(0)


def normalize(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """(..., 1, S, S) in [0, 1] -> (..., channels, S, S): ``(x - mean) / std``, gray repeated to the channels."""
    if spec.mean != 0.0 or spec.std != 1.0:
        images = (images - spec.mean) / spec.std
    if spec.channels > 1:
        images = images.expand(*images.shape[:-3], spec.channels, *images.shape[-2:]).contiguous()
    return images


def to_array(pixels: Sequence[np.ndarray], spec: InputSpec) -> np.ndarray:
    """A batch (N, channels, S, S) float32 from prepared uint8 images: :func:`scale` then :func:`normalize`
    in NumPy (the same float32 operations), for exported models that run without torch."""
    images = np.stack([np.asarray(p, np.uint8) for p in pixels])[:, None].astype(np.float32) / np.float32(255.0)
    if spec.mean != 0.0 or spec.std != 1.0:
        images = (images - np.float32(spec.mean)) / np.float32(spec.std)
    if spec.channels > 1:
        images = np.repeat(images, spec.channels, axis=1)
    return np.ascontiguousarray(images)


def to_tensor(pixels: Sequence[np.ndarray], spec: InputSpec) -> torch.Tensor:
    """A batch (N, channels, S, S) from prepared uint8 images (:func:`to_array` as a tensor)."""
    import torch

    return torch.from_numpy(to_array(pixels, spec))


#: Bins of the intensity histogram that describes a model's training inputs.
HISTOGRAM_BINS = 32


def intensity_histogram(pixels: np.ndarray, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Normalised histogram of a prepared 8-bit input over ``bins`` equal-width bins of 0..255."""
    counts = np.bincount((np.asarray(pixels, np.uint8).ravel().astype(np.int64) * bins) // 256, minlength=bins)
    return counts / max(1, counts.sum())


def reference_distance(pixels: np.ndarray, reference: IntensityReference) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) of an input's histogram to the training inputs' mean."""
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(intensity_histogram(pixels, len(reference.histogram)), reference.histogram, base=2))


def intensity_reference(pictures: Sequence[np.ndarray], quantile: float = 0.99) -> IntensityReference:
    """Summarise training inputs: their mean histogram and the ``quantile`` of their own distances to it."""
    from scipy.spatial.distance import jensenshannon

    histograms = np.stack([intensity_histogram(p) for p in pictures])
    mean = histograms.mean(axis=0)
    distances = [jensenshannon(h, mean, base=2) for h in histograms]
    threshold = max(float(np.quantile(distances, quantile)), 1e-6)
    return IntensityReference(histogram=[float(v) for v in mean], threshold=threshold, quantile=quantile,
                              images=len(pictures))


__all__ = ["InputSpec", "fit", "normalize", "prepare", "preprocess", "scale", "spec_pipeline", "to_array", "to_tensor", "intensity_reference", "reference_distance"]
