"""Cohen et al.'s COVID-19 image data collection (github.com/ieee8023/covid-chestxray-dataset).

Layout: ``metadata.csv`` (one row per image: ``patientid``, ``finding``, ``view``, ``modality``,
``folder``, ``filename``) beside ``images/`` (and ``volumes/`` for CT volumes, which are not read), with
optional ``annotations/imageannotation_ai_lung_bounding_boxes.json`` (COCO: left/right lung boxes in each
original image's pixel frame).

``finding`` is "COVID-19", "COVID-19, ARDS", "Streptococcus", ... in the June-2020 state and
"Pneumonia/Viral/COVID-19", "Pneumonia/Bacterial/Streptococcus", ... in later versions; both map through
:func:`lungscreen.data.labels.canonical_from_finding`. CT and lateral rows are kept (modality and view
columns say what they are) and filtered later by the task.
"""

from __future__ import annotations

import json
from pathlib import Path

from lungscreen.data.labels import canonical_from_finding
from lungscreen.data.manifest import encode_boxes, new_row, normalize_view
from lungscreen.data.sources.base import Skips, SourceAdapter, read_table, register_source

LUNG_BOXES = Path("annotations") / "imageannotation_ai_lung_bounding_boxes.json"


def _header(path: Path) -> set[str]:
    try:
        with path.open("rb") as handle:
            return {c.strip().strip('"') for c in handle.readline().decode("latin-1").strip().split(",")}
    except OSError:
        return set()


@register_source
class CohenCollection(SourceAdapter):
    name = "cohen"
    description = "Cohen et al. COVID-19 image data collection (metadata.csv + images/)"

    @classmethod
    def matches(cls, folder: Path) -> bool:
        return {"patientid", "finding", "filename", "folder"} <= _header(folder / "metadata.csv")

    def read(self, folder: Path, skips: Skips) -> list[dict]:
        table = read_table(folder / "metadata.csv", ("patientid", "finding", "filename", "folder", "modality", "view"))
        boxes = self._lung_boxes(folder / LUNG_BOXES)
        rows, seen = [], set()
        for record in table.to_dict("records"):
            path = folder / record["folder"] / record["filename"]
            if not path.is_file():
                skips.add(path, "listed in metadata.csv but file absent")
                continue
            if path in seen:  # the June-2020 file lists a few images twice, under two patient ids
                skips.add(path, "listed twice in metadata.csv (under two patient ids); first row kept")
                continue
            seen.add(path)
            label, fine = canonical_from_finding(record["finding"])
            modality = "CT" if record["modality"].strip().upper() == "CT" else "CXR"
            row = new_row(path, label, self.patient(record["patientid"]), self.name, fine_label=fine,
                          view=normalize_view(record["view"]), modality=modality)
            if record["filename"] in boxes:
                row.update(boxes[record["filename"]])
            rows.append(row)
        return rows

    @staticmethod
    def _lung_boxes(path: Path) -> dict[str, dict]:
        """File name -> box columns from the COCO lung-box file (boxes in the original image frame)."""
        if not path.is_file():
            return {}
        coco = json.loads(path.read_text(encoding="utf-8"))
        names = {c["id"]: c["name"] for c in coco.get("categories", [])}
        per_image: dict[int, list] = {}
        for item in coco.get("annotations", []):
            if len(item.get("bbox") or []) != 4 or any(v is None for v in item["bbox"]):
                continue  # the published file has a few empty boxes
            x, y, w, h = item["bbox"]
            per_image.setdefault(item["image_id"], []).append((x, y, x + w, y + h, names.get(item["category_id"], "lung")))
        return {
            image["file_name"]: {"boxes": encode_boxes(per_image[image["id"]]),
                                 "box_frame_width": int(image["width"]), "box_frame_height": int(image["height"])}
            for image in coco.get("images", []) if image["id"] in per_image
        }
