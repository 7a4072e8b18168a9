"""Near-duplicate detection: copies survive resizing, re-encoding, contrast changes and markup; distinct images do not pair."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from lungscreen.data.dedup import DuplicatePair, detail_image, duplicate_groups, find_duplicates, fingerprint


def smooth_image(seed: int, size: int = 256) -> np.ndarray:
    """A random, smooth grey picture with structure at several scales (like a radiograph, not like noise)."""
    rng = np.random.default_rng(seed)
    image = sum(gaussian_filter(rng.normal(size=(size, size)), sigma) * sigma for sigma in (4, 12, 30))
    image -= image.min()
    return (image / image.max()).astype(np.float32)


def jpeg_roundtrip(pixels: np.ndarray, quality: int = 70) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer), dtype=np.float32) / 255.0


def resized(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray((pixels * 255).astype(np.uint8)).resize(size, Image.BILINEAR), np.float32) / 255.0


def with_arrow(pixels: np.ndarray) -> np.ndarray:
    image = Image.fromarray((pixels * 255).astype(np.uint8))
    ImageDraw.Draw(image).line([(30, 30), (80, 70)], fill=255, width=3)
    return np.asarray(image, np.float32) / 255.0


COPIES = {
    "downscaled": lambda p: resized(p, (120, 120)),
    "squashed": lambda p: resized(p, (224, 180)),
    "re-encoded": jpeg_roundtrip,
    "brighter": lambda p: np.clip(p * 0.8 + 0.15, 0, 1),
    "annotated": with_arrow,
    "cropped 2%": lambda p: resized(p[3:-3, 3:-3], (256, 256)),
}


def search(images: list[np.ndarray]) -> list[DuplicatePair]:
    marks = [fingerprint(image) for image in images]
    hashes = np.array([m.phash for m in marks], dtype=np.uint64)
    return find_duplicates(hashes, np.stack([m.thumbnail for m in marks]), lambda i: detail_image(images[i]))


def pair_found(a: np.ndarray, b: np.ndarray) -> bool:
    return len(search([a, b])) == 1


@pytest.mark.parametrize("kind", COPIES)
def test_copies_are_found(kind: str) -> None:
    original = smooth_image(1)
    assert pair_found(original, COPIES[kind](original)), kind


def test_distinct_images_are_not_paired() -> None:
    assert search([smooth_image(seed) for seed in range(40)]) == []


def test_same_layout_different_detail_is_not_a_copy() -> None:
    # Two "patients" sharing the coarse anatomy (what fools pHash on chest films) but not the fine texture.
    layout = gaussian_filter(np.random.default_rng(5).normal(size=(256, 256)), 40)
    layout = (layout - layout.min()) / np.ptp(layout)
    a, b = (np.clip(layout + 0.04 * (smooth_image(seed) - 0.5), 0, 1).astype(np.float32) for seed in (1, 2))
    found = search([a, b])
    assert found == [] or found[0].correlation >= 0.965, "only an almost exact layout match may pair them"


def test_blockwise_search_finds_pairs_across_blocks() -> None:
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 700, dtype=np.uint64)
    thumbnails = rng.normal(size=(700, 1024)).astype(np.float32)
    thumbnails /= np.linalg.norm(thumbnails, axis=1, keepdims=True)
    hashes[500] = hashes[3] ^ np.uint64(0b111)          # 3 bits apart, same thumbnail: copy
    thumbnails[500] = thumbnails[3]
    hashes[650] = hashes[10] ^ np.uint64(0b11111111)    # 8 bits apart, thumbnails agree: copy
    thumbnails[650] = thumbnails[10]
    hashes[600] = hashes[20] ^ np.uint64(0b1)           # 1 bit apart but thumbnails disagree: not a copy
    asked = []
    pairs = find_duplicates(hashes, thumbnails, lambda i: asked.append(i) or np.ones(4) / 2)
    assert {(p.first, p.second) for p in pairs} == {(3, 500), (10, 650)}
    assert asked == [], "exact thumbnail matches need no detail look-up"


def test_groups_are_connected_components() -> None:
    pairs = [DuplicatePair(0, 3, 0, 1.0), DuplicatePair(3, 5, 2, 0.99), DuplicatePair(7, 8, 0, 1.0)]
    groups = duplicate_groups(10, pairs)
    assert groups[0] == groups[3] == groups[5] != groups[7] == groups[8]
    assert (groups[[1, 2, 4, 6, 9]] == -1).all()
