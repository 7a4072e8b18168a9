"""Explanations of a trained classifier's answers: heat-maps on the original images, and what they are worth.

For every image and CAM method (:mod:`lungscreen.audit.cams`): the image goes through the run's own input
path (:meth:`Predictor.prepare`), the raw map of the explained class is computed on the model input and
mapped back onto the ORIGINAL image through the sample's geometry (zero where preprocessing cropped the
picture away), and a PNG shows it there: the map in a colour scale whose opacity follows its strength,
the lung contour drawn by the lung segmenter on the original image (the pipeline's own lung step when it
has one, else ``segment_lungs(method="auto")``), and the class with its probability.

The table beside the pictures has one row per image and method:

* ``class`` / ``probability``: the explained class (the predicted one by default, decided by the spec's
  operating point when it has one) and the model's probability of it.
* ``lung_attention_ratio``: share of the map inside the lungs over the share of the lungs, measured in the
  window of the original the model saw (1 = no preference, > 1 = on the lungs, < 1 = elsewhere).
* ``faithfulness``: ROAD combined (probability units, [-0.5, 0.5]): > 0 the map's pixels are what the
  answer depends on, ~0 the map explains nothing, < 0 it points away from the evidence. NaN when not asked.
* ``file`` (the PNG), ``map_file`` (the raw map on the original, float32 ``.npy``, when asked), ``note``
  (e.g. no lungs found) and ``error`` (why the image could not be explained; the others go on).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from lungscreen.audit.cams import (
    cam_layer,
    check_method,
    class_activation_maps,
    lung_attention_ratio,
    road_faithfulness,
)
from lungscreen.errors import ConfigError, LungscreenError
from lungscreen.inference.predict import Predictor, decoded_images
from lungscreen.io.files import atomic_path, iter_image_files
from lungscreen.preprocessing import Sample
from lungscreen.preprocessing.model_input import to_tensor

COLUMNS = ["path", "frame", "method", "class", "probability", "lung_attention_ratio", "faithfulness", "file",
           "map_file", "note", "error"]


@dataclass(frozen=True)
class Explanation:
    """One method's explanation of one image.

    Attributes:
        cam: raw map in the model's input frame (S, S).
        original: the same map on the original image (H, W), 0 where the model saw nothing.
        seen: the box of the original the model saw when its pipeline crops, None for the whole image.
    """

    method: str
    class_name: str
    probability: float
    cam: np.ndarray
    original: np.ndarray
    lung_attention_ratio: float
    faithfulness: float
    seen: tuple[float, float, float, float] | None = None


def load_predictor(run: str | Path | Predictor) -> Predictor:
    """A predictor whose model can be explained; ConfigError naming the run for a segmentation model or a
    classifier without ``cam_layer``."""
    if isinstance(run, Predictor):
        predictor = run
    else:
        try:
            predictor = Predictor(run)
        except ConfigError as error:
            if "segmentation model" not in str(error):
                raise
            raise ConfigError(f"RUN: {run} is a segmentation model; explain needs a classifier "
                              "(its maps come from the classifier's last feature map, cam_layer)") from None
    try:
        cam_layer(predictor.model)
    except ConfigError as error:
        raise ConfigError(f"RUN: {predictor.checkpoint.path}: {error}") from None
    return predictor


def target_index(predictor: Predictor, target: str | None, option: str = "target") -> int | None:
    """The class index ``target`` names (None: the prediction), or a ConfigError listing the classes."""
    if target is None:
        return None
    if target not in predictor.class_names:
        raise ConfigError(f"{option}: unknown class {target!r}; the model's classes: {', '.join(predictor.class_names)}")
    return predictor.class_names.index(target)


def lung_segmenter(predictor: Predictor) -> Any:
    """The segmenter the run's pipeline uses for lungs, else the default (U-Net if installed, else classical)."""
    from lungscreen.lungs.step import SegmentLungs

    step = predictor.pipeline.lung_step or SegmentLungs(method="auto").resolved()
    return step.segmenter()


def explain_sample(predictor: Predictor, pixels: np.ndarray, methods: Sequence[str], *, target: int | None = None,
                   lungs: np.ndarray | None = None, faithfulness: bool = True,
                   sample: Sample | None = None) -> list[Explanation]:
    """Explain one decoded image (float (H, W) in [0, 1]) with each method; ``lungs`` a bool (H, W) mask;
    ``sample``: the image already prepared by ``predictor.prepare`` (its preprocessing is then not run again)."""
    sample = sample if sample is not None else predictor.prepare(pixels)
    probabilities = predictor.probabilities([sample])[0]
    index = target if target is not None else _predicted_index(predictor, probabilities)
    inputs = to_tensor([sample.image], predictor.spec.input)
    seen = _seen(sample)
    out = []
    for method in methods:
        cam = class_activation_maps(predictor.classifier, inputs, [index], method)
        road = (float(road_faithfulness(predictor.classifier, inputs, cam, [index],
                                        activation=predictor.head.activation)[0]) if faithfulness else np.nan)
        original = sample.geometry.to_original(cam[0])
        ratio = lung_attention_ratio(original[seen], lungs[seen]) if lungs is not None else np.nan
        out.append(Explanation(method, predictor.class_names[index], float(probabilities[index]), cam[0], original,
                               ratio, road, sample.geometry.window))
    return out


