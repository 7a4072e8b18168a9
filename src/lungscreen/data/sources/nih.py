"""NIH ChestX-ray14, in NIH's own layout and in the DarkCovidNet folder layout.

NIH's layout (nihcc.app.box.com, Kaggle ``nih-chest-xrays/data``)::

    Data_Entry_2017.csv        Image Index, Finding Labels ("Effusion|Pneumonia"), Patient ID, View Position, ...
    BBox_List_2017.csv         Image Index, Finding Label, Bbox [x,y,w,h]   (984 boxes on 880 images)
    images/*.png  or  images_001/images/*.png ... images_012/images/*.png

DarkCovidNet's layout (Ozturk et al., github.com/muhammedtalo/COVID-19)::

    X-Ray Image DataSet/{No_findings,Pneumonia}/00001234_000.png   (+ Covid-19/ with Cohen's images)
    BBox_List_2017.csv                                             (optional, beside the folder)

Labels: "No Finding" -> normal; any finding list containing "Pneumonia" -> pneumonia; others -> other. In the
DarkCovidNet layout the folder says it (``No_findings``, ``Pneumonia``, ``Covid-19``).

Patient ids come from ``Patient ID`` or, equally, from the file name ``PPPPPPPP_FFF.png`` (patient,
follow-up). Both layouts write them as ``nih:PPPPPPPP`` so the same patient read through either layout is
one patient. Boxes are in the 1024 x 1024 frame of the released PNGs (NIH resized every image to 1024 px;
``OriginalImage[Width,Height]`` in Data_Entry is the detector size *before* that, not the box frame).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from lungscreen.data.labels import COVID, NORMAL, OTHER, PNEUMONIA
from lungscreen.data.manifest import encode_boxes, new_row, normalize_view
from lungscreen.data.sources.base import Skips, SourceAdapter, read_table, register_source
from lungscreen.data.sources.common import age_group, blank, image_files
from lungscreen.errors import ManifestError

#: Pixel frame of BBox_List_2017.csv: the released PNGs are 1024 x 1024.
BOX_FRAME = 1024
BBOX_LIST = "BBox_List_2017.csv"
DATA_ENTRIES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
#: The fourteen ChestX-ray14 findings and "No Finding".
FINDINGS = frozenset({
    "No Finding", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
    "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
})
_FILE_NAME = re.compile(r"(\d{8})_(\d{3})")
NIH_NAMESPACE = "nih"


def nih_patient(identifier: object) -> str | None:
    """``nih:PPPPPPPP`` from a Patient ID (``1``, ``"00000001"``) or a file name (``00000001_000.png``)."""
    text = "" if blank(identifier) else str(identifier).strip()
    match = _FILE_NAME.match(text)
    if match:
        return f"{NIH_NAMESPACE}:{match.group(1)}"
    try:
        number = float(text)
    except ValueError:
        return None
    if not math.isfinite(number) or number != int(number) or number < 0:
        return None
    return f"{NIH_NAMESPACE}:{int(number):08d}"


def label_from_findings(text: str) -> tuple[str, str] | None:
    """(canonical label, fine label) from "Finding Labels", or None when a finding is not ChestX-ray14's."""
    findings = [part.strip() for part in str(text).split("|") if part.strip()]
    if not findings or any(finding not in FINDINGS for finding in findings):
        return None
    if findings == ["No Finding"]:
        return NORMAL, "No Finding"
    if "No Finding" in findings:
        return None  # "No Finding" beside a finding contradicts itself
    return (PNEUMONIA if "Pneumonia" in findings else OTHER), "|".join(findings)


def read_boxes(path: Path, skips: Skips) -> dict[str, dict]:
    """Image name -> box columns from BBox_List_2017.csv (empty when the file is absent)."""
    if not path.is_file():
        return {}
    table = read_table(path, ("Image Index", "Finding Label"))
    if len(table.columns) < 6:
        raise ManifestError(f"{path}: missing box columns x, y, w, h after 'Finding Label' "
                            f"(has: {', '.join(table.columns)})")
    x_col, y_col, w_col, h_col = table.columns[2:6]
    per_image: dict[str, list] = {}
    for number, record in enumerate(table.to_dict("records"), start=2):
        try:
            x, y, w, h = (float(record[c]) for c in (x_col, y_col, w_col, h_col))
        except ValueError:
            skips.add(f"{path}:{number}", "box with non-numeric coordinates")
            continue
        box = (x, y, x + w, y + h, record["Finding Label"].strip())
        per_image.setdefault(record["Image Index"].strip(), []).append(box)
    return {name: {"boxes": encode_boxes(boxes), "box_frame_width": BOX_FRAME, "box_frame_height": BOX_FRAME}
            for name, boxes in per_image.items()}


