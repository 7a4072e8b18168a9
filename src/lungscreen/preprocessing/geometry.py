"""Where the model's pixels came from: the window of the original image an input covers.

Preprocessing crops (the top 8 %, a centre square, the lung box) and resizes; a Grad-CAM heat-map or a
predicted mask comes out in the model's frame. Every step in lungscreen is an axis-aligned crop or
resize, so one box in the original image's pixels is enough to map anything back: the current image
covers ``box`` of the original, stretched to its own size.

Example:
    >>> geometry = Geometry.full(200, 100).cropped(50, 0, 150, 100, width=200, height=100)
    >>> geometry.box
    (50.0, 0.0, 150.0, 100.0)
    >>> float(geometry.to_original(np.ones((10, 10), np.float32)).sum())   # the 100 x 100 window, filled
    10000.0
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Geometry:
    """The original image's size and the box of it the current image covers.

    Attributes:
        width: original width in pixels.
        height: original height in pixels.
        box: (x0, y0, x1, y1) in original pixels (x1, y1 exclusive) shown by the current image.
    """

    width: int
    height: int
    box: tuple[float, float, float, float]

    @classmethod
    def full(cls, width: int, height: int) -> Geometry:
        """An image that is still its whole original."""
        return cls(int(width), int(height), (0.0, 0.0, float(width), float(height)))

    @property
    def window(self) -> tuple[float, float, float, float] | None:
        """The box the current image shows when a step cropped the original, None when it is still all of it."""
        return None if self.box == (0.0, 0.0, float(self.width), float(self.height)) else self.box

    def cropped(self, x0: float, y0: float, x1: float, y1: float, *, width: int, height: int) -> Geometry:
        """After cropping the window [x0:x1, y0:y1] of a current image of ``width`` x ``height``."""
        left, top, right, bottom = self.box
        sx, sy = (right - left) / width, (bottom - top) / height
        return Geometry(self.width, self.height,
                        (left + x0 * sx, top + y0 * sy, left + x1 * sx, top + y1 * sy))

    def to_original(self, values: np.ndarray, *, fill: float = 0.0, nearest: bool = False) -> np.ndarray:
        """A 2-D map in the current frame (any size) resampled onto the original image, ``fill`` outside.

        Args:
            values: heat-map (float) or mask (bool/uint8) covering the current image.
            fill: value outside the covered box.
            nearest: nearest-neighbour resampling (masks, labels) instead of bilinear (heat-maps).
        """
        x0, y0, x1, y1 = (int(round(v)) for v in self.box)
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(self.width, x1), min(self.height, y1)
        is_bool = values.dtype == np.bool_
        work = values.astype(np.uint8 if is_bool else np.float32)
        window = cv2.resize(work, (max(1, x1 - x0), max(1, y1 - y0)),
                            interpolation=cv2.INTER_NEAREST if nearest or is_bool else cv2.INTER_LINEAR)
        out = np.full((self.height, self.width), fill, dtype=work.dtype)
        out[y0:y1, x0:x1] = window
        return out.astype(bool) if is_bool else out

    def boxes_to_original(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """(n, 4) xyxy boxes in a current image of ``width`` x ``height`` -> original pixels."""
        left, top, right, bottom = self.box
        scale = np.array([(right - left) / width, (bottom - top) / height] * 2)
        return np.asarray(boxes, np.float64).reshape(-1, 4) * scale + np.array([left, top, left, top])

    def as_dict(self) -> dict[str, object]:
        return {"width": self.width, "height": self.height, "box": [round(v, 3) for v in self.box]}
