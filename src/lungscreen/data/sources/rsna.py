"""RSNA Pneumonia Detection Challenge (Kaggle ``rsna-pneumonia-detection-challenge``).

Layout::

    stage_2_train_labels.csv           patientId, x, y, width, height, Target   (one row per box; Target 0
                                       rows have no box)
    stage_2_detailed_class_info.csv    patientId, class: "Lung Opacity", "Normal",
                                       "No Lung Opacity / Not Normal"   (optional)
    stage_2_train_images/<patientId>.dcm

(``stage_1_*`` files of the first stage are read the same way when no stage-2 files are there.)

Labels: Target 1 -> pneumonia (fine "Lung Opacity"). Target 0 -> normal or, by the class file,
"No Lung Opacity / Not Normal" -> other. Without the class file a Target-0 image may be either - more than
half of them are abnormal - so it is kept as ``unknown`` rather than called normal.

Boxes are in the DICOM's own pixel frame; the adapter reads each DICOM's *header* (no pixels) for that
frame (Rows x Columns, 1024 x 1024 in the challenge), the view (ViewPosition PA/AP) and the age.
``patientId`` names one image of one patient.
"""

from __future__ import annotations

from pathlib import Path

from lungscreen.data.labels import NORMAL, OTHER, PNEUMONIA, UNKNOWN
from lungscreen.data.manifest import encode_boxes, new_row, normalize_view
from lungscreen.data.sources.base import Skips, SourceAdapter, read_table, register_source
from lungscreen.data.sources.common import age_group, blank, csv_header

#: class file value -> (canonical label, fine label); each must agree with Target.
CLASSES = {
    "Lung Opacity": (PNEUMONIA, "Lung Opacity"),
    "Normal": (NORMAL, "Normal"),
    "No Lung Opacity / Not Normal": (OTHER, "No Lung Opacity / Not Normal"),
}
BOX_LABEL = "Lung Opacity"
#: Size of every challenge DICOM; used only if a header lacks Rows/Columns.
CHALLENGE_FRAME = 1024
_HEADER_TAGS = ["Rows", "Columns", "ViewPosition", "PatientAge"]


def _stage(folder: Path) -> str | None:
    """The newest stage whose train-labels file is present ("stage_2", "stage_1"), or None."""
    for stage in ("stage_2", "stage_1"):
        if {"patientId", "Target"} <= csv_header(folder / f"{stage}_train_labels.csv"):
            return stage
    return None


@register_source
class RSNAPneumonia(SourceAdapter):
    name = "rsna"
    description = "RSNA Pneumonia Detection: stage_2_train_labels.csv (+ detailed class info) + DICOM, boxes"

    @classmethod
    def matches(cls, folder: Path) -> bool:
        return _stage(folder) is not None

    def read(self, folder: Path, skips: Skips) -> list[dict]:
        stage = _stage(folder)
        labels_path = folder / f"{stage}_train_labels.csv"
        table = read_table(labels_path, ("patientId", "x", "y", "width", "height", "Target"))
        classes = self._classes(folder / f"{stage}_detailed_class_info.csv", skips)
        images = folder / f"{stage}_train_images"
        rows = []
        for patient, records in self._by_patient(table, labels_path, skips).items():
            row = self._row(patient, records, classes, images / f"{patient}.dcm", skips)
            if row is not None:
                rows.append(row)
        return rows

    @staticmethod
    def _by_patient(table, path: Path, skips: Skips) -> dict[str, list[dict]]:
        grouped: dict[str, list[dict]] = {}
        for number, record in enumerate(table.to_dict("records"), start=2):
            if blank(record["patientId"]):
                skips.add(f"{path}:{number}", "blank patientId")
                continue
            grouped.setdefault(record["patientId"].strip(), []).append(record)
        return grouped

    @staticmethod
    def _classes(path: Path, skips: Skips) -> dict[str, set[str]] | None:
        """patientId -> its class values, or None when the class file is absent."""
        if not path.is_file():
            return None
        table = read_table(path, ("patientId", "class"))
        classes: dict[str, set[str]] = {}
        for record in table.to_dict("records"):
            classes.setdefault(record["patientId"].strip(), set()).add(record["class"].strip())
        return classes

    def _row(self, patient: str, records: list[dict], classes: dict[str, set[str]] | None, path: Path,
             skips: Skips) -> dict | None:
        targets = {str(r["Target"]).strip() for r in records}
        if len(targets) != 1 or not targets <= {"0", "1"}:
            skips.add(path, "Target must be 0 or 1, the same on every row of an image")
            return None
        target = targets.pop()
        label, fine = (PNEUMONIA, "Lung Opacity") if target == "1" else (UNKNOWN, "No Lung Opacity")
        if classes is not None:
            found = classes.get(patient, set())
            if len(found) != 1 or not found <= set(CLASSES):
                skips.add(path, "detailed class info gives no single known class")
                return None
            label, fine = CLASSES[found.pop()]
            if (label == PNEUMONIA) != (target == "1"):
                skips.add(path, "Target contradicts the detailed class info")
                return None
        if not path.is_file():
            skips.add(path, "listed in the train labels but DICOM absent")
            return None
        header = _dicom_header(path)
        if header is None:
            skips.add(path, "unreadable DICOM header")
            return None
        row = new_row(path, label, self.patient(patient), self.name, fine_label=fine,
                      view=normalize_view(header.get("ViewPosition")), age_group=age_group(header.get("PatientAge")))
        boxes = _boxes(records)
        if boxes is None:
            skips.add(path, "box with non-numeric coordinates")
            return None
        if boxes:
            row.update(boxes=encode_boxes(boxes), box_frame_width=int(header.get("Columns") or CHALLENGE_FRAME),
                       box_frame_height=int(header.get("Rows") or CHALLENGE_FRAME))
        return row


def _boxes(records: list[dict]) -> list[tuple] | None:
    """Target-1 boxes as (x0, y0, x1, y1, label); None when a box has non-numeric coordinates."""
    boxes = []
    for record in records:
        if str(record["Target"]).strip() != "1":
            continue
        try:
            x, y, width, height = (float(record[c]) for c in ("x", "y", "width", "height"))
        except ValueError:
            return None
        boxes.append((x, y, x + width, y + height, BOX_LABEL))
    return boxes


def _dicom_header(path: Path) -> dict | None:
    """The few header fields the manifest needs, read without the pixel data; None if unreadable."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError):
        return None
    return {tag: dataset.get(tag) for tag in _HEADER_TAGS}