@register_source
class NIHChestXray14(SourceAdapter):
    name = "nih"
    description = "NIH ChestX-ray14: Data_Entry_2017.csv + images/ or images_*/images/, BBox_List_2017.csv boxes"

    @classmethod
    def matches(cls, folder: Path) -> bool:
        return any((folder / name).is_file() for name in DATA_ENTRIES)

    def read(self, folder: Path, skips: Skips) -> list[dict]:
        entry = next(folder / name for name in DATA_ENTRIES if (folder / name).is_file())
        table = read_table(entry, ("Image Index", "Finding Labels", "Patient ID", "View Position"))
        has_age = "Patient Age" in table.columns
        files = _image_index(folder)
        boxes = read_boxes(folder / BBOX_LIST, skips)
        rows, seen = [], set()
        for record in table.to_dict("records"):
            name = record["Image Index"].strip()
            path = files.get(name)
            if path is None:
                skips.add(folder / "images" / name, f"listed in {entry.name} but file absent")
                continue
            if name in seen:
                skips.add(path, f"listed twice in {entry.name}; first kept")
                continue
            seen.add(name)
            labels = label_from_findings(record["Finding Labels"])
            if labels is None:
                skips.add(path, f"unknown finding label {record['Finding Labels']!r}")
                continue
            patient = nih_patient(record["Patient ID"]) or nih_patient(name)
            if patient is None:
                skips.add(path, "no patient id (blank Patient ID and no PPPPPPPP_FFF file name)")
                continue
            row = new_row(path, labels[0], patient, self.name, fine_label=labels[1],
                          view=normalize_view(record["View Position"]),
                          age_group=age_group(record["Patient Age"]) if has_age else "")
            row.update(boxes.get(name, {}))
            rows.append(row)
        return rows


def _image_index(folder: Path) -> dict[str, Path]:
    """File name -> path over ``images/`` and every ``images_NNN/images/`` (or ``images_NNN/``)."""
    folders = [folder / "images"]
    for part in sorted(p for p in folder.glob("images_*") if p.is_dir()):
        folders.append(part / "images" if (part / "images").is_dir() else part)
    index: dict[str, Path] = {}
    for directory in folders:
        for path in image_files(directory):
            index.setdefault(path.name, path)
    return index


#: DarkCovidNet class folder -> (canonical label, fine label).
DARKCOVIDNET_CLASSES = {
    "No_findings": (NORMAL, "No Finding"),
    "Pneumonia": (PNEUMONIA, "Pneumonia"),
    "Covid-19": (COVID, "COVID-19"),
}
DARKCOVIDNET_DATASET = "X-Ray Image DataSet"


@register_source
class DarkCovidNetNIH(SourceAdapter):
    name = "nih-darkcovidnet"
    description = "NIH ChestX-ray14 images in DarkCovidNet's 'X-Ray Image DataSet/{No_findings,Pneumonia}' folders"

    @classmethod
    def matches(cls, folder: Path) -> bool:
        dataset = folder / DARKCOVIDNET_DATASET
        return dataset.is_dir() and any((dataset / name).is_dir() for name in DARKCOVIDNET_CLASSES)

    def read(self, folder: Path, skips: Skips) -> list[dict]:
        dataset = folder / DARKCOVIDNET_DATASET
        boxes = {}
        for candidate in (folder / BBOX_LIST, dataset / BBOX_LIST):
            boxes.update(read_boxes(candidate, skips))
        rows = []
        for class_folder in sorted(p for p in dataset.iterdir() if p.is_dir() and not p.name.startswith(".")):
            images = image_files(class_folder)
            if class_folder.name not in DARKCOVIDNET_CLASSES:
                for path in images:
                    skips.add(path, "class folder not known to nih-darkcovidnet")
                continue
            label, fine = DARKCOVIDNET_CLASSES[class_folder.name]
            for path in images:
                # NIH images carry their patient in the name; the Covid-19 folder holds Cohen's files.
                patient = nih_patient(path.name) or self.patient(path.stem)
                row = new_row(path, label, patient, self.name, fine_label=fine)
                row.update(boxes.get(path.name, {}))
                rows.append(row)
        return rows
