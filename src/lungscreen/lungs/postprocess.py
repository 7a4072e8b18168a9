"""Cleaning a predicted lung mask: keep the two largest connected regions, fill their holes.

A chest has two lungs. A thresholded network output sometimes adds specks (a bright gas bubble, a
corner of the image) that would stretch the lung bounding box, or leaves holes where an opacity or a
device confused it; both are anatomically impossible and cheap to remove.

Example:
    >>> mask = np.zeros((20, 20), bool); mask[2:18, 2:8] = mask[2:18, 12:18] = True; mask[0, 19] = True
    >>> int(clean_mask(mask).sum())
    192
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: A second region smaller than this share of the largest is a speck, not a lung.
MIN_SECOND_LUNG = 0.1


def keep_largest_components(mask: np.ndarray, count: int = 2, min_relative_size: float = MIN_SECOND_LUNG) -> np.ndarray:
    """The ``count`` largest 8-connected regions of ``mask``, dropping those under ``min_relative_size`` x the largest.

    Args:
        mask: bool (H, W).
        count: regions to keep (2: the lungs).
        min_relative_size: regions smaller than this share of the largest one are dropped even if among
            the ``count`` largest (0 keeps them all).
    """
    mask = np.asarray(mask, dtype=bool)
    labels, found = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    if found <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1][:count]
    keep = [index + 1 for index in order if sizes[index] >= min_relative_size * sizes[order[0]]]
    return np.isin(labels, keep)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill every region of background fully enclosed by the mask."""
    return ndimage.binary_fill_holes(np.asarray(mask, dtype=bool))


def clean_mask(mask: np.ndarray, count: int = 2, min_relative_size: float = MIN_SECOND_LUNG) -> np.ndarray:
    """:func:`keep_largest_components` then :func:`fill_holes`."""
    return fill_holes(keep_largest_components(mask, count, min_relative_size))