def _predicted_index(predictor: Predictor, probabilities: np.ndarray) -> int:
    decided = predictor.decide(probabilities)
    return predictor.class_names.index(decided) if decided else int(np.argmax(probabilities))


def _seen(sample: Sample) -> np.ndarray:
    """Bool mask of the original pixels the model input shows."""
    side = sample.image.shape[0]
    return sample.geometry.to_original(np.ones((side, side), bool))


def overlay(pixels: np.ndarray, cam: np.ndarray, lungs: np.ndarray | None, caption: str, *,
            boxes: np.ndarray | None = None, mask: np.ndarray | None = None,
            seen: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """RGB uint8 picture: the gray image, the map in the jet colours with opacity following its strength
    (scaled by its own maximum for display only), the lung contour in green, the caption on top; a
    multi-task model's predicted mask contour in cyan and its boxes in yellow with their scores; ``seen``,
    the window of the original the model saw when its pipeline crops (the lung crop), as a dashed white
    frame (the map is zero outside it: the model saw nothing there)."""
    gray = np.clip(pixels * 255.0, 0, 255).astype(np.uint8)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB).astype(np.float32)
    peak = float(cam.max())
    strength = cam / peak if peak > 0 else np.zeros_like(cam)
    colours = cv2.cvtColor(cv2.applyColorMap((strength * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    alpha = (0.6 * strength)[..., None]
    picture = (base * (1 - alpha) + colours.astype(np.float32) * alpha).astype(np.uint8)
    height, width = gray.shape
    thickness = max(1, round(min(height, width) / 300))
    if lungs is not None and lungs.any():
        contours, _ = cv2.findContours(lungs.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(picture, contours, -1, (0, 255, 0), thickness)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(picture, contours, -1, (0, 255, 255), thickness)
    for x0, y0, x1, y1, score in (boxes if boxes is not None else []):
        cv2.rectangle(picture, (int(x0), int(y0)), (int(x1), int(y1)), (255, 255, 0), thickness)
        cv2.putText(picture, f"{score:.2f}", (int(x0) + 2, int(y1) - 3), cv2.FONT_HERSHEY_SIMPLEX,
                    max(0.3, min(height, width) / 900), (255, 255, 0), thickness, cv2.LINE_AA)
    if seen is not None:
        _dashed_box(picture, seen, thickness)
    return caption_band(picture, caption)


def _dashed_box(picture: np.ndarray, box: tuple[float, float, float, float], thickness: int) -> None:
    """A dashed white frame around ``box`` (x0, y0, x1, y1; x1, y1 exclusive)."""
    height, width = picture.shape[:2]
    x0, y0 = max(0, int(round(box[0]))), max(0, int(round(box[1])))
    x1, y1 = min(width - 1, int(round(box[2])) - 1), min(height - 1, int(round(box[3])) - 1)
    dash = max(4, min(height, width) // 60)
    for start in range(x0, x1, 2 * dash):
        for y in (y0, y1):
            cv2.line(picture, (start, y), (min(start + dash, x1), y), (255, 255, 255), thickness)
    for start in range(y0, y1, 2 * dash):
        for x in (x0, x1):
            cv2.line(picture, (x, start), (x, min(start + dash, y1)), (255, 255, 255), thickness)


def caption_band(picture: np.ndarray, text: str) -> np.ndarray:
    """The picture with ``text`` in a dark band across its top, the letters about 1/28 of its width high (never
    below 11 px), in a TrueType font (Pillow's own), so it reads at any image size; a text too long for one
    line is shrunk to fit."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = picture.shape[:2]
    size = max(11, round(width / 28))
    font = ImageFont.load_default(size=size)
    margin = max(2, size // 3)
    while size > 8 and font.getlength(text) > width - 2 * margin:
        size -= 1
        font = ImageFont.load_default(size=size)
    band = min(height, size + 2 * margin)
    out = picture.copy()
    out[:band] = (out[:band].astype(np.float32) * 0.35).astype(np.uint8)
    image = Image.fromarray(out)
    ImageDraw.Draw(image).text((margin, margin), text, font=font, fill=(255, 255, 255))
    return np.asarray(image)


def explain_images(predictor: str | Path | Predictor, paths: Iterable[str | Path], out_dir: str | Path,
                   methods: Sequence[str] = ("gradcam",), target: str | None = None, *, faithfulness: bool = True,
                   save_maps: bool = False, progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Write an overlay PNG per image (per DICOM frame) and method into ``out_dir``; return the table (see the
    module docstring for its columns).

    Args:
        predictor: a :class:`Predictor` or a run folder / checkpoint.
        paths: image files and folders (searched recursively).
        methods: CAM methods (:data:`lungscreen.audit.cams.CAM_METHODS`).
        target: class to explain on every image; None explains each image's predicted class.
        faithfulness: compute ROAD per map (imputation: about a second per map at 224 px).
        save_maps: also write each raw map on the original image as ``.npy`` (float32).
        progress: called with the number of files done.

    Raises:
        ConfigError: an unknown method or class, a model that cannot be explained.
    """
    predictor = load_predictor(predictor)
    methods = [check_method(m) for m in methods]
    index = target_index(predictor, target)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    segmenter = lung_segmenter(predictor)
    names: set[str] = set()
    rows: list[dict[str, Any]] = []
    for done, path in enumerate(iter_image_files(*paths), start=1):
        try:
            for frame, image in decoded_images(path):
                rows.extend(_explain_one(predictor, path, frame, image, methods, index, segmenter, out_dir, names,
                                         faithfulness=faithfulness, save_maps=save_maps))
        except LungscreenError as error:
            rows.append(_row(path, None, error=getattr(error, "reason", None) or str(error)))
        if progress is not None:
            progress(done)
    return pd.DataFrame(rows, columns=COLUMNS)


def _explain_one(predictor: Predictor, path: Path, frame: int | None, image: Any, methods: Sequence[str],
                 index: int | None, segmenter: Any, out_dir: Path, names: set[str], *, faithfulness: bool,
                 save_maps: bool) -> list[dict[str, Any]]:
    """Rows (and files) of one decoded image; an image the model cannot take gives one error row."""
    try:
        note = predictor.check_modality(image)
        lungs, lung_note = lungs_on(segmenter, image.pixels)
        explanations = explain_sample(predictor, image.pixels, methods, target=index, lungs=lungs,
                                      faithfulness=faithfulness)
        dense = predictor.screen([predictor.prepare(image.pixels)])[0] if predictor.multitask else {}
    except LungscreenError as error:
        return [_row(path, frame, error=str(error))]
    mask = dense.get("mask")
    rows = []
    for item in explanations:
        stem = _unique(names, f"{path.stem}{'' if frame is None else f'-f{frame}'}.{_slug(item.method)}")
        picture = overlay(image.pixels, item.original, lungs, f"{item.class_name} {item.probability:.2f} - {item.method}",
                          boxes=dense.get("boxes"), mask=mask[0] if mask is not None else None, seen=item.seen)
        file = _write_png(out_dir / f"{stem}.png", picture)
        map_file = _write_map(out_dir / f"{stem}.npy", item.original) if save_maps else ""
        rows.append(_row(path, frame, method=item.method, **{"class": item.class_name}, probability=item.probability,
                         lung_attention_ratio=item.lung_attention_ratio, faithfulness=item.faithfulness,
                         file=str(file), map_file=str(map_file), note="; ".join(n for n in (note, lung_note) if n)))
    return rows


def lungs_on(segmenter: Any, pixels: np.ndarray) -> tuple[np.ndarray | None, str]:
    """The lung mask on the original image and a note when there is none to measure against."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback's warning was shown once when the segmenter loaded
            lungs = np.asarray(segmenter.segment(pixels), bool)
    except LungscreenError as error:
        return None, f"no lung mask ({error})"
    if not lungs.any():
        return None, "no lungs found: lung_attention_ratio not measured"
    return lungs, ""


def _row(path: Path, frame: int | None, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"path": str(path), "frame": "" if frame is None else frame, "method": "", "class": "",
                           "probability": np.nan, "lung_attention_ratio": np.nan, "faithfulness": np.nan,
                           "file": "", "map_file": "", "note": "", "error": ""}
    row.update(fields)
    return row


def _slug(method: str) -> str:
    return method.replace("++", "pp")


def _unique(names: set[str], stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... when two inputs share a file name."""
    candidate, number = stem, 1
    while candidate in names:
        number += 1
        candidate = re.sub(r"(\.[^.]+)$", rf"-{number}\1", stem)
    names.add(candidate)
    return candidate


def _write_png(target: Path, picture: np.ndarray) -> Path:
    from PIL import Image

    with atomic_path(target) as temporary:
        Image.fromarray(picture).save(temporary, format="PNG")
    return target


def _write_map(target: Path, values: np.ndarray) -> Path:
    with atomic_path(target) as temporary, open(temporary, "wb") as handle:
        np.save(handle, values.astype(np.float32))
    return target
