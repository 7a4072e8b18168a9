"""Which instances of a PACS a model takes, decided from their headers before any pixel is retrieved.

A chest X-ray model takes frontal chest radiographs: modality CR or DX, view position PA or AP (or none
given: the model's own check on the pixels then decides), body part chest or none given. A CT model takes
CT images of the chest. Everything else that is an image is *skipped* with the reason; what is not an image
at all (reports, presentation states, key objects, segmentations) and lungscreen's own results are not
candidates and are never recorded.

Example:
    >>> verdict({"00080060": {"vr": "CS", "Value": ["CR"]}, "00185101": {"vr": "CS", "Value": ["LL"]}}, "CXR")
    'lateral view (ViewPosition LL)'
"""

from __future__ import annotations

from typing import Any

from lungscreen.inference.predict import DICOM_MODALITIES
from lungscreen.pacs.connection import tag
from lungscreen.pacs.documents import MANUFACTURER

#: Modalities whose instances are documents or annotations, not images to screen.
NOT_IMAGES = {"SR", "PR", "KO", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "REG", "RWV", "DOC", "AU", "ECG",
              "FID", "PLAN", "HD", "SMR", "ASMT", "MPR"}
#: ViewPosition values of a lateral film (and its decubitus variants).
LATERAL = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}
FRONTAL = {"PA", "AP"}
#: BodyPartExamined values that mean the chest.
CHEST = {"CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_LUNG"}
#: Which DICOM modalities a model of each kind reads, as QIDO searches for them by default.
SEARCHED = {"CXR": ("CR", "DX"), "CT": ("CT",)}


def searched_modalities(model_modality: str) -> tuple[str, ...]:
    """The DICOM modalities to search the PACS for, for a model trained on ``model_modality`` (CXR or CT)."""
    return SEARCHED.get(model_modality, tuple(k for k, v in DICOM_MODALITIES.items() if v == model_modality))


def is_candidate(item: dict[str, Any]) -> bool:
    """Whether an instance is an image someone might want screened (not a document, not our own result)."""
    modality = str(tag(item, "Modality", "") or "").upper()
    return modality not in NOT_IMAGES and str(tag(item, "Manufacturer", "") or "") != MANUFACTURER


def verdict(item: dict[str, Any], model_modality: str) -> str:
    """'' when a model of ``model_modality`` takes the instance (DICOM JSON header), else why not."""
    modality = str(tag(item, "Modality", "") or "").upper()
    reads = DICOM_MODALITIES.get(modality)
    if reads != model_modality:
        what = f"modality {modality or 'not given'}" + (f" ({reads})" if reads else "")
        return f"{what}: the model reads {model_modality} images"
    body = str(tag(item, "BodyPartExamined", "") or "").upper().strip()
    if body and body not in CHEST:
        return f"body part {body}, not the chest"
    if model_modality == "CXR":
        view = str(tag(item, "ViewPosition", "") or "").upper().strip()
        if view in LATERAL:
            return f"lateral view (ViewPosition {view})"
        if view and view not in FRONTAL:
            return f"not a frontal view (ViewPosition {view})"
    if int(tag(item, "NumberOfFrames", 1) or 1) > 1 and model_modality == "CXR":
        return "multi-frame image: a chest radiograph has one frame"
    return ""
