"""CT slices cut out of papers (UCSD COVID-CT): crop to the body, even out the display window.

The UCSD slices are figures from preprints: black margins, a white frame, arrows and letters beside the
body, and each paper's own display window (lung window, mediastinal window, or something between). Two
steps take most of that away before a network can learn it:

- ``crop_to_body``: Otsu's threshold, the large bright regions kept (chest wall, mediastinum, spine;
  letters, arrows and frame pieces are much smaller), their convex hull taken as the body (the dark lungs
  lie between them), the image cropped to its bounding box widened by ``margin``; a slice whose body
  covers almost all of it is left as it is.
- ``percentile_window``: the intensities inside the body clipped to their ``low``-``high`` percentiles and
  stretched to [0, 1], so a slice shown in another window lands on a comparable scale, and white
  annotations inside the crop no longer set the range.

Named pipeline ``ctcrop``: ``crop_to_body``, ``percentile_window``, ``normalize``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lungscreen.errors import ConfigError
from lungscreen.preprocessing.transforms import Sample, Transform, crop_to_mask, register_transform

#: A region covering more than this share of the slice is "the whole picture", not a body to crop to.
WHOLE_PICTURE = 0.97


def body_mask(image: np.ndarray, *, least: float = 0.1) -> np.ndarray:
    """The body on a CT slice: the convex hull of the large bright regions after Otsu's threshold.

    The bright regions are the chest wall, the mediastinum and the spine; the dark lungs lie between them
    (and often touch the picture's edge, so filling holes would not find them). Regions smaller than
    ``least`` x the largest are letters, arrows and frame pieces, and are left out.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.measure import label
    from skimage.morphology import convex_hull_image

    if float(image.max() - image.min()) < 1e-6:
        return np.zeros(image.shape, bool)
    regions = label(ndimage.binary_opening(image > threshold_otsu(image), iterations=2))
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    if sizes.max() == 0:
        return np.zeros(image.shape, bool)
    large = np.flatnonzero(sizes >= least * sizes.max())
    return convex_hull_image(np.isin(regions, large))


@register_transform
@dataclass(frozen=True)
class CropToBody(Transform):
    """Crop a CT slice to its body (module docstring), widened by ``margin`` x the box side on each edge."""

    name: ClassVar[str] = "crop_to_body"
    margin: float = 0.02

    def __post_init__(self) -> None:
        self._check_positive("margin", self.margin, upper=1.0, zero=True)

    def __call__(self, sample: Sample) -> Sample:
        body = body_mask(sample.image)
        if not body.any() or body.mean() > WHOLE_PICTURE:
            return sample
        return crop_to_mask(sample, body, self.margin)


@register_transform
@dataclass(frozen=True)
class PercentileWindow(Transform):
    """Clip to the ``low``-``high`` percentiles of the body's intensities and stretch to [0, 1]."""

    name: ClassVar[str] = "percentile_window"
    low: float = 1.0
    high: float = 99.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ConfigError(f"percentile_window needs 0 <= low < high <= 100, got low={self.low}, high={self.high}")

    def __call__(self, sample: Sample) -> Sample:
        image = sample.image
        body = body_mask(image)
        values = image[body] if body.sum() > 0.05 * body.size else image.ravel()
        floor, ceiling = np.percentile(values, [self.low, self.high])
        if ceiling - floor < 1e-6:
            return sample
        return sample.replace(image=np.clip((image - floor) / (ceiling - floor), 0.0, 1.0).astype(np.float32))
