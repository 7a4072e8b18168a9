"""One image's whole answer: what the viewer shows and what a DICOM writer (the PACS integration) takes.

:func:`screen_image` runs a decoded image through a run's predictor (its own input path and operating
point), explains the answer with Grad-CAM on the original image, draws the lungs, and for a MultiCheXNet
run adds its boxes and mask. The :class:`Screening` keeps arrays on the ORIGINAL image's pixel grid and the
image's DICOM identity (study, series and SOP instance UIDs; never the patient's name or ID), so a result
can be written back into the study it came from.

Example:
    >>> result = screen_image(Predictor("runs/covid-resnet-cpu"), read_image("cxr.png"))   # doctest: +SKIP
    >>> result.prediction, result.as_dict()["probabilities"]                               # doctest: +SKIP
    ('COVID-19', {'normal': 0.02, 'pneumonia': 0.11, 'COVID-19': 0.87})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lungscreen.audit.explain import explain_sample, lung_segmenter, lungs_on, overlay
from lungscreen.errors import OutOfScope
from lungscreen.inference.predict import Predictor
from lungscreen.io.images import ChestImage, ImageMeta

#: Said wherever a screening is shown.
DISCLAIMER = ("Research tool, not a diagnostic device: it has not been cleared for clinical use, and its "
              "answers must not guide the care of a patient.")


@dataclass
class Screening:
    """A run's answer for one image, on the original image's pixel grid.

    Attributes:
        class_names: the classification head's classes, in output order.
        probabilities: one per class.
        prediction: the decided class (the stored operating point when there is one).
        heatmap: Grad-CAM of the predicted class on the original image (raw units, 0 where the model saw
            nothing), or None when not asked.
        lungs: the lung mask on the original image, or None where the segmenter found none.
        boxes: a multi-task run's boxes (k, 5: x0, y0, x1, y1, score), or None.
        mask: a multi-task run's predicted mask (first channel), or None.
        screened: a multi-task run's filter passed the image on to its box and mask heads (None otherwise).
        meta: what the file said (format, size, DICOM UIDs and modality).
        notes: things the reader should know (another modality scored with force, no lungs found, ...).
        lung_method: which segmenter drew ``lungs`` (``unet``, ``onnx``, or ``classical``: the rough fallback).
        seen: the box (x0, y0, x1, y1) of the original the model saw when its pipeline crops (the lung crop),
            None when it saw the whole image; the heat-map is zero outside it.
    """

    class_names: list[str]
    probabilities: np.ndarray
    prediction: str
    operating_point: dict[str, Any] | None
    ood: bool
    ood_score: float
    meta: ImageMeta
    heatmap: np.ndarray | None = None
    lungs: np.ndarray | None = None
    boxes: np.ndarray | None = None
    mask: np.ndarray | None = None
    screened: bool | None = None
    notes: list[str] = field(default_factory=list)
    lung_method: str = ""
    seen: tuple[float, float, float, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Everything but the arrays, as JSON-ready data."""
        return {"classes": self.class_names,
                "probabilities": {n: round(float(p), 6) for n, p in zip(self.class_names, self.probabilities, strict=True)},
                "prediction": self.prediction, "operating_point": self.operating_point,
                "decision": decision_text(self.class_names, self.probabilities, self.prediction, self.operating_point),
                "ood": self.ood,
                "ood_score": None if np.isnan(self.ood_score) else round(self.ood_score, 3),
                "screened": self.screened,
                "boxes": None if self.boxes is None else [[round(float(v), 1) for v in b[:4]] + [round(float(b[4]), 4)]
                                                          for b in self.boxes],
                "image": {"format": self.meta.format, "width": self.meta.width, "height": self.meta.height,
                          "modality": self.meta.modality, "study_instance_uid": self.meta.study_instance_uid,
                          "series_instance_uid": self.meta.series_instance_uid,
                          "sop_instance_uid": self.meta.sop_instance_uid},
                "lungs": {"method": self.lung_method or None, "found": self.lungs is not None},
                "seen": None if self.seen is None else [round(float(v), 1) for v in self.seen],
                "notes": self.notes, "disclaimer": DISCLAIMER}

    def picture(self, pixels: np.ndarray) -> np.ndarray:
        """RGB uint8 overlay of the heat-map, lung contour, boxes, mask and the window the model saw, captioned."""
        index = self.class_names.index(self.prediction) if self.prediction in self.class_names else 0
        caption = f"{self.class_names[index]} {float(self.probabilities[index]):.2f}"
        if self.lung_method == "classical" and self.lungs is not None:
            caption += " - lungs: rough classical outline"
        heatmap = self.heatmap if self.heatmap is not None else np.zeros_like(pixels, np.float32)
        return overlay(pixels, heatmap, self.lungs, caption, boxes=self.boxes, mask=self.mask, seen=self.seen)


