"""The classical lung segmentation: the fallback where no trained U-Net is available.

Aerated lung absorbs few X-rays, so on a radiograph (white = dense) the lungs are the large dark regions
inside the chest, one on each side of the bright mediastinum. A threshold alone joins them through the
trachea and the dark soft tissue of the neck and shoulders (a dome over neck and mediastinum), so the
method grows each lung from seeds inside it up to the strongest edges around it (a marker-controlled
watershed), at 256 x 256:

1. equalize the histogram and blur (Gaussian, sigma 2 px) so edges do not follow ribs and noise;
2. an anatomical prior: two ellipses where the lungs of a frontal chest film usually lie (centres at 32 %
   and 68 % of the width, 50 % of the height; semi-axes 18 % of the width and 33 % of the height), an
   envelope 1.25 x larger and a core 0.9 x as large;
3. the midline: the brightest column (spine and mediastinum) between 38 % and 62 % of the width;
4. seeds: each lung's seed is the dark part (below Otsu's threshold computed inside the envelope) of the
   core on its side of the midline; the background's seed is everything outside the envelope, a band of
   4 % of the width on each side of the midline, and the brightest 20 % of the envelope outside the core
   (bone, heart, soft tissue);
5. a watershed of the gradient magnitude (Sobel) from these seeds, so each lung stops at the edges of the
   ribcage, the diaphragm and the mediastinum; then an opening with a 4-px disk, the two largest regions
   and hole filling (:func:`~lungscreen.lungs.postprocess.clean_mask`).

The two lungs are separate regions by construction: the midline band belongs to the background. The
parameters (core, bright share, band) were chosen on the training split of the public mask sets. On their
held-out patients (``lungscreen lungs evaluate benchmarks/cache/shared-manifest.parquet --method
classical``, 187 images) the mean Dice is 0.793 [0.782, 0.807] (Cohen 0.782, Radiography Database 0.775,
OpenIST 0.848), against 0.781 [0.769, 0.793] for the earlier threshold-and-prior method (0.769, 0.760,
0.841), which drew one region over both lungs and the neck on one OpenIST film in five; the U-Net reaches
0.95 (``benchmarks/results/lungs.json``). Enough for a first run on a fresh machine, not for a final
model: it under-segments dense consolidations (white lungs look like tissue) and fails on strongly rotated
or cropped films and laterals. It does not know the mask conventions: it draws the dark lung fields,
close to the heart-excluded convention.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
from skimage.filters import sobel, threshold_otsu
from skimage.segmentation import watershed

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
CORE_GROWTH = 0.9
#: Share of the envelope's pixels, the brightest, that seed the background outside the core.
BRIGHT_SHARE = 0.2
#: Where the midline is looked for, and the half-width of the band around it that is never lung.
MIDLINE_RANGE = (0.38, 0.62)
MIDLINE_BAND = 0.04
BACKGROUND, LEFT, RIGHT = 1, 2, 3


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


def midline(work: np.ndarray) -> int:
    """The column of the spine and mediastinum: the brightest (smoothed) column of the middle of the film."""
    size = work.shape[1]
    low, high = (int(share * size) for share in MIDLINE_RANGE)
    rows = slice(size // 4, 3 * size // 4)
    profile = work[rows, low:high].mean(axis=0).astype(np.float32)[None, :]
    return low + int(np.argmax(cv2.GaussianBlur(profile, (0, 0), 3).ravel()))


def seeds(work: np.ndarray) -> np.ndarray:
    """Watershed markers at the working size: LEFT and RIGHT lung seeds, BACKGROUND, 0 undecided."""
    size = work.shape[0]
    core, envelope = lung_prior(size, CORE_GROWTH), lung_prior(size, ENVELOPE_GROWTH)
    dark = work < threshold_otsu(work[envelope])
    middle = midline(work)
    markers = np.zeros(work.shape, np.int32)
    left = np.zeros(work.shape, bool)
    left[:, :middle] = True
    markers[core & dark & left] = LEFT
    markers[core & dark & ~left] = RIGHT
    background = ~envelope | ((work >= np.quantile(work[envelope], 1 - BRIGHT_SHARE)) & ~core)
    band = round(MIDLINE_BAND * size)
    background[:, max(0, middle - band): middle + band + 1] = True
    markers[background & (markers == 0)] = BACKGROUND
    return markers


def classical_lung_mask(image: np.ndarray) -> np.ndarray:
    """Lung mask of a frontal chest radiograph by a seeded watershed, bool at the image's size.

    Args:
        image: float32 (H, W) in [0, 1], white = dense.

    Returns:
        The lung mask: at most two regions, one on each side of the midline (may be empty when nothing
        lung-like is found; callers decide whether that is an error).
    """
    height, width = image.shape
    work = equalize_image(resize_image(np.asarray(image, np.float32), WORK_SIZE, WORK_SIZE))
    work = cv2.GaussianBlur(work, (0, 0), 2.0)
    labels = watershed(sobel(work), seeds(work))
    lungs = cv2.morphologyEx((labels >= LEFT).astype(np.uint8), cv2.MORPH_OPEN, _disk(4)).astype(bool)
    return resize_mask(clean_mask(lungs), height, width)
