"""What a screening leaves in the study: a Structured Report and a Secondary Capture overlay, made with highdicom.

- The **report** is a Comprehensive SR holding a TID 1500 measurement report: one measurement group that
  references the screened instance and holds the probability of each class (NUM), the decision at the
  operating point and the out-of-distribution flag (CODE), the OOD score (NUM), the algorithm (name, version,
  and as parameters its SHA-256, the decision rule and the run's own test figures), and a comment with the
  decision rule and the statement that this is a research tool, not a diagnostic device.
- The **overlay** is a Secondary Capture (RGB) of the image with the Grad-CAM heat-map, the lung contour,
  the caption (class and probability) and a banner saying "research use only", on the original pixel grid.
  (highdicom's Parametric Map refuses a CR source, and a picture is what every viewer shows.)

Both copy the patient and study attributes from the screened instance (highdicom's ``evidence`` /
``from_ref_dataset``) and invent none. Their UIDs are new but deterministic (``2.25.`` + a name-based UUID of the
source instance and the model's SHA-256): the same model screening the same instance again makes the
same UIDs, so a result stored twice (a worker killed between storing and recording it) is one instance in
the PACS, never two, and a restarted worker can look for it by UID before screening again. The series UIDs
are per study and model, so a study gets one report series and one overlay series however many images
it holds.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from lungscreen.audit.screening import DISCLAIMER, Screening

#: Private coding scheme for the concepts DICOM has no code for (scheme designators starting "99" are local).
SCHEME = "99LUNGSCREEN"
#: What a viewer lists as the two new series.
SR_DESCRIPTION = "lungscreen screening report (research use only)"
OVERLAY_DESCRIPTION = "lungscreen heat-map (research use only)"
SR_SERIES_NUMBER, OVERLAY_SERIES_NUMBER = 9901, 9902
MANUFACTURER = "lungscreen"
BANNER = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
#: The namespace of the name-based UUIDs the results' UIDs are made of (any fixed UUID; never change it, or
#: results stored before would no longer be recognised).
UID_NAMESPACE = uuid.UUID("6f1c9a52-3d0e-5b8a-9f47-2c61d8e0a4b3")


@dataclass(frozen=True)
class Model:
    """The model a result names: its ``name`` (run or network), lungscreen's ``version``, the file's ``sha256``,
    how it decides (``rule``), its modality (CXR or CT) and its own test figures (one line, or '')."""

    name: str
    version: str
    sha256: str
    rule: str
    modality: str
    test_figures: str = ""


@dataclass(frozen=True)
class ResultUids:
    """The UIDs a screening's two documents get (see the module docstring)."""

    sr_series: str
    sr: str
    overlay_series: str
    overlay: str

    @classmethod
    def of(cls, study: str, instance: str, model_sha256: str) -> ResultUids:
        def uid(*parts: str) -> str:  # a name-based UUID (RFC 4122 version 5) under the 2.25 root
            return f"2.25.{uuid.uuid5(UID_NAMESPACE, '/'.join([model_sha256, *parts])).int}"

        return cls(uid(study, "sr-series"), uid(instance, "sr"), uid(study, "overlay-series"), uid(instance, "overlay"))


def describe_model(predictor: Any) -> Model:
    """The :class:`Model` of a loaded :class:`~lungscreen.inference.predict.Predictor` (run folder or ONNX)."""
    from importlib.metadata import version

    from lungscreen.io.files import file_sha256

    meta = getattr(predictor.checkpoint, "meta", {}) or {}
    extra = meta.get("extra") or {}
    name = str(extra.get("run") or meta.get("name") or predictor.checkpoint.path.stem)
    return Model(name=name, version=f"lungscreen {version('lungscreen')}", sha256=file_sha256(predictor.checkpoint.path),
                 rule=predictor.decision_rule, modality=predictor.spec.modality,
                 test_figures=figures_line(predictor.test_report))


def figures_line(report: dict[str, Any] | None) -> str:
    """The run's sensitivity and specificity on its own test split with their 95 % intervals, as one line."""
    if not report:
        return ""
    shown = [f"{name} {figure['value']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}]"
             for name, figure in (report.get("figures") or {}).items()
             if name.split("/")[0] in ("sensitivity", "specificity") and figure and figure.get("value") is not None
             and figure.get("low") is not None and figure.get("high") is not None]
    if not shown:
        return ""
    size = ", ".join(f"{report[key]} {key}" for key in ("images", "patients") if report.get(key))
    return f"on its {report.get('split', 'test')} split ({size}): " + "; ".join(shown)


