"""Small composable preprocessing steps, each a frozen dataclass whose fields are its parameters.

A step maps a :class:`Sample` (the image plus any masks aligned with it) to a new one. Intensity steps
change the image only; geometric steps (crops, resize) move every mask and box with the image, so a lung
mask, a reference mask or a finding's box stays aligned with the pixels whatever the chain does. Steps are named in configs by
their ``name`` and rebuilt from a dict, so a pipeline can be stored in a checkpoint as plain JSON:

    >>> step = transform_from_dict({"name": "top_crop", "fraction": 0.08})
    >>> step.to_dict()
    {'name': 'top_crop', 'fraction': 0.08}

The steps (paper in brackets):

==================  ==========================================================================================
``equalize``        global histogram equalization (000): uniform intensity dynamics whatever the scanner's
                    windowing, so exposure stops identifying the source. OpenCV on 256 grey levels.
``clahe``           contrast-limited adaptive equalization (OpenCV): local contrast, clip limit, tile grid.
``top_crop``        drop the top ``fraction`` of rows (004: 8 %, where text labels and markers sit).
``center_square``   the centred square of side min(height, width) (004).
``resize``          ``size`` x ``size`` (area averaging when shrinking; masks nearest-neighbour).
``normalize``       min-max rescale to [0, 1] (000); idempotent.
``segment_lungs``   lung mask from the U-Net (or the documented classical fallback); registered by
                    the ``lungs`` package's ``step`` module (preprocessing stands beneath segmentation and never
                    imports it); stored in ``sample.masks["lungs"]``, the image is unchanged.
``apply_lung_mask`` multiply by the lung mask blurred with a Gaussian of ``blur_radius`` px (000: 3 px,
                    so the network never sees a sharp lung edge it could use as a shape cue).
``crop_to_lungs``   crop to the lung bounding box plus a ``margin`` (share of the box side).
==================  ==========================================================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cv2
import numpy as np

from lungscreen.errors import ConfigError, LungscreenError
from lungscreen.preprocessing.geometry import Geometry

#: Mask key written by ``segment_lungs`` and read by ``apply_lung_mask`` and ``crop_to_lungs``.
LUNGS = "lungs"
#: Mask key of a row's own reference mask (the manifest's ``mask_path``), carried through geometric steps.
REFERENCE = "reference"
#: Mask key of the reference mask's unknown pixels (v7labs' grey "Ignore": devices and markup over the lungs).
IGNORE = "ignore"
#: Below this max-min spread an image holds no picture (all white, all black, one grey).
BLANK_SPREAD = 1e-3


class PreprocessingError(LungscreenError):
    """An image the preprocessing cannot handle (blank, no lungs found, mask of the wrong size, ...)."""


@dataclass
class Sample:
    """An image on its way through a pipeline.

    Attributes:
        image: (height, width) in [0, 1] as float32; after :func:`~lungscreen.preprocessing.model_input.preprocess`
            the same picture quantised to uint8 (0..255).
        masks: bool (height, width) arrays aligned with ``image`` (``"lungs"``, ``"reference"``, ...).
        boxes: float (N, 4) x0, y0, x1, y1 in the image's pixels (findings), moved by geometric steps.
        box_labels: one label per box.
        info: facts steps record (e.g. ``lung_method``: which segmenter drew the lungs).
        geometry: the window of the original image this image shows (crops update it, resizes keep it);
            None until a pipeline starts, which sets it to the whole image.
    """

    image: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    box_labels: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    geometry: Geometry | None = None

    def replace(self, image: np.ndarray | None = None, masks: dict[str, np.ndarray] | None = None, **changes: Any) -> Sample:
        """A copy with a new image (same geometry), masks or other fields; containers are copied."""
        return dataclasses.replace(self, image=self.image if image is None else image,
                                   masks=dict(self.masks if masks is None else masks),
                                   box_labels=list(changes.pop("box_labels", self.box_labels)),
                                   info=dict(changes.pop("info", self.info)), **changes)

    def framed(self) -> Sample:
        """This sample with its geometry set (the whole image when none was recorded yet)."""
        if self.geometry is not None:
            return self
        height, width = self.image.shape[:2]
        return self.replace(geometry=Geometry.full(width, height))


def check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    """The image as float32, or :class:`PreprocessingError` when it is not a usable 2-D picture in [0, 1]."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise PreprocessingError(f"{what} must be a 2-D grayscale array, got shape {image.shape}")
    if min(image.shape) < 2:
        raise PreprocessingError(f"{what} is too small ({image.shape[1]}x{image.shape[0]})")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise PreprocessingError(f"{what} holds NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise PreprocessingError(f"{what} values must lie in [0, 1], got [{low:.3g}, {high:.3g}]")
    if high - low < BLANK_SPREAD:
        shade = "white" if low > 0.9 else "black" if high < 0.1 else "one grey level"
        raise PreprocessingError(f"blank {what}: every pixel is {shade} ({low:.3f}); there is no chest to process")
    return image


def check_mask(mask: np.ndarray, shape: tuple[int, ...], what: str = "mask") -> np.ndarray:
    """A bool mask of exactly ``shape`` that marks at least one pixel, or :class:`PreprocessingError`."""
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise PreprocessingError(f"{what} of size {_size(mask.shape)} does not match the image size {_size(shape)}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        raise PreprocessingError(f"empty {what}: it marks no lung pixel, nothing would be left of the image")
    return mask


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in reversed(shape)) if len(shape) == 2 else str(shape)


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------

_TRANSFORMS: dict[str, type[Transform]] = {}


def register_transform(cls: type[Transform]) -> type[Transform]:
    """Class decorator adding a step to the registry under ``cls.name``."""
    if cls.name in _TRANSFORMS:
        raise ValueError(f"transform {cls.name!r} registered twice")
    _TRANSFORMS[cls.name] = cls
    return cls


def list_transforms() -> list[str]:
    return sorted(_TRANSFORMS)


def transform_from_dict(spec: dict[str, Any]) -> Transform:
    """Rebuild a step from ``{"name": ..., **parameters}``; :class:`ConfigError` naming the bad key."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"a preprocessing step must be a dict with a 'name', got {spec!r}")
    params = {key: value for key, value in spec.items() if key != "name"}
    name = spec["name"]
    if name not in _TRANSFORMS:
        hint = " (the lung segmentation package registers it when imported)" if name == "segment_lungs" else ""
        raise ConfigError(f"unknown preprocessing step {name!r}{hint}; known: {', '.join(list_transforms())}")
    cls = _TRANSFORMS[name]
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(f"step {name!r} has no parameter {', '.join(unknown)} (parameters: "
                          f"{', '.join(sorted(allowed)) or 'none'})")
    return cls(**params)


@dataclass(frozen=True)
class Transform:
    """Base of every step: ``name`` identifies it, dataclass fields are its parameters."""

    name: ClassVar[str] = ""

    def __call__(self, sample: Sample) -> Sample:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return {"name": self.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}}

    def resolved(self) -> Transform:
        """This step with every choice left to run time fixed (only ``segment_lungs`` has such choices)."""
        return self

    def _check_positive(self, key: str, value: float, *, upper: float | None = None, zero: bool = False) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not zero) \
                or (upper is not None and value >= upper):
            bound = f" and below {upper}" if upper is not None else ""
            raise ConfigError(f"{self.name}.{key} must be {'>= 0' if zero else '> 0'}{bound}, got {value!r}")


def crop(sample: Sample, y0: int, y1: int, x0: int, x1: int) -> Sample:
    """The window [y0:y1, x0:x1] of the image and every mask; boxes shifted, clipped, dropped when empty."""
    sample = sample.framed()
    height, width = sample.image.shape[:2]
    boxes = np.asarray(sample.boxes, np.float32).reshape(-1, 4) - np.array([x0, y0, x0, y0], np.float32)
    boxes = np.clip(boxes, 0, [x1 - x0, y1 - y0, x1 - x0, y1 - y0])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return sample.replace(image=sample.image[y0:y1, x0:x1], masks={k: m[y0:y1, x0:x1] for k, m in sample.masks.items()},
                          boxes=boxes[keep], box_labels=[label for label, kept in zip(sample.box_labels, keep, strict=True) if kept],
                          geometry=sample.geometry.cropped(x0, y0, x1, y1, width=width, height=height))


def resize(sample: Sample, height: int, width: int) -> Sample:
    """The image (area/bilinear), every mask (nearest) and the boxes (scaled) at ``height`` x ``width``.

    The geometry is kept: a resized image still shows the same window of the original.
    """
    sample = sample.framed()
    old_h, old_w = sample.image.shape[:2]
    scale = np.array([width / old_w, height / old_h] * 2, np.float32)
    return sample.replace(image=resize_image(sample.image, height, width),
                          masks={k: resize_mask(m, height, width) for k, m in sample.masks.items()},
                          boxes=np.asarray(sample.boxes, np.float32).reshape(-1, 4) * scale)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float to 0-255 uint8 (rounded)."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def equalize_image(image: np.ndarray) -> np.ndarray:
    """Global histogram equalization on 256 grey levels (OpenCV); output spans [0, 1]."""
    return cv2.equalizeHist(to_uint8(image)).astype(np.float32) / 255.0


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area averaging when shrinking, bilinear when growing (no aliasing, no blocky upscaling)."""
    if image.shape == (height, width):
        return image
    shrinking = height * width < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask."""
    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)


# ---------------------------------------------------------------------------------------------------------
# Intensity steps
# ---------------------------------------------------------------------------------------------------------

@register_transform
@dataclass(frozen=True)
class Equalize(Transform):
    """Global histogram equalization (paper 000): the same intensity dynamics for every scanner."""

    name: ClassVar[str] = "equalize"

    def __call__(self, sample: Sample) -> Sample:
        return sample.replace(image=equalize_image(sample.image))


@register_transform
@dataclass(frozen=True)
class CLAHE(Transform):
    """Contrast-limited adaptive histogram equalization (OpenCV ``createCLAHE``).

    Args:
        clip_limit: OpenCV's contrast limit per tile (higher = stronger local contrast; 2.0 is common).
        tile_grid: tiles per side; each is equalized on its own, then blended bilinearly.
    """

    name: ClassVar[str] = "clahe"
    clip_limit: float = 2.0
    tile_grid: int = 8

    def __post_init__(self) -> None:
        self._check_positive("clip_limit", self.clip_limit)
        if not isinstance(self.tile_grid, int) or self.tile_grid < 1:
            raise ConfigError(f"clahe.tile_grid must be a positive integer, got {self.tile_grid!r}")

    def __call__(self, sample: Sample) -> Sample:
        clahe = cv2.createCLAHE(clipLimit=float(self.clip_limit), tileGridSize=(self.tile_grid, self.tile_grid))
        return sample.replace(image=clahe.apply(to_uint8(sample.image)).astype(np.float32) / 255.0)


@register_transform
@dataclass(frozen=True)
class Normalize(Transform):
    """Min-max rescale to [0, 1] (paper 000). Idempotent; a blank image is an error, not a grey square."""

    name: ClassVar[str] = "normalize"

    def __call__(self, sample: Sample) -> Sample:
        image = sample.image
        low, high = float(image.min()), float(image.max())
        if high - low < BLANK_SPREAD:
            raise PreprocessingError(f"nothing left to normalize: every pixel is {low:.3f} after the previous steps")
        return sample.replace(image=((image - low) / (high - low)).astype(np.float32))


# ---------------------------------------------------------------------------------------------------------
# Geometric steps
# ---------------------------------------------------------------------------------------------------------

@register_transform
@dataclass(frozen=True)
class TopCrop(Transform):
    """Drop the top ``fraction`` of the rows (COVID-Net's public code: 8 %, where labels and markers sit)."""

    name: ClassVar[str] = "top_crop"
    fraction: float = 0.08

    def __post_init__(self) -> None:
        self._check_positive("fraction", self.fraction, upper=1.0, zero=True)

    def __call__(self, sample: Sample) -> Sample:
        height, width = sample.image.shape
        return crop(sample, round(height * self.fraction), height, 0, width)


@register_transform
@dataclass(frozen=True)
class CenterSquare(Transform):
    """The centred square of side min(height, width); idempotent."""

    name: ClassVar[str] = "center_square"

    def __call__(self, sample: Sample) -> Sample:
        height, width = sample.image.shape
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return crop(sample, top, top + side, left, left + side)


@register_transform
@dataclass(frozen=True)
class Resize(Transform):
    """Resize to ``size`` x ``size``; the image by area averaging (shrinking) or bilinear, masks nearest."""

    name: ClassVar[str] = "resize"
    size: int = 224

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 8:
            raise ConfigError(f"resize.size must be an integer >= 8, got {self.size!r}")

    def __call__(self, sample: Sample) -> Sample:
        return resize(sample, self.size, self.size)


@register_transform
@dataclass(frozen=True)
class CropToLungs(Transform):
    """Crop to the bounding box of ``masks["lungs"]``, widened by ``margin`` x the box side on each edge."""

    name: ClassVar[str] = "crop_to_lungs"
    margin: float = 0.05

    def __post_init__(self) -> None:
        self._check_positive("margin", self.margin, upper=1.0, zero=True)

    def __call__(self, sample: Sample) -> Sample:
        return crop_to_mask(sample, _lungs_of(sample, self.name), self.margin)


def crop_to_mask(sample: Sample, mask: np.ndarray, margin: float) -> Sample:
    """Crop to the bounding box of ``mask`` (not empty), widened by ``margin`` x the box side on each edge."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    height, width = mask.shape
    pad_y, pad_x = round((rows[-1] - rows[0] + 1) * margin), round((cols[-1] - cols[0] + 1) * margin)
    y0, y1 = max(0, rows[0] - pad_y), min(height, rows[-1] + 1 + pad_y)
    x0, x1 = max(0, cols[0] - pad_x), min(width, cols[-1] + 1 + pad_x)
    return crop(sample, int(y0), int(y1), int(x0), int(x1))


# ---------------------------------------------------------------------------------------------------------
# Lung steps
# ---------------------------------------------------------------------------------------------------------

def _lungs_of(sample: Sample, step: str) -> np.ndarray:
    if LUNGS not in sample.masks:
        raise ConfigError(f"{step} needs a lung mask: put segment_lungs before it in the pipeline")
    return check_mask(sample.masks[LUNGS], sample.image.shape, "lung mask")


def blur_mask(mask: np.ndarray, radius: float) -> np.ndarray:
    """A soft mask in [0, 1]: the bool mask blurred by a Gaussian of standard deviation ``radius`` pixels.

    ``radius`` follows PIL's ``GaussianBlur(radius)`` (radius = sigma), the usual reading of paper 000's
    "blurred ... using a 3 pixel radius". ``radius=0`` keeps the hard mask.
    """
    soft = mask.astype(np.float32)
    if radius <= 0:
        return soft
    return cv2.GaussianBlur(soft, (0, 0), sigmaX=float(radius), sigmaY=float(radius),
                            borderType=cv2.BORDER_REPLICATE)


@register_transform
@dataclass(frozen=True)
class ApplyLungMask(Transform):
    """Keep only the lungs (paper 000): multiply by the lung mask blurred with ``blur_radius`` pixels."""

    name: ClassVar[str] = "apply_lung_mask"
    blur_radius: float = 3.0

    def __post_init__(self) -> None:
        self._check_positive("blur_radius", self.blur_radius, zero=True)

    def __call__(self, sample: Sample) -> Sample:
        soft = blur_mask(_lungs_of(sample, self.name), self.blur_radius)
        return sample.replace(image=(sample.image * soft).astype(np.float32))


def params_digest(spec: Any) -> str:
    """A short stable hash of a JSON-able spec (cache keys)."""
    import json

    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
