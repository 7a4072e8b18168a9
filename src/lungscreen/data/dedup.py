"""Near-duplicate detection within and across sources.

The public COVID sets copy each other (Cohen images reappear in the COVID-19 Radiography Database,
Figure1 in both) after resizing, re-encoding, cropping or added arrows. Two images are near-duplicates
when their perceptual hashes are close **and** their thumbnails agree:

* pHash (imagehash, 64 bits) Hamming distance <= :data:`HASH_CERTAIN` (4), or
* distance <= :data:`HASH_CANDIDATE` (10) and Pearson correlation of the 32 x 32 grey thumbnails
  >= :data:`MIN_CORRELATION` (0.95).

How the thresholds were chosen (measured on ../shared/data, Cohen vs the Radiography Database COVID
class, 646 x 1000 images): the nearest-hash distance per Cohen image is 0 for 93 images, 2 for 13 and 4
for 8 — all visually the same picture — then jumps into the population of unrelated pairs (most
images' nearest unrelated neighbour is 8-14 bits away). Between 6 and 10 bits the thumbnail correlation
separates the two: copies correlate >= 0.96, while different images of the *same* patient (follow-ups)
reach only 0.94 and unrelated chests mostly < 0.9. Pearson correlation ignores brightness and contrast
changes, which re-encoded copies often have.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import imagehash
import numpy as np
from PIL import Image

HASH_CERTAIN = 4
HASH_CANDIDATE = 10
MIN_CORRELATION = 0.95
THUMBNAIL = 32
_BLOCK = 256  # rows of the pairwise distance matrix computed at once (256 x N uint64 temporaries)


@dataclass(frozen=True)
class Fingerprint:
    """What dedup needs of an image: its 64-bit pHash and a zero-mean, unit-norm 32 x 32 thumbnail."""

    phash: int
    thumbnail: np.ndarray  # float32 (THUMBNAIL * THUMBNAIL,)


def fingerprint(pixels: np.ndarray) -> Fingerprint:
    """Fingerprint a grey image (float in [0, 1], any size)."""
    as_bytes = (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    phash = int(str(imagehash.phash(Image.fromarray(as_bytes))), 16)
    small = cv2.resize(pixels.astype(np.float32), (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA).ravel()
    small = small - small.mean()
    norm = float(np.linalg.norm(small))
    return Fingerprint(phash, (small / norm if norm > 1e-6 else small).astype(np.float32))


@dataclass(frozen=True)
class DuplicatePair:
    """Two near-duplicate images (indices into the fingerprint list) and the evidence."""

    first: int
    second: int
    distance: int
    correlation: float


def find_duplicates(hashes: np.ndarray, thumbnails: np.ndarray) -> list[DuplicatePair]:
    """Every near-duplicate pair among the images.

    Args:
        hashes: uint64 pHashes, shape (N,).
        thumbnails: float32 normalised thumbnails, shape (N, THUMBNAIL**2).

    Pairwise Hamming distances are computed block by block with numpy's popcount, so 100,000 images
    need about 5e9 cheap operations and never an N x N matrix in memory; thumbnail correlations are
    computed only for candidate pairs.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    pairs: list[DuplicatePair] = []
    for start in range(0, len(hashes), _BLOCK):
        block = hashes[start:start + _BLOCK]
        distance = np.bitwise_count(block[:, None] ^ hashes[None, start:])  # upper triangle only
        rows, columns = np.nonzero(distance <= HASH_CANDIDATE)
        keep = columns > rows
        rows, columns = rows[keep], columns[keep]
        first, second = start + rows, start + columns
        bits = distance[rows, columns].astype(np.int64)
        correlation = np.einsum("ij,ij->i", thumbnails[first], thumbnails[second])
        confirmed = (bits <= HASH_CERTAIN) | (correlation >= MIN_CORRELATION)
        pairs.extend(DuplicatePair(int(i), int(j), int(d), float(c)) for i, j, d, c in
                     zip(first[confirmed], second[confirmed], bits[confirmed], correlation[confirmed]))
    return pairs


def duplicate_groups(count: int, pairs: list[DuplicatePair]) -> np.ndarray:
    """Connected components of the duplicate graph: a group id per image (-1 for images without a copy)."""
    parent = np.arange(count)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for pair in pairs:
        a, b = root(pair.first), root(pair.second)
        if a != b:
            parent[max(a, b)] = min(a, b)
    roots = np.array([root(i) for i in range(count)])
    sizes = np.bincount(roots, minlength=count)
    groups = np.full(count, -1, dtype=np.int64)
    in_group = sizes[roots] > 1
    _, compact = np.unique(roots[in_group], return_inverse=True)
    groups[in_group] = compact
    return groups
