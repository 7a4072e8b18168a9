"""The classical lung segmentation: the fallback where no trained U-Net is available.

Aerated lung absorbs few X-rays, so on a radiograph (white = dense) the lungs are the large dark regions
inside the chest. The method, at 256 x 256:

1. equalize the histogram and blur (Gaussian, sigma 2 px) so the threshold does not follow ribs and noise;
2. an anatomical prior: two ellipses where the lungs of a frontal chest film usually lie (centres at 32 %
   and 68 % of the width, 50 % of the height; semi-axes 18 % of the width and 33 % of the height, chosen on
   the training split of the public mask sets), and an envelope 1.25 x larger;
3. Otsu's threshold computed on the pixels of the envelope only (the outside air and the labels around
   the chest would bias a whole-image threshold); dark = below it, opened with a 2-px disk to cut thin
   bridges to the outside air and the trachea, and clipped to the envelope;
4. keep the dark regions that lie at least half inside the prior ellipses, then the two largest of those
   (:func:`~lungscreen.lungs.postprocess.clean_mask`), a closing with a 6-px disk and hole filling.

On the held-out patients of the public mask sets it reaches a mean Dice of 0.78 (0.95 for the U-Net;
``benchmarks/results/lungs.json``): enough for a first run on a fresh machine, not for a final model. It fails on dense consolidations (white lungs), strongly rotated or
cropped films, and laterals. It does not know the mask conventions: it draws the dark lung fields, close
to the heart-excluded convention.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from lungscreen.lungs.postprocess import clean_mask
from lungscreen.preprocessing.transforms import (
    equalize_image,
    resize_image,
    resize_mask,
)

#: Working side (pixels): the prior and the morphology radii are defined at this size.
WORK_SIZE = 256
#: (centre x, centre y, semi-axis x, semi-axis y) of the left-image lung as shares of the side.
LUNG_ELLIPSE = (0.32, 0.50, 0.18, 0.33)
ENVELOPE_GROWTH = 1.25
MIN_INSIDE_PRIOR = 0.5


@lru_cache(maxsize=4)
def lung_prior(size: int = WORK_SIZE, growth: float = 1.0) -> np.ndarray:
    """Two mirrored ellipses where the lungs usually lie, bool (size, size)."""
    cx, cy, rx, ry = LUNG_ELLIPSE
    rx, ry = rx * growth, ry * growth
    y, x = np.mgrid[0:size, 0:size] / size
    inside = lambda centre: ((x - centre) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
    return inside(cx) | inside(1 - cx)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def classical_lung_mask(image: np.ndarray) -> np.ndarray:
    """Lung mask of a frontal chest radiograph by thresholding and morphology, bool at the image's size.

    Args:
        image: float32 (H, W) in [0, 1], white = dense.

    Returns:
        The lung mask (may be empty when nothing lung-like is found; callers decide whether that is an error).
    """
    height, width = image.shape
    work = equalize_image(resize_image(np.asarray(image, np.float32), WORK_SIZE, WORK_SIZE))
    work = cv2.GaussianBlur(work, (0, 0), 2.0)
    prior, envelope = lung_prior(), lung_prior(growth=ENVELOPE_GROWTH)
    dark = work < threshold_otsu(work[envelope])
    dark = cv2.morphologyEx(dark.astype(np.uint8), cv2.MORPH_OPEN, _disk(2)).astype(bool) & envelope
    labels, found = ndimage.label(dark)
    if found:
        area = np.bincount(labels.ravel(), minlength=found + 1)
        inside = np.bincount(labels.ravel(), weights=prior.ravel(), minlength=found + 1)
        keep = np.flatnonzero(inside >= MIN_INSIDE_PRIOR * np.maximum(area, 1))
        dark = np.isin(labels, keep[keep > 0])
    mask = clean_mask(dark)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, _disk(6)).astype(bool)
    return resize_mask(ndimage.binary_fill_holes(mask), height, width)
