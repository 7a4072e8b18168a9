"""Batch prediction with a trained run: files and folders in, one row per image out.

The run's ``best.pt`` carries the model and its inference spec (input size, channels, scaling, the
preprocessing pipeline, the head's classes and activation), and every image goes through the one input
path (:mod:`lungscreen.preprocessing.model_input`) exactly as the training images did. An image that
cannot be read or preprocessed gets a row with empty probabilities and the reason in ``error``; the batch
goes on. A multi-frame DICOM gives one row per frame.

A multi-task run (MultiCheXNet, paper 001) adds its box and mask heads through the model's filtered
inference (``screen``): images its findings head calls negative get no boxes or mask (``screened`` is False),
the others get ``boxes`` (JSON ``[[x0, y0, x1, y1, score], ...]`` in the original image's pixels) and, when
a folder is given, one mask PNG per channel in the original image's frame (``mask`` names them).

An exported model (``lungscreen export RUN --onnx OUT.onnx``) is predicted with the same code on
onnxruntime, the lung U-Net its pipeline needs included, and torch is never imported.

A model is not silently used outside what it learned: a DICOM whose modality is not the model's is
refused (``force`` scores it, flagged); an image beyond the spec's out-of-distribution gate
(:mod:`~lungscreen.inference.gate`: the model's own features, the grey levels, the lungs) is not screened -
its row has no probabilities and says why in ``error`` ("not screened: ...") - unless ``force`` scores it
with the reason in ``note``. ``ood`` marks such an image, and one whose intensity histogram lies farther
from the training inputs' than 99 % of the training images did (``ood_score``: that distance over the
threshold).

Example:
    >>> frame = predict_paths("runs/covid-resnet-cpu", ["new_images/"])       # doctest: +SKIP
    >>> list(frame.columns)                                                     # doctest: +SKIP
    ['path', 'frame', 'normal', 'pneumonia', 'COVID-19', 'prediction', 'decided_by', 'ood', 'ood_score', 'note', 'error']
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

import lungscreen.lungs  # noqa: F401  (registers the segment_lungs preprocessing step a spec may name)
from lungscreen.errors import ConfigError, LungscreenError
from lungscreen.io.files import iter_image_files
from lungscreen.inference.gate import lung_statistics, refusals
from lungscreen.io.images import ChestImage, is_dicom, read_frames, read_image
from lungscreen.models.onnx import OnnxModel, is_onnx
from lungscreen.preprocessing import Sample
from lungscreen.preprocessing.model_input import prepare, reference_distance, spec_pipeline, to_array, to_tensor

if TYPE_CHECKING:
    from lungscreen.models import Checkpoint

#: DICOM Modality values -> the modality a model is trained on.
DICOM_MODALITIES = {"CR": "CXR", "DX": "CXR", "DR": "CXR", "RG": "CXR", "CT": "CT"}


class Predictor:
    """A loaded checkpoint and what its inference spec says about feeding it.

    Args:
        run: a run folder (its ``best.pt``), a checkpoint file, or an exported ``.onnx`` artefact (run on
            onnxruntime; no Grad-CAM, which needs the PyTorch model's gradients).
        modality: what the inputs are (``CXR`` or ``CT``) when the caller knows; None trusts DICOM tags and
            otherwise assumes the model's own.
        force: score inputs of another modality, or beyond the OOD gate, anyway (their rows say so) instead
            of refusing them.

    Raises:
        ConfigError / WeightsError: no checkpoint, an unsafe or version-1 file, a spec that contradicts its
            model, a model whose output is not one classification head, or inputs declared of another
            modality than the model's (without ``force``).
    """

    def __init__(self, run: str | Path, *, modality: str | None = None, force: bool = False) -> None:
        self.checkpoint: Checkpoint | OnnxModel = load_model(run)
        self.onnx = isinstance(self.checkpoint, OnnxModel)
        self.spec = self.checkpoint.spec
        classifiers = [h for h in self.spec.heads if h.kind in ("multiclass", "multilabel")]
        self.multitask = len(self.spec.heads) > 1
        if not classifiers or (self.multitask and not hasattr(getattr(self.checkpoint, "model", None), "screen")):
            kind = "segmentation" if not self.multitask else "multi-head model without filtered inference (screen)"
            raise ConfigError(f"{self.checkpoint.path}: a {kind} model; predict scores classifiers and MultiCheXNet "
                              "runs (lung models: `lungscreen lungs segment`)")
        self.head = classifiers[0]
        self.class_names = list(self.head.classes)
        self.pipeline = spec_pipeline(self.spec.input)
        #: the network: a torch module, or the onnxruntime session's wrapper for an exported model
        self.model = self.checkpoint if self.onnx else self.checkpoint.model.eval()
        self.force = force
        if modality is not None and modality != self.spec.modality and not force:
            raise ConfigError(f"--modality: the inputs are {modality} but {self.checkpoint.path} was trained on "
                              f"{self.spec.modality} images; its answers would mean nothing (--force to score anyway)")

    @property
    def classifier(self):  # noqa: ANN201  (a torch module; torch is not imported here)
        """The classification head alone (logits tensor out): what Grad-CAM explains (PyTorch runs only)."""
        if self.onnx:
            raise ConfigError(f"{self.checkpoint.path}: an exported ONNX model has no gradients to explain; "
                              "give the run folder for Grad-CAM")
        from lungscreen.models.layers import HeadOf

        return HeadOf(self.model, self.head.name).eval() if self.multitask else self.model

    def check_modality(self, image: ChestImage) -> str:
        """'' when the image may be scored; otherwise why not (or, with ``force``, a note for the row)."""
        tag = image.meta.modality
        modality = DICOM_MODALITIES.get(str(tag).upper()) if tag else None
        if modality is None or modality == self.spec.modality:
            return ""
        reason = f"DICOM modality {tag} ({modality}) but the model was trained on {self.spec.modality}"
        if not self.force:
            raise LungscreenError(f"{reason}; refused (--force to score anyway)")
        return reason + " (scored with --force)"

    def distance(self, sample: Sample) -> float:
        """How far the prepared input lies from the training inputs, in units of the 99 % threshold (NaN when
        the checkpoint records no reference)."""
        reference = self.spec.reference
        if reference is None:
            return float("nan")
        return reference_distance(sample.image, reference) / reference.threshold

    def prepare(self, image: np.ndarray | Sample) -> Sample:
        """A decoded image as the model's 8-bit input, with the geometry of what it shows."""
        return prepare(image, self.spec.input, self.pipeline)

    def probabilities(self, samples: Sequence[Sample]) -> np.ndarray:
        """(N, classes) probabilities of prepared samples (the classification head's softmax or sigmoid)."""
        return self.scores(samples)[0]

    def scores(self, samples: Sequence[Sample], *, features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities (N, classes), pooled embeddings (N, D) or None): the embeddings come along where the
        spec has an OOD gate (which reads them) or ``features`` asks for them, and the model gives them."""
        batch = to_array([s.image for s in samples], self.spec.input)
        wants = features or self.spec.gate is not None
        if self.onnx:
            outputs = self.model(batch)
            return self.spec.probabilities(outputs[self.head.name], self.head.name), outputs.get("features")
        import torch

        with torch.inference_mode():
            images = torch.from_numpy(batch)
            if wants and hasattr(self.model, "features") and not self.multitask:
                embedding = self.model.features(images)
                logits, embedding = self.model.classifier(embedding).float().numpy(), embedding.float().numpy()
            else:
                outputs = self.model(images)
                logits = (outputs[self.head.name] if isinstance(outputs, dict) else outputs).float().numpy()
                embedding = None
        return self.spec.probabilities(logits, self.head.name), embedding

    def refusals(self, samples: Sequence[Sample], features: np.ndarray | None) -> list[str]:
        """Per sample, why the OOD gate refuses it ('' when it does not, or when the spec has no gate)."""
        if self.spec.gate is None or features is None:
            return [""] * len(samples)
        return refusals(self.spec.gate, features, [self.distance(s) for s in samples],
                        [lung_statistics(s) for s in samples])

    def screen(self, samples: Sequence[Sample], *, threshold: float = 0.5) -> list[dict[str, Any]]:
        """A multi-task model's answer per sample, in the original image's pixels: ``probabilities``,
        ``positive`` (the findings head passed the image), ``boxes`` ((k, 5) x0, y0, x1, y1, score) and
        ``mask`` ((channels, H, W) bool) or None for images the filter stopped."""
        import torch

        with torch.inference_mode():
            found = self.model.screen(to_tensor([s.image for s in samples], self.spec.input), threshold=threshold)
        size = self.spec.input.size
        out = []
        probabilities = self.spec.activate(torch.stack([result["logits"] for result in found]), self.head.name).numpy()
        for sample, result, values in zip(samples, found, probabilities, strict=True):
            answer = {"probabilities": values, "positive": result["positive"], "boxes": None, "mask": None}
            if result["boxes"] is not None:
                boxes = sample.geometry.boxes_to_original(result["boxes"]["boxes"].numpy(), size, size)
                answer["boxes"] = np.column_stack([boxes, result["boxes"]["scores"].numpy()])
            if result["mask"] is not None:
                answer["mask"] = np.stack([sample.geometry.to_original(channel >= 0.5)
                                           for channel in result["mask"].numpy()])
            out.append(answer)
        return out

    @property
    def test_report(self) -> dict[str, Any] | None:
        """The run's own figures on its test split as training wrote them into best.pt (``split``, ``images``,
        ``patients``, ``counts``, ``figures`` with 95 % intervals), or None (no test, or an export)."""
        meta = getattr(self.checkpoint, "meta", None) or {}
        return (meta.get("extra") or {}).get("test")

    @property
    def decision_rule(self) -> str:
        """How ``prediction`` is decided, as written in every output row (``decided_by``)."""
        point = self.spec.operating_point
        if point is None:
            return "most probable class (no operating point stored)"
        return f"{point.positive_class} if p >= {point.threshold:.4g} (operating point: {point.rule}, on {point.chosen_on})"

    def decide(self, probabilities: np.ndarray) -> str:
        """The predicted class: the stored operating point when there is one, else the most probable class."""
        point = self.spec.operating_point
        if point is not None:
            positive = self.class_names.index(point.positive_class)
            if probabilities[positive] >= point.threshold:
                return point.positive_class
            others = [i for i in range(len(self.class_names)) if i != positive]
            return self.class_names[max(others, key=lambda i: probabilities[i])] if others else ""
        return self.class_names[int(np.argmax(probabilities))]


def load_model(run: str | Path) -> Checkpoint | OnnxModel:
    """An exported ``.onnx`` artefact on onnxruntime, else a run folder's or a file's PyTorch checkpoint."""
    if is_onnx(run):
        return OnnxModel(run)
    from lungscreen.models import load_checkpoint, resolve_checkpoint

    return load_checkpoint(resolve_checkpoint(run))


def decoded_images(path: Path) -> Iterator[tuple[int | None, ChestImage]]:
    """(frame index or None, image) of a file: every frame of a multi-frame DICOM, else the one image."""
    if is_dicom(path):
        frames = read_frames(path)
        if len(frames) > 1:
            yield from enumerate(frames)
            return
        yield None, frames[0]
        return
    yield None, read_image(path)


@dataclass
class Loaded:
    """One decoded and prepared image (one frame of a file), or why it could not be."""

    path: Path
    frame: int | None
    sample: Sample | None = None
    score: float = float("nan")
    note: str = ""
    error: str = ""


def load_file(predictor: Predictor, path: Path) -> list[Loaded]:
    """Decode a file and prepare each of its frames for the model; errors become rows, never exceptions."""
    loaded = []
    try:
        for frame, image in decoded_images(path):
            try:
                note = predictor.check_modality(image)
                sample = predictor.prepare(image.pixels)
            except LungscreenError as error:
                loaded.append(Loaded(path, frame, error=str(error)))
                continue
            loaded.append(Loaded(path, frame, sample, predictor.distance(sample), note))
    except LungscreenError as error:
        loaded.append(Loaded(path, None, error=getattr(error, "reason", None) or str(error)))
    return loaded


def prefetched(function: Callable[[Any], Any], items: Iterable[Any], *, workers: int, ahead: int) -> Iterator[Any]:
    """``function(item)`` for each item, in order, computed by ``workers`` threads up to ``ahead`` items in
    advance: decoding and preprocessing the next images while the model scores the current batch (image
    decoding, OpenCV, NumPy, PyTorch and onnxruntime release the GIL)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lungscreen-decode") as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(function, item))
            if len(window) > ahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def predict_paths(run: str | Path | Predictor, inputs: Iterable[str | Path], *, batch_size: int = 32,
                  progress: Callable[[int], None] | None = None, masks: Path | None = None,
                  workers: int = 1) -> pd.DataFrame:
    """Predict every image file named in ``inputs`` or found (recursively) under folders in it.

    Args:
        masks: folder for a multi-task run's mask PNGs (one per image and mask channel); None writes none.
        workers: threads decoding and preprocessing (lung segmentation included) ahead of the model; 0 does
            it all in the calling thread.

    Returns:
        One row per image (per frame for multi-frame DICOM): ``path``, ``frame``, a probability column
        per class (named by the class), ``prediction`` and ``decided_by`` (the stored operating point), ``ood`` and ``ood_score`` (see the module
        docstring), ``note`` (e.g. scored despite another modality) and ``error`` (empty, or why the image
        could not be used); a multi-task run adds ``screened``, ``boxes`` and ``mask``.
    """
    predictor = run if isinstance(run, Predictor) else Predictor(run)
    rows: list[dict[str, Any]] = []
    pending: list[tuple[int, Sample]] = []

    def flush() -> None:
        if not pending:
            return
        samples = [sample for _, sample in pending]
        if predictor.multitask:
            answers = predictor.screen(samples)
            for (row_index, _), answer in zip(pending, answers, strict=True):
                rows[row_index].update(dense_columns(predictor, answer, rows[row_index], row_index, masks))
            probabilities = np.stack([answer["probabilities"] for answer in answers])
            refused = [""] * len(samples)
        else:
            probabilities, features = predictor.scores(samples)
            refused = predictor.refusals(samples, features)
        for (row_index, _), values, reason in zip(pending, probabilities, refused, strict=True):
            row = rows[row_index]
            if reason:
                row["ood"] = True
                if not predictor.force:
                    row.update(error=f"not screened: {reason}", decided_by="")
                    continue
                row["note"] = "; ".join(filter(None, [row["note"], f"beyond the OOD gate, scored with --force: {reason}"]))
            row.update({name: float(p) for name, p in zip(predictor.class_names, values, strict=True)})
            row["prediction"] = predictor.decide(values)
        pending.clear()

    def row(item: Loaded) -> dict[str, Any]:
        extra = {"screened": False, "boxes": "", "mask": ""} if predictor.multitask else {}
        scored = item.sample is not None
        return {"path": str(item.path), "frame": "" if item.frame is None else item.frame,
                **{name: np.nan for name in predictor.class_names}, "prediction": "",
                "decided_by": predictor.decision_rule if scored else "", **extra,
                "ood": bool(scored and item.score > 1.0), "ood_score": round(item.score, 3) if scored else np.nan,
                "note": item.note, "error": item.error}

    load = functools.partial(load_file, predictor)
    files = iter_image_files(*inputs)
    loaded = prefetched(load, files, workers=workers, ahead=2 * batch_size) if workers else map(load, files)
    for done, items in enumerate(loaded, start=1):
        for item in items:
            rows.append(row(item))
            if item.sample is not None:
                pending.append((len(rows) - 1, item.sample))
        if len(pending) >= batch_size:
            flush()
        if progress is not None:
            progress(done)
    flush()
    extra = ["screened", "boxes", "mask"] if predictor.multitask else []
    columns = ["path", "frame", *predictor.class_names, "prediction", "decided_by", *extra, "ood", "ood_score", "note",
               "error"]
    return pd.DataFrame(rows, columns=columns)


def dense_columns(predictor: Predictor, answer: dict[str, Any], row: dict[str, Any], number: int,
                  masks: Path | None) -> dict[str, Any]:
    """A multi-task answer as row cells: whether the filter passed it, its boxes as JSON, its mask files."""
    import json

    from PIL import Image

    cells: dict[str, Any] = {"screened": bool(answer["positive"]), "boxes": "", "mask": ""}
    if answer["boxes"] is not None:
        cells["boxes"] = json.dumps([[round(float(v), 1) for v in box[:4]] + [round(float(box[4]), 4)]
                                     for box in answer["boxes"]])
    if answer["mask"] is not None and masks is not None:
        channels = next(h.classes for h in predictor.spec.heads if h.kind == "segmentation")
        stem = f"{number:05d}-{Path(row['path']).stem}" + (f"-{row['frame']}" if row["frame"] != "" else "")
        written = []
        for name, channel in zip(channels, answer["mask"], strict=True):
            path = masks / f"{stem}-{name}.png"
            Image.fromarray(channel.astype(np.uint8) * 255).save(path)
            written.append(str(path))
        cells["mask"] = ";".join(written)
    return cells
