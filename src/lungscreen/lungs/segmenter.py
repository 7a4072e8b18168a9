"""Segmenters: one interface over the trained U-Net and the classical fallback.

``segmenter.segment(image)`` returns a bool lung mask at the image's size; ``segment_batch`` does many
images in one forward pass (the fast path). A segmenter may return an empty mask (nothing lung-like found):
evaluation scores it, and the preprocessing step ``apply_lung_mask`` refuses it with a clear error.

The U-Net is fed through the one input path (:mod:`lungscreen.preprocessing.model_input`) with the input
spec its checkpoint carries (histogram-equalized, 256 x 256 for the shipped recipe), exactly as the
training engine fed it. Its output for the requested convention is thresholded at 0.5, cleaned at the
working size (two largest regions, holes filled), and brought back to the image's size with bilinear
interpolation of the cleaned mask (smooth edges).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

from lungscreen.lungs.classical import classical_lung_mask
from lungscreen.lungs.data import CONVENTIONS
from lungscreen.lungs.postprocess import clean_mask
from lungscreen.models.onnx import OnnxModel
from lungscreen.preprocessing.model_input import prepare, spec_pipeline, to_array
from lungscreen.preprocessing.transforms import PreprocessingError

#: Model name of the lung U-Net in the registry.
MODEL_NAME = "lung_unet"
#: The lung U-Net shipped with the package, and its training record (command, data, Dice, SHA-256).
SHIPPED_MODEL = Path(__file__).resolve().parent / "weights" / "lung_unet.pt"
SHIPPED_RECORD = SHIPPED_MODEL.with_suffix(".json")


def default_model_path() -> Path:
    """Where the user's own lung model lives unless told otherwise: ``$LUNGSCREEN_LUNG_MODEL``, else
    ``$XDG_DATA_HOME/lungscreen/lung_unet.pt`` (``~/.local/share/lungscreen/lung_unet.pt``), where
    ``lungscreen lungs train`` installs it."""
    if os.environ.get("LUNGSCREEN_LUNG_MODEL"):
        return Path(os.environ["LUNGSCREEN_LUNG_MODEL"]).expanduser()
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "lungscreen" / "lung_unet.pt"


def shipped_model() -> Path | None:
    """The lung U-Net that ships with lungscreen, checked against the SHA-256 its training record pins (None
    when this installation carries no weights).

    Raises:
        PreprocessingError: the weights are not the ones recorded (a damaged installation).
    """
    if not SHIPPED_MODEL.is_file() or not SHIPPED_RECORD.is_file():
        return None
    import json

    from lungscreen.io.files import file_sha256

    pinned = json.loads(SHIPPED_RECORD.read_text())["sha256"]
    if file_sha256(SHIPPED_MODEL) != pinned:
        raise PreprocessingError(f"the lung model shipped with lungscreen ({SHIPPED_MODEL}) does not match the SHA-256 "
                                 f"its record pins ({pinned[:16]}...): reinstall lungscreen, or train your own with "
                                 "`lungscreen lungs train MANIFEST`, or set segment_lungs.method=classical")
    return SHIPPED_MODEL


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
    """A trained lung U-Net (a segmentation checkpoint, or its ONNX export) and the convention whose channel
    it reads.

    Args:
        checkpoint: the loaded checkpoint (model in eval mode, its inference spec), or the exported
            :class:`~lungscreen.models.onnx.OnnxModel` (method ``onnx``: no torch).
        convention: which output channel to use.
        batch_size: images per forward pass in :meth:`segment_batch`.
        threshold: probability at or above which a pixel is lung.
    """

    method = "unet"

    def __init__(self, checkpoint, convention: str, batch_size: int = 16, threshold: float = 0.5) -> None:  # noqa: ANN001
        head = checkpoint.spec.head()
        if head.kind != "segmentation":
            raise PreprocessingError(f"{checkpoint.path}: a {head.kind} model, not a lung segmentation model")
        if convention not in head.classes:
            raise PreprocessingError(f"the lung model draws {', '.join(head.classes)}, not {convention!r}")
        self.checkpoint, self.convention = checkpoint, convention
        self.method = "onnx" if isinstance(checkpoint, OnnxModel) else "unet"
        self.classes = list(head.classes)
        self.channel = self.classes.index(convention)
        self.spec = checkpoint.spec
        self.pipeline = spec_pipeline(checkpoint.spec.input)
        self.input_size = checkpoint.spec.input.size
        self.weights_sha256 = checkpoint.sha256
        self.train_patients = set(checkpoint.meta.get("extra", {}).get("train_patients", []))
        self.batch_size, self.threshold = batch_size, threshold

    @classmethod
    def from_checkpoint(cls, path: str | Path, convention: str = CONVENTIONS[0]) -> UNetSegmenter:
        """Load a lung model written by ``lungscreen lungs train``.

        Raises:
            PreprocessingError: the file is not a segmentation model drawing ``convention``.
            WeightsError / UnsafeWeightsError / ConfigError: unreadable, unsafe or inconsistent file.
        """
        from lungscreen.models import load_checkpoint

        return cls(load_checkpoint(path), convention)

    def probabilities(self, images: list[np.ndarray]) -> tuple[np.ndarray, list]:
        """Sigmoid outputs (N, conventions, S, S) for images of any size, and each input's geometry."""
        samples = [prepare(image, self.spec.input, self.pipeline) for image in images]
        batch = to_array([s.image for s in samples], self.spec.input)
        return self.spec.probabilities(self.logits(batch)), [s.geometry for s in samples]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """The network's output for a prepared batch, on onnxruntime or PyTorch."""
        if self.method == "onnx":
            return self.checkpoint(batch)[self.spec.head().name]
        import torch

        with torch.inference_mode():
            return self.checkpoint.model(torch.from_numpy(batch)).float().numpy()

    def segment_batch(self, images: list[np.ndarray], convention: str | None = None) -> list[np.ndarray]:
        channel = self.channel if convention is None else self.classes.index(convention)
        masks = []
        for start in range(0, len(images), self.batch_size):
            probabilities, geometries = self.probabilities(images[start:start + self.batch_size])
            for probability, geometry in zip(probabilities[:, channel], geometries, strict=True):
                cleaned = clean_mask(probability >= self.threshold).astype(np.float32)
                masks.append(geometry.to_original(cleaned) >= 0.5)
        return masks

    def segment(self, image: np.ndarray) -> np.ndarray:
        return self.segment_batch([image])[0]


def load_segmenter(method: str, model: str | Path | None = None, convention: str = CONVENTIONS[0]) -> Segmenter:
    """A segmenter by method (``unet`` and ``onnx`` need ``model``), loaded once per process and file version."""
    if method == "classical":
        return ClassicalSegmenter(convention)
    if method not in ("unet", "onnx"):
        raise PreprocessingError(f"unknown lung segmentation method {method!r} (unet, onnx or classical)")
    if model is None:
        raise PreprocessingError(f"the {method} segmenter needs a model file")
    path = Path(model).resolve()
    if not path.is_file():
        raise PreprocessingError(f"lung model {path}: no such file")
    stat = path.stat()
    return _load_unet(method, str(path), stat.st_size, stat.st_mtime_ns, convention)


@lru_cache(maxsize=8)
def _load_unet(method: str, path: str, size: int, mtime_ns: int, convention: str) -> UNetSegmenter:
    if method == "onnx":
        return UNetSegmenter(OnnxModel(path), convention)
    return UNetSegmenter.from_checkpoint(path, convention)
