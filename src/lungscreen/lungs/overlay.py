"""Writing lung masks and overlays for people to look at (``lungscreen lungs segment``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console

from lungscreen.errors import LungscreenError
from lungscreen.io.files import write_png
from lungscreen.io.images import read_image
from lungscreen.preprocessing.transforms import to_uint8
from lungscreen.progress import progress_or_quiet

#: Overlay colours (BGR, as OpenCV writes them): lungs tinted red, their outline yellow.
TINT, OUTLINE, ALPHA = (40, 40, 230), (0, 220, 255), 0.35


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """BGR uint8 picture of the image with the lungs tinted and outlined."""
    gray = to_uint8(image)
    picture = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    tinted = picture.copy()
    tinted[mask] = TINT
    picture = cv2.addWeighted(tinted, ALPHA, picture, 1 - ALPHA, 0)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(mask.shape) / 256))
    cv2.drawContours(picture, contours, -1, OUTLINE, thickness)
    return picture


def segment_files(files: Sequence[Path], out_dir: Path, segmenter, *, batch_size: int = 16,
                  console: Console | None = None, progress: bool = True) -> list[tuple[str, str]]:
    """Segment image files, writing ``<stem>_mask.png`` (0/255) and ``<stem>_overlay.png`` into ``out_dir``.

    Returns:
        (path, reason) of every file that could not be read or gave no lung at all.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[str, str]] = []
    used: set[str] = set()
    with progress_or_quiet(progress) as bar:
        task = bar.add_task(f"segmenting lungs ({segmenter.method})", total=len(files))
        for start in range(0, len(files), batch_size):
            chunk, images = [], []
            for path in files[start:start + batch_size]:
                try:
                    images.append(read_image(path).pixels)
                    chunk.append(path)
                except LungscreenError as error:
                    failures.append((str(path), str(error)))
            for path, image, mask in zip(chunk, images, segmenter.segment_batch(images) if images else [], strict=True):
                stem = _unique(Path(path).stem, used)
                write_png(out_dir / f"{stem}_mask.png", mask.astype(np.uint8) * 255)
                write_png(out_dir / f"{stem}_overlay.png", overlay(image, mask))
                if not mask.any():
                    failures.append((str(path), f"{path}: no lung found (mask written empty)"))
            bar.advance(task, len(files[start:start + batch_size]))
    return failures


def _unique(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... when two inputs share a name."""
    name, count = stem, 1
    while name in used:
        count += 1
        name = f"{stem}-{count}"
    used.add(name)
    return name
