"""Near-duplicate detection within and across sources.

The public COVID sets copy each other (Cohen images reappear in the COVID-19 Radiography Database,
Figure1 in both) after resizing, re-encoding, contrast changes, cropping or added arrows and dates. A
pair of images is a near-duplicate when

* their 64-bit pHashes (imagehash) differ in <= :data:`HASH_CANDIDATE` (10) bits, and
* their 32 x 32 grey thumbnails correlate >= :data:`MIN_CORRELATION` (0.94), and
* one more piece of evidence agrees: the thumbnails correlate >= :data:`CERTAIN_CORRELATION` (0.965),
  or the hashes differ in <= :data:`CERTAIN_HASH` (2) bits, or the fine detail (64 x 64 high-pass
  images: ribs, vessels, text) correlates >= :data:`MIN_DETAIL` (0.7).

How the thresholds were chosen (measured on ../shared/data, 5,147 images, by looking at the pairs on
either side of each threshold): chest X-rays share their low-frequency layout, so pHash alone pairs
different adults (distance <= 4 with thumbnail correlation 0.68-0.92 were all different people) and
the coarse thumbnail alone pairs different children (0.94-0.96 at distance 8-10). Real copies agree in
detail too (high-pass correlation 0.7-1.0), except copies that gained burnt-in text, which still agree
almost exactly in layout (>= 0.965) or in hash (<= 2 bits). Pearson correlation ignores brightness and
contrast, which re-encoded copies often change. With these rules the shared folders give 138 Cohen /
Radiography-COVID pairs, 7 Radiography-normal / NIH pairs and Figure1 copies in both, as the data README
describes. A missed copy leaks; a spurious pair only keeps two images in one split, so ties go to recall.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import imagehash
import numpy as np
from PIL import Image

from lungscreen.data.graph import connected_components

HASH_CANDIDATE = 10
CERTAIN_HASH = 2
MIN_CORRELATION = 0.94
CERTAIN_CORRELATION = 0.965
MIN_DETAIL = 0.7
THUMBNAIL = 32
DETAIL = 64
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


def detail_image(pixels: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm 64 x 64 high-pass image (thumbnail minus its blur): the fine structure."""
    small = cv2.resize(pixels.astype(np.float32), (DETAIL, DETAIL), interpolation=cv2.INTER_AREA)
    detail = (small - cv2.GaussianBlur(small, (0, 0), 3)).ravel()
    detail -= detail.mean()
    norm = float(np.linalg.norm(detail))
    return detail / norm if norm > 1e-9 else detail


@dataclass(frozen=True)
class DuplicatePair:
    """Two near-duplicate images (indices into the fingerprint list) and the evidence."""

    first: int
    second: int
    distance: int
    correlation: float


def find_duplicates(hashes: np.ndarray, thumbnails: np.ndarray,
                    detail: Callable[[int], np.ndarray]) -> list[DuplicatePair]:
    """Every near-duplicate pair among the images.

    Args:
        hashes: uint64 pHashes, shape (N,).
        thumbnails: float32 normalised thumbnails, shape (N, THUMBNAIL**2).
        detail: index -> :func:`detail_image` of that image; called (once per image) only for the few
            candidate pairs the first two tests leave undecided, so it may re-read the file.

    Pairwise Hamming distances are computed block by block with numpy's popcount, so 100,000 images
    need about 5e9 cheap operations and never an N x N matrix in memory.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    details = functools.lru_cache(maxsize=4096)(detail)
    pairs: list[DuplicatePair] = []
    for start in range(0, len(hashes), _BLOCK):
        block = hashes[start:start + _BLOCK]
        distance = np.bitwise_count(block[:, None] ^ hashes[None, start:])  # upper triangle only
        rows, columns = np.nonzero(distance <= HASH_CANDIDATE)
        keep = columns > rows
        first, second = start + rows[keep], start + columns[keep]
        bits = distance[rows[keep], columns[keep]].astype(np.int64)
        correlation = np.einsum("ij,ij->i", thumbnails[first], thumbnails[second])
        similar = correlation >= MIN_CORRELATION
        for i, j, d, c in zip(first[similar], second[similar], bits[similar], correlation[similar]):
            if c >= CERTAIN_CORRELATION or d <= CERTAIN_HASH or float(details(int(i)) @ details(int(j))) >= MIN_DETAIL:
                pairs.append(DuplicatePair(int(i), int(j), int(d), float(c)))
    return pairs


def duplicate_groups(count: int, pairs: list[DuplicatePair]) -> np.ndarray:
    """Connected components of the duplicate graph: a group id per image (-1 for images without a copy)."""
    components = connected_components(count, [(pair.first, pair.second) for pair in pairs])
    sizes = np.bincount(components, minlength=count)
    groups = np.full(count, -1, dtype=np.int64)
    in_group = sizes[components] > 1
    _, compact = np.unique(components[in_group], return_inverse=True)
    groups[in_group] = compact
    return groups


def copies_between(query: Sequence[str], reference: Sequence[str], *, query_hashes: Sequence[str] | None = None,
                   reference_hashes: Sequence[str] | None = None) -> list[tuple[int, int]]:
    """(query index, reference index) of every query image that is a near-duplicate of a reference image, by
    :func:`find_duplicates`' rule: the same image listed again (under another name or patient), re-encoded,
    resized or with a burnt-in date.

    Args:
        query, reference: image paths.
        query_hashes, reference_hashes: their pHashes as a manifest's ``phash`` column stores them (16 hex
            digits, '' where unknown); an image without one is read and hashed.

    Only the images whose pHash lies within :data:`HASH_CANDIDATE` bits of one on the other side are read
    for their thumbnails, so a check of a few hundred test images against thousands of training images reads
    few files beyond the test images themselves.
    """
    from lungscreen.io.images import read_image

    marks: dict[str, Fingerprint] = {}

    def mark(path: str) -> Fingerprint:
        if path not in marks:
            marks[path] = fingerprint(read_image(path).pixels)
        return marks[path]

    def hashes(paths: Sequence[str], stored: Sequence[str] | None) -> np.ndarray:
        known = list(stored) if stored is not None else [""] * len(paths)
        return np.array([int(h, 16) if h else mark(p).phash for p, h in zip(paths, known, strict=True)], np.uint64)

    ours, theirs = hashes(query, query_hashes), hashes(reference, reference_hashes)
    close: set[tuple[int, int]] = set()
    for start in range(0, len(ours), _BLOCK):
        distance = np.bitwise_count(ours[start:start + _BLOCK, None] ^ theirs[None, :])
        rows, columns = np.nonzero(distance <= HASH_CANDIDATE)
        close.update(zip((rows + start).tolist(), columns.tolist()))
    if not close:
        return []
    involved = [("q", i) for i in sorted({i for i, _ in close})] + [("r", j) for j in sorted({j for _, j in close})]
    paths = [query[i] if side == "q" else reference[i] for side, i in involved]
    union_hashes = np.array([ours[i] if side == "q" else theirs[i] for side, i in involved], np.uint64)
    thumbnails = np.stack([mark(path).thumbnail for path in paths])
    found = []
    for pair in find_duplicates(union_hashes, thumbnails, lambda k: detail_image(read_image(paths[k]).pixels)):
        (side_a, a), (side_b, b) = involved[pair.first], involved[pair.second]
        if side_a != side_b:
            found.append((a, b) if side_a == "q" else (b, a))
    return sorted(set(found))