def structured_report(source: Any, screening: Screening, model: Model, uids: ResultUids) -> Any:
    """The TID 1500 report of ``screening`` of the instance ``source`` (a pydicom dataset)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    def concept(value: str, meaning: str) -> Code:
        return Code(value[:16], SCHEME, meaning[:64])

    measurements = [hd.sr.Measurement(name=concept(f"P-{index}", f"Probability of {name}"), value=float(value),
                                      unit=codes.UCUM.NoUnits)
                    for index, (name, value) in enumerate(zip(screening.class_names, screening.probabilities,
                                                              strict=True))]
    if np.isfinite(screening.ood_score):
        measurements.append(hd.sr.Measurement(name=concept("OOD-SCORE", "Out-of-distribution score"),
                                              value=float(screening.ood_score), unit=codes.UCUM.NoUnits))
    evaluations = [
        hd.sr.QualitativeEvaluation(concept("DECISION", "Screening decision"),
                                    concept(f"C-{screening.class_names.index(screening.prediction)}"
                                            if screening.prediction in screening.class_names else "C-NONE",
                                            screening.prediction or "none")),
        hd.sr.QualitativeEvaluation(concept("OOD", "Out of distribution"), codes.SCT.Yes if screening.ood else codes.SCT.No),
    ]
    parameters = [f"SHA-256 {model.sha256}", f"decision: {model.rule}"]
    if model.test_figures:
        parameters.append(f"test figures {model.test_figures}")
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.sr, identifier="lungscreen screening"),
        algorithm_id=hd.sr.AlgorithmIdentification(name=model.name, version=model.version, parameters=parameters),
        measurements=measurements, qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])
    notes = "; ".join(screening.notes)
    comment = (f"{screening.prediction or 'no decision'} by {model.name} ({model.version}); decision: {model.rule}"
               + (f"; notes: {notes}" if notes else "") + f". {DISCLAIMER}")
    group[0].ContentSequence.append(hd.sr.TextContentItem(name=codes.DCM.Comment, value=comment[:1024],
                                                          relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    observer = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=ResultUids.of("device", "device", model.sha256).sr, name="lungscreen", manufacturer_name=MANUFACTURER,
        model_name=model.name[:64])
    procedure = codes.cid100.CTUnspecifiedBodyRegion if model.modality == "CT" else codes.cid100.XRUnspecifiedBodyRegion
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=observer)),
        procedure_reported=procedure, imaging_measurements=[group])
    return hd.sr.ComprehensiveSR(evidence=[source], content=report[0], series_instance_uid=uids.sr_series,
                                 series_number=SR_SERIES_NUMBER, sop_instance_uid=uids.sr,
                                 instance_number=int(source.get("InstanceNumber") or 1), manufacturer=MANUFACTURER,
                                 series_description=SR_DESCRIPTION)


def overlay_image(source: Any, screening: Screening, pixels: np.ndarray, uids: ResultUids) -> Any:
    """The Secondary Capture of the screening's picture on the source's pixel grid (``pixels`` as read)."""
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian

    picture = banner(screening.picture(pixels))
    given = [str(value) for value in (source.get("PatientOrientation") or [])]
    orientation = tuple(given) if len(given) == 2 else ("L", "F")  # highdicom needs one; blanked below if unknown
    image = hd.sc.SCImage.from_ref_dataset(
        source, picture, "RGB", 8, "PATIENT", series_instance_uid=uids.overlay_series,
        series_number=OVERLAY_SERIES_NUMBER, sop_instance_uid=uids.overlay,
        instance_number=int(source.get("InstanceNumber") or 1), manufacturer=MANUFACTURER,
        patient_orientation=orientation, series_description=OVERLAY_DESCRIPTION,
        transfer_syntax_uid=ExplicitVRLittleEndian)
    if len(given) != 2:
        image.PatientOrientation = None  # type 2: present and empty, as the source did not say
    image.ImageComments = DISCLAIMER[:10240]
    image.DerivationDescription = "Grad-CAM heat-map and lung contour drawn by lungscreen on the referenced image"
    return image


def banner(picture: np.ndarray) -> np.ndarray:
    """The picture with :data:`BANNER` along its bottom edge (white on black), so no viewer shows it bare."""
    import cv2

    height, width = picture.shape[:2]
    scale = max(0.3, min(height, width) / 1100)
    thickness = max(1, round(scale * 1.5))
    (text_width, text_height), base = cv2.getTextSize(BANNER, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    scale *= min(1.0, 0.96 * width / max(text_width, 1))
    (text_width, text_height), base = cv2.getTextSize(BANNER, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    out = picture.copy()
    top = max(0, height - text_height - base - 6)
    out[top:, :] = 0
    cv2.putText(out, BANNER, (max(2, (width - text_width) // 2), height - base - 3), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (255, 255, 255), thickness, cv2.LINE_AA)
    return out


def referenced_instance(report: Any) -> str | None:
    """The SOP instance UID a lungscreen report references (its evidence), or None."""
    for study in report.get("CurrentRequestedProcedureEvidenceSequence") or []:
        for series in study.get("ReferencedSeriesSequence") or []:
            for item in series.get("ReferencedSOPSequence") or []:
                return str(item.ReferencedSOPInstanceUID)
    return None
