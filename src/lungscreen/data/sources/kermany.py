"""Kermany et al.'s pediatric chest X-rays (Mendeley "ZhangLabData"; Kaggle ``chest-xray-pneumonia``).

Layout::

    chest_xray/{train,test,val}/NORMAL/IM-0115-0001.jpeg, NORMAL2-IM-1427-0001.jpeg
    chest_xray/{train,test,val}/PNEUMONIA/person1_bacteria_1.jpeg, person1_virus_6.jpeg

The folder gives normal/pneumonia; the file name gives the patient and the cause: ``person1_bacteria_1`` is
patient ``person1`` with bacterial pneumonia, ``NORMAL2-IM-1427-0001`` is patient ``NORMAL2-IM-1427``. A
pneumonia file whose name states no cause keeps the label ``pneumonia`` and its own stem as patient.

Patient ids are *not* prefixed with the published split: if the numbering were per split, merging two
children costs nothing, while splitting one child across our train and test would leak. All images are
anterior-posterior films of children aged one to five (``view`` AP, ``age_group`` pediatric). The Kaggle
archive nests a second copy (``chest_xray/chest_xray``) and ``__MACOSX`` debris: only the outermost
``{train,test,val}`` folders are read.
"""

from __future__ import annotations

import re
from pathlib import Path

from lungscreen.data.labels import BACTERIAL, NORMAL, PNEUMONIA, VIRAL
from lungscreen.data.manifest import new_row
from lungscreen.data.sources.base import Skips, SourceAdapter, register_source
from lungscreen.data.sources.common import PEDIATRIC, has_images, image_files

SPLITS = ("train", "val", "test")
CLASSES = ("NORMAL", "PNEUMONIA")
_PNEUMONIA_NAME = re.compile(r"(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_NORMAL_NAME = re.compile(r"((?:NORMAL\d*-)?IM-\d+)-\d+", re.IGNORECASE)
_CAUSES = {"bacteria": BACTERIAL, "virus": VIRAL}


@register_source
class Kermany(SourceAdapter):
    name = "kermany"
    description = "Kermany pediatric CXR: chest_xray/{train,test,val}/{NORMAL,PNEUMONIA} (cause from file name)"

    @classmethod
    def matches(cls, folder: Path) -> bool:
        return any(has_images(folder / split / name) for split in SPLITS for name in CLASSES)

    def read(self, folder: Path, skips: Skips) -> list[dict]:
        rows = []
        for split in SPLITS:
            if not (folder / split).is_dir():
                continue
            class_folders = (p for p in (folder / split).iterdir() if p.is_dir() and not p.name.startswith("."))
            for class_folder in sorted(class_folders):
                images = image_files(class_folder)
                if class_folder.name not in CLASSES:
                    for path in images:
                        skips.add(path, "class folder not known to kermany (expected NORMAL or PNEUMONIA)")
                    continue
                for path in images:
                    row = self._row(path, class_folder.name, skips)
                    if row is not None:
                        rows.append(row)
        return rows

    def _row(self, path: Path, folder_class: str, skips: Skips) -> dict | None:
        pneumonia = _PNEUMONIA_NAME.fullmatch(path.stem)
        if folder_class == "NORMAL":
            if pneumonia:
                skips.add(path, "file name states a pneumonia but the file sits in NORMAL")
                return None
            normal = _NORMAL_NAME.fullmatch(path.stem)
            label, fine, patient = NORMAL, "normal", normal.group(1) if normal else path.stem
        elif pneumonia:
            cause = pneumonia.group(2).lower()
            label, fine, patient = _CAUSES[cause], cause, pneumonia.group(1).lower()
        else:
            label, fine, patient = PNEUMONIA, "pneumonia", path.stem
        return new_row(path, label, self.patient(patient), self.name, fine_label=fine, view="AP", age_group=PEDIATRIC)
