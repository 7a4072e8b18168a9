"""``lungscreen export``: a run as a portable ONNX artefact that predicts without PyTorch.

The artefact is ``OUT.onnx`` (the classifier with its inference spec in the ONNX metadata) and, when the
run's pipeline segments the lungs with the U-Net, ``OUT.lungs.onnx`` beside it: the classifier's spec names
that file and pins its SHA-256, so a classifier never runs behind another lung model. Both are checked
against PyTorch on random inputs before they are written (max difference <= 1e-4).

``int8`` adds ``OUT.int8.onnx``: the classifier statically quantised (QDQ, per-channel int8 weights),
calibrated on images the caller gives (training or validation images, never test images), each prepared
through the run's own input path. Whether its answers hold is measured by ``benchmarks/predict.py``.

Example:
    >>> export_run("runs/covid-resnet-cpu", "covid.onnx")                       # doctest: +SKIP
    Export(model=PosixPath('covid.onnx'), lungs=PosixPath('covid.lungs.onnx'), ...)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungscreen.errors import ConfigError, LungscreenError
from lungscreen.io.files import file_sha256, iter_image_files
from lungscreen.io.images import read_image
from lungscreen.lungs.step import SegmentLungs, find_lung_model
from lungscreen.models.inference_spec import InferenceSpec
from lungscreen.models.onnx import export_checkpoint, quantize_int8
from lungscreen.preprocessing.model_input import prepare, spec_pipeline, to_array


@dataclass(frozen=True)
class Export:
    """What ``export_run`` wrote.

    Attributes:
        model: the classifier (fp32).
        lungs: the lung U-Net beside it, or None when the pipeline needs none.
        int8: the quantised classifier, or None.
        max_difference: largest |ONNX - PyTorch| output difference of the fp32 files on random inputs.
    """

    model: Path
    lungs: Path | None
    int8: Path | None
    max_difference: float


def export_run(run: str | Path, out: str | Path, *, calibration: Sequence[str | Path] = (),
               calibration_images: int = 128) -> Export:
    """Export a run's ``best.pt`` (and its lung U-Net) as ONNX; with ``calibration`` images, an int8 copy too.

    Raises:
        ConfigError: ``out`` is not a ``.onnx`` path, or the run is a multi-task model (its filtered inference
            decides per image which heads run, which one static graph cannot say).
        PreprocessingError: the pipeline's lung model is missing.
    """
    from lungscreen.models import load_checkpoint, resolve_checkpoint

    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ConfigError(f"--onnx: {out} must end in .onnx")
    checkpoint = load_checkpoint(resolve_checkpoint(run))
    if len(checkpoint.spec.heads) > 1:
        raise ConfigError(f"{checkpoint.path}: a multi-task model; its filtered inference (heads skipped per image) "
                          "does not export to one static graph: predict with the run folder")
    steps, lungs, differences = [], None, []
    for step in checkpoint.spec.input.pipeline["steps"]:
        if step["name"] == SegmentLungs.name and step.get("method") == "unet":
            lungs = out.with_name(f"{out.stem}.lungs.onnx")
            differences.append(export_checkpoint(load_checkpoint(lung_model(step)), lungs))
            step = {**step, "method": "onnx", "model": lungs.name, "weights_sha256": file_sha256(lungs)}
        steps.append(step)
    spec = checkpoint.spec.with_pipeline_steps(steps)
    differences.append(export_checkpoint(checkpoint, out, spec=spec))
    int8 = None
    if calibration:
        int8 = quantize_int8(out, out.with_name(f"{out.stem}.int8.onnx"),
                             calibration_batches(checkpoint.spec, calibration, calibration_images))
    return Export(out, lungs, int8, max(differences))


def lung_model(step: dict) -> Path:
    """The lung model file a resolved ``segment_lungs`` step pinned (by SHA-256)."""
    path = find_lung_model(step.get("model"), step.get("weights_sha256"))
    if path is None:
        raise ConfigError(f"the run's pipeline needs the lung model {step.get('model')} (SHA-256 "
                          f"{str(step.get('weights_sha256'))[:16]}...), which is not on this machine")
    return path


def calibration_batches(spec: InferenceSpec, inputs: Sequence[str | Path], limit: int,
                        batch_size: int = 16) -> Iterator[np.ndarray]:
    """Up to ``limit`` images under ``inputs`` (unreadable ones skipped), prepared as the model eats them, in
    batches."""
    pipeline = spec_pipeline(spec.input)
    pictures = []
    for path in iter_image_files(*inputs):
        try:
            pictures.append(prepare(read_image(path).pixels, spec.input, pipeline).image)
        except LungscreenError:
            continue
        if len(pictures) == limit:
            break
    if not pictures:
        raise ConfigError(f"--int8: no usable images under {', '.join(map(str, inputs))} to calibrate on")
    for start in range(0, len(pictures), batch_size):
        yield to_array(pictures[start:start + batch_size], spec.input)