def decision_text(class_names: list[str], probabilities: np.ndarray, prediction: str,
                  point: dict[str, Any] | None) -> str:
    """How the answer was decided, in words a reader can check against the probabilities.

    Example:
        >>> point = {"positive_class": "COVID-19", "threshold": 0.178, "chosen_on": "val split",
        ...          "figures": {"target_sensitivity": 0.95}}
        >>> decision_text(["normal", "pneumonia", "COVID-19"], np.array([0.2, 0.51, 0.29]), "COVID-19", point)
        'COVID-19 flagged: probability 0.29 is above the threshold 0.18 chosen for 95 % sensitivity on the val split; most probable class: pneumonia'
    """
    chances = {name: float(p) for name, p in zip(class_names, probabilities, strict=True)}
    top = max(chances, key=chances.__getitem__)
    if point is None:
        return (f"{prediction}: the most probable class (probability {chances[prediction]:.2f}); no operating point "
                "is stored with this model")
    positive, threshold = point["positive_class"], float(point["threshold"])
    mine, theirs = _distinct(chances[positive], threshold)
    target = (point.get("figures") or {}).get("target_sensitivity")
    why = (f"chosen for {100 * target:g} % sensitivity" if target else f"chosen by the rule {point.get('rule') or '?'}") \
        + f" on the {point.get('chosen_on') or 'validation split'}"
    if prediction == positive:
        also = "it is also the most probable class" if top == positive else f"most probable class: {top}"
        return f"{positive} flagged: probability {mine} is above the threshold {theirs} {why}; {also}"
    return (f"{positive} not flagged: probability {mine} is below the threshold {theirs} {why}; answer: {prediction}, "
            f"the most probable of the other classes ({chances[prediction]:.2f})")


def _distinct(value: float, threshold: float) -> tuple[str, str]:
    """Both numbers with the fewest decimals (2 to 4) that still tell them apart."""
    for digits in (2, 3, 4):
        if f"{value:.{digits}f}" != f"{threshold:.{digits}f}":
            break
    return f"{value:.{digits}f}", f"{threshold:.{digits}f}"


def gate_refusal(predictor: Predictor, sample: Any) -> str:  # noqa: ANN401 - a prepared Sample
    """Why the run's OOD gate refuses ``sample`` ('' if it does not).

    Raises:
        OutOfScope: the gate refuses it and the predictor was not told to force ("not screened: <reason>").
    """
    if predictor.spec.gate is None or predictor.multitask:
        return ""
    _, features = predictor.scores([sample])
    reason = predictor.refusals([sample], features)[0]
    if reason and not predictor.force:
        raise OutOfScope(f"not screened: {reason}")
    return reason


def screen_image(predictor: Predictor, image: ChestImage, *, segmenter: Any = None, explain: bool = True,
                 method: str = "gradcam") -> Screening:
    """The run's answer for ``image`` with its explanation (see the module docstring).

    Args:
        predictor: the loaded run.
        image: a decoded image (path, bytes or DICOM alike).
        segmenter: the lung segmenter (default: the run's pipeline's, else the installed U-Net, else the
            classical fallback); load it once for many images.
        explain: compute the Grad-CAM heat-map (``method``); an exported ONNX model has none (a note says so).

    Raises:
        OutOfScope: an image beyond the run's OOD gate ("not screened: ..."; ``predictor.force`` scores it).
        LungscreenError: an image the run cannot take (another modality without force, a blank image).
    """
    notes = [note] if (note := predictor.check_modality(image)) else []
    sample = predictor.prepare(image.pixels)
    score = predictor.distance(sample)
    refused = gate_refusal(predictor, sample)
    if refused:
        notes.append(f"beyond the OOD gate, scored with force: {refused}")
    segmenter = segmenter or lung_segmenter(predictor)
    lungs, lung_note = lungs_on(segmenter, image.pixels)
    notes += [lung_note] if lung_note else []
    if explain and predictor.onnx:
        explain = False
        notes.append("no Grad-CAM heat-map: this is an exported ONNX model (serve the run folder to see one)")
    if explain:
        explanation = explain_sample(predictor, image.pixels, [method], lungs=lungs, faithfulness=False,
                                     sample=sample)[0]
        heatmap = explanation.original
    else:
        heatmap = None
    dense = predictor.screen([sample])[0] if predictor.multitask else None
    probabilities = dense["probabilities"] if dense else predictor.probabilities([sample])[0]
    point = predictor.spec.operating_point
    return Screening(predictor.class_names, probabilities, predictor.decide(probabilities),
                     point.model_dump(mode="json") if point else None, bool(score > 1.0 or refused), float(score),
                     image.meta,
                     heatmap=heatmap, lungs=lungs, boxes=dense["boxes"] if dense else None,
                     mask=dense["mask"][0] if dense and dense["mask"] is not None else None,
                     screened=dense["positive"] if dense else None, notes=notes,
                     lung_method=getattr(segmenter, "method", ""), seen=sample.geometry.window)

