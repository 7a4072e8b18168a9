"""Segmenters: one interface over the trained U-Net and the classical fallback.

``segmenter.segment(image)`` returns a bool lung mask at the image's size; ``segment_batch`` does many
images in one forward pass (the fast path). A segmenter may return an empty mask (nothing lung-like found):
evaluation scores it, and the preprocessing step ``apply_lung_mask`` refuses it with a clear error.

The U-Net sees every image the same way, in training and at use: resized to 256 x 256 (area averaging)
and histogram-equalized, so exposure differences between hospitals do not reach it. Its output for the
requested convention is thresholded at 0.5, cleaned at 256 px (two largest regions, holes filled), and
brought back to the image's size with bilinear interpolation of the cleaned mask (smooth edges).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from lungscreen.lungs.classical import classical_lung_mask
from lungscreen.lungs.data import CONVENTIONS
from lungscreen.lungs.postprocess import clean_mask
from lungscreen.preprocessing.transforms import (
    PreprocessingError,
    equalize_image,
    resize_image,
)

#: Model name of the lung U-Net in the registry.
MODEL_NAME = "lung_unet"


def default_model_path() -> Path:
    """Where the lung model lives unless told otherwise: ``$LUNGSCREEN_LUNG_MODEL``, else
    ``$XDG_DATA_HOME/lungscreen/lung_unet.pt`` (``~/.local/share/lungscreen/lung_unet.pt``)."""
    if os.environ.get("LUNGSCREEN_LUNG_MODEL"):
        return Path(os.environ["LUNGSCREEN_LUNG_MODEL"]).expanduser()
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "lungscreen" / "lung_unet.pt"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) so repeated calls cost one ``stat``."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_input(image: np.ndarray, size: int) -> np.ndarray:
    """The U-Net's view of an image: ``size`` x ``size``, histogram-equalized, float32 in [0, 1]."""
    return equalize_image(resize_image(np.asarray(image, np.float32), size, size))


def to_image_size(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A mask from the working size to the image's, with bilinear smoothing of its edge."""
    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) >= 0.5


class Segmenter(Protocol):
    method: str
    convention: str
    weights_sha256: str | None

    def segment(self, image: np.ndarray) -> np.ndarray: ...

    def segment_batch(self, images: list[np.ndarray]) -> list[np.ndarray]: ...


class ClassicalSegmenter:
    """Thresholding and morphology (:mod:`lungscreen.lungs.classical`); knows no convention."""

    method = "classical"
    weights_sha256 = None

    def __init__(self, convention: str = CONVENTIONS[0]) -> None:
        self.convention = convention

    def segment(self, image: np.ndarray) -> np.ndarray:
        return classical_lung_mask(image)

    def segment_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return [self.segment(image) for image in images]


class UNetSegmenter:
    """A trained lung U-Net (our checkpoint format) and the convention whose channel it reads.

    Args:
        model: the network, in eval mode.
        meta: checkpoint metadata (``class_names`` = conventions, ``preprocessing.input_size``).
        convention: which output channel to use.
        weights_sha256: hash of the checkpoint file (recorded in pipelines and reports).
        batch_size: images per forward pass in :meth:`segment_batch`.
    """

    method = "unet"

    def __init__(self, model, meta: dict, convention: str, weights_sha256: str | None = None,
                 batch_size: int = 16, threshold: float = 0.5) -> None:
        names = list(meta.get("class_names", []))
        if convention not in names:
            raise PreprocessingError(f"the lung model draws {', '.join(names)}, not {convention!r}")
        self.model, self.meta, self.convention = model, meta, convention
        self.channel = names.index(convention)
        self.input_size = int(meta.get("preprocessing", {}).get("input_size", 256))
        self.weights_sha256 = weights_sha256
        self.batch_size, self.threshold = batch_size, threshold

    @classmethod
    def from_checkpoint(cls, path: str | Path, convention: str = CONVENTIONS[0]) -> UNetSegmenter:
        """Load a lung model written by ``lungscreen lungs train``.

        Raises:
            PreprocessingError: the file is not a lung segmentation model.
            WeightsError / UnsafeWeightsError: unreadable or unsafe file.
        """
        from lungscreen.models import load_checkpoint

        model, meta = load_checkpoint(path)
        if meta.get("name") != MODEL_NAME:
            raise PreprocessingError(f"{path}: a {meta.get('name')!r} checkpoint, not a lung model ({MODEL_NAME})")
        return cls(model, meta, convention, file_sha256(path))

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """Sigmoid outputs (N, conventions, S, S) for images of any size."""
        import torch

        batch = np.stack([prepare_input(image, self.input_size) for image in images])[:, None]
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(batch))
        return torch.sigmoid(logits).numpy()

    def segment_batch(self, images: list[np.ndarray], convention: str | None = None) -> list[np.ndarray]:
        channel = self.channel if convention is None else list(self.meta["class_names"]).index(convention)
        masks = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            probabilities = self.probabilities(chunk)[:, channel]
            for image, probability in zip(chunk, probabilities, strict=True):
                masks.append(to_image_size(clean_mask(probability >= self.threshold), *image.shape))
        return masks

    def segment(self, image: np.ndarray) -> np.ndarray:
        return self.segment_batch([image])[0]


def load_segmenter(method: str, model: str | Path | None = None, convention: str = CONVENTIONS[0]) -> Segmenter:
    """A segmenter by method (``unet`` needs ``model``), loaded once per process and file version."""
    if method == "classical":
        return ClassicalSegmenter(convention)
    if method != "unet":
        raise PreprocessingError(f"unknown lung segmentation method {method!r} (unet or classical)")
    if model is None:
        raise PreprocessingError("the U-Net segmenter needs a model file")
    path = Path(model).resolve()
    if not path.is_file():
        raise PreprocessingError(f"lung model {path}: no such file")
    stat = path.stat()
    return _load_unet(str(path), stat.st_size, stat.st_mtime_ns, convention)


@lru_cache(maxsize=8)
def _load_unet(path: str, size: int, mtime_ns: int, convention: str) -> UNetSegmenter:
    return UNetSegmenter.from_checkpoint(path, convention)
