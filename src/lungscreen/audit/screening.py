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

    def as_dict(self) -> dict[str, Any]:
        """Everything but the arrays, as JSON-ready data."""
        return {"classes": self.class_names,
                "probabilities": {n: round(float(p), 6) for n, p in zip(self.class_names, self.probabilities, strict=True)},
                "prediction": self.prediction, "operating_point": self.operating_point, "ood": self.ood,
                "ood_score": None if np.isnan(self.ood_score) else round(self.ood_score, 3),
                "screened": self.screened,
                "boxes": None if self.boxes is None else [[round(float(v), 1) for v in b[:4]] + [round(float(b[4]), 4)]
                                                          for b in self.boxes],
                "image": {"format": self.meta.format, "width": self.meta.width, "height": self.meta.height,
                          "modality": self.meta.modality, "study_instance_uid": self.meta.study_instance_uid,
                          "series_instance_uid": self.meta.series_instance_uid,
                          "sop_instance_uid": self.meta.sop_instance_uid},
                "notes": self.notes, "disclaimer": DISCLAIMER}

    def picture(self, pixels: np.ndarray) -> np.ndarray:
        """RGB uint8 overlay of the heat-map, lung contour, boxes and mask on the image, captioned."""
        index = self.class_names.index(self.prediction) if self.prediction in self.class_names else 0
        caption = f"{self.class_names[index]} {float(self.probabilities[index]):.2f}"
        heatmap = self.heatmap if self.heatmap is not None else np.zeros_like(pixels, np.float32)
        return overlay(pixels, heatmap, self.lungs, caption, boxes=self.boxes, mask=self.mask)


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
        LungscreenError: an image the run cannot take (another modality without force, a blank image).
    """
    notes = [note] if (note := predictor.check_modality(image)) else []
    sample = predictor.prepare(image.pixels)
    score = predictor.distance(sample)
    lungs, lung_note = lungs_on(segmenter or lung_segmenter(predictor), image.pixels)
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
                     point.model_dump(mode="json") if point else None, bool(score > 1.0), float(score), image.meta,
                     heatmap=heatmap, lungs=lungs, boxes=dense["boxes"] if dense else None,
                     mask=dense["mask"][0] if dense and dense["mask"] is not None else None,
                     screened=dense["positive"] if dense else None, notes=notes)

