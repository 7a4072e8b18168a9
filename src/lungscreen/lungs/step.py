"""The ``segment_lungs`` preprocessing step: lungs drawn by the trained U-Net or the classical fallback.

The step lives here, beside the segmenters, and registers itself with the preprocessing registry on
import: preprocessing stands beneath lung segmentation and never imports it, so a pipeline naming
``segment_lungs`` is rebuilt once :mod:`lungscreen.lungs` has been imported (training, inference and the
command line do so).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lungscreen.data.labels import MASK_CONVENTIONS
from lungscreen.errors import ConfigError
from lungscreen.io.files import file_sha256
from lungscreen.lungs.segmenter import default_model_path, load_segmenter, shipped_model
from lungscreen.preprocessing.transforms import (
    LUNGS,
    PreprocessingError,
    Sample,
    Transform,
    register_transform,
)


class LungModelWarning(UserWarning):
    """No trained lung model is available, so the classical fallback segments the lungs."""


#: Values of ``segment_lungs.method``.
LUNG_METHODS = ("auto", "unet", "classical", "onnx")


@register_transform
@dataclass(frozen=True)
class SegmentLungs(Transform):
    """Draw the lungs into ``sample.masks["lungs"]`` with the trained U-Net, or the classical fallback.

    The same segmenter runs on every image, whatever its source: a row's own reference mask is never used
    in its place (sources with hand-drawn masks would get better masks than the others, a new shortcut).

    Args:
        method: ``"unet"`` (a trained lung model is required), ``"classical"`` (thresholding and
            morphology, :mod:`lungscreen.lungs.classical`) or ``"auto"``: the U-Net when a model file is
            found (the user's own or the one shipped with the package, :func:`find_lung_model`), otherwise
            (``$LUNGSCREEN_LUNG_MODEL`` names a missing file) the classical method with a loud
            :class:`LungModelWarning`. Never silently skipped.
            ``"onnx"``: the U-Net exported beside an ONNX classifier (``lungscreen export``); ``model`` names
            the file, ``weights_sha256`` pins it.
        model: lung model checkpoint; None looks where :func:`find_lung_model` says.
        convention: which lungs to draw, ``"heart-excluded"`` (visible lung fields, as the Montgomery and
            Shenzhen masks paper 000 trained on) or ``"behind-heart-included"`` (v7labs); see
            :mod:`lungscreen.lungs` for why the model has one output per convention.
        weights_sha256: SHA-256 of the model file; filled in when a pipeline is resolved, so a stored
            pipeline refuses a different lung model instead of quietly producing other masks.
        min_area: smallest share of the image the lungs may cover; below it the image is refused (a
            lateral view, a CT slice, not a chest film) instead of passing on a few specks as "lungs".
    """

    name: ClassVar[str] = "segment_lungs"
    method: str = "auto"
    model: str | None = None
    convention: str = "heart-excluded"
    weights_sha256: str | None = None
    min_area: float = 0.02
    _segmenter: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.method not in LUNG_METHODS:
            raise ConfigError(f"segment_lungs.method must be one of {', '.join(LUNG_METHODS)}, got {self.method!r}")
        if self.convention not in MASK_CONVENTIONS:
            raise ConfigError(f"segment_lungs.convention must be one of {', '.join(MASK_CONVENTIONS)}, "
                              f"got {self.convention!r}")
        self._check_positive("min_area", self.min_area, upper=1.0, zero=True)

    def resolved(self) -> SegmentLungs:
        """Fix the method and the model file (path and SHA-256) this step will use."""
        if self.method == "classical":
            return SegmentLungs(method="classical", convention=self.convention, min_area=self.min_area)
        if self.method == "onnx":
            if not self.model or not Path(self.model).is_file():
                raise PreprocessingError(f"the exported lung model {self.model} is missing (it travels beside the "
                                         "classifier's .onnx file)")
            if self.weights_sha256 and file_sha256(Path(self.model)) != self.weights_sha256:
                raise PreprocessingError(f"the exported lung model {self.model} is not the one this classifier was "
                                         f"exported with (SHA-256 differs from {self.weights_sha256[:16]}...)")
            return self
        path = find_lung_model(self.model, self.weights_sha256)
        if path is None and self.weights_sha256:
            raise PreprocessingError(
                f"this pipeline needs the lung model with SHA-256 {self.weights_sha256[:16]}... (made from "
                f"{self.model}); no file with that hash there or at {default_model_path()} ($LUNGSCREEN_LUNG_MODEL)")
        if path is None:
            if self.method == "unet":
                raise PreprocessingError(
                    f"no lung model at {default_model_path()}: train one with `lungscreen lungs train MANIFEST` "
                    "(or give segment_lungs.model)")
            warnings.warn(
                f"NO TRAINED LUNG MODEL (looked for {default_model_path()}): the lungs are segmented with the "
                "classical threshold + morphology fallback, which is much less accurate than the U-Net. Train "
                "the U-Net with `lungscreen lungs train MANIFEST` and preprocess again.",
                LungModelWarning, stacklevel=2)
            return SegmentLungs(method="classical", convention=self.convention, min_area=self.min_area)
        return SegmentLungs(method="unet", model=str(path.resolve()), convention=self.convention,
                            weights_sha256=file_sha256(path), min_area=self.min_area)

    def segmenter(self):
        """The segmenter this step runs (loaded once per process)."""
        if getattr(self, "_segmenter", None) is None:
            step = self.resolved()
            object.__setattr__(self, "_segmenter", load_segmenter(step.method, step.model, step.convention))
        return self._segmenter

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the loaded network (worker processes load their own)."""
        return {key: value for key, value in self.__dict__.items() if key != "_segmenter"}

    def __call__(self, sample: Sample) -> Sample:
        segmenter = self.segmenter()
        lungs = segmenter.segment(sample.image)
        share = float(lungs.mean())
        if share < self.min_area:
            raise PreprocessingError(f"the lungs found cover {share:.1%} of the image (minimum {self.min_area:.0%}): "
                                     "a lateral view, a CT slice or not a chest radiograph?")
        out = sample.replace(masks={**sample.masks, LUNGS: lungs})
        out.info["lung_method"] = segmenter.method
        return out


def find_lung_model(model: str | None, sha256: str | None = None) -> Path | None:
    """The lung model file to use: ``model`` if given, else ``$LUNGSCREEN_LUNG_MODEL`` when set, else the
    user's own (``~/.local/share/lungscreen/lung_unet.pt``, where ``lungs train`` installs it), else the U-Net
    shipped with the package (:data:`~lungscreen.lungs.segmenter.SHIPPED_MODEL`, pinned by its SHA-256).

    When ``sha256`` is given (a stored pipeline) only a file with that exact hash is accepted, looked for at
    ``model`` first and then at the default path, so a pipeline moves between machines with its model.

    Raises:
        PreprocessingError: ``model`` was named explicitly (without a hash) and does not exist.
    """
    if model and not sha256 and not Path(model).is_file():
        raise PreprocessingError(f"lung model {model}: no such file")
    candidates = [Path(model)] if model else []
    if sha256 or not model:
        candidates.append(default_model_path())
        if not os.environ.get("LUNGSCREEN_LUNG_MODEL"):  # a path the user set is the only one looked at
            shipped = shipped_model()
            candidates += [shipped] if shipped else []
    for path in candidates:
        if path.is_file() and (sha256 is None or file_sha256(path) == sha256):
            return path
    return None
