"""The two COVID-Net contribution repositories of github.com/agchung: Figure1 and Actualmed.

Both follow one layout - ``metadata.csv`` (``patientid``, ``finding``, ``view``, ``age``, ...) beside
``images/`` - and differ only in how a row names its file:

* Figure1 (``Figure1-COVID-chestxray-dataset``): no file column; the file is ``images/<patientid>.<ext>``.
  ``patientid`` is really an image id: ``COVID-00003a`` and ``COVID-00003b`` are two images of one patient
  (same age, sex and notes), so the trailing letter is dropped for the patient id. The file is Latin-1.
* Actualmed (``Actualmed-COVID-chestxray-dataset``): ``imagename`` names the file; ``patientid`` (``ANON12``)
  is the patient.

``finding`` is "COVID-19", "No finding", "Pneumonia" or blank. Blank means pending or inconclusive, never
normal: such rows are kept as ``unknown``. A finding our label map would only call ``other`` is not one
these repositories publish, so it is reported instead of guessed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

from lungscreen.data.labels import OTHER, canonical_from_finding
from lungscreen.data.manifest import new_row, normalize_view
from lungscreen.data.sources.base import Skips, SourceAdapter, read_table, register_source
from lungscreen.data.sources.common import age_group, blank, csv_header, image_files

METADATA = "metadata.csv"
#: Columns that mark Cohen's metadata.csv, which shares this file name.
COHEN_COLUMNS = {"filename", "folder"}


class AgchungRepository(SourceAdapter):
    """``metadata.csv`` + ``images/``; subclasses say which column (if any) names the image file."""

    file_column: ClassVar[str | None] = None

    @classmethod
    def matches(cls, folder: Path) -> bool:
        header = csv_header(folder / METADATA)
        if not {"patientid", "finding"} <= header or header & COHEN_COLUMNS or not (folder / "images").is_dir():
            return False
        return cls.file_column in header if cls.file_column else "imagename" not in header

    def read(self, folder: Path, skips: Skips) -> list[dict]:
        required = ("patientid", "finding", "view") + ((self.file_column,) if self.file_column else ())
        table = read_table(folder / METADATA, required)
        by_stem = {path.stem: path for path in image_files(folder / "images")}
        rows, seen = [], set()
        for number, record in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
            where = f"{folder / METADATA}:{number}"
            if blank(record["patientid"]):
                skips.add(where, "blank patientid")
                continue
            path = self._image_path(folder, record, by_stem)
            if path is None or not path.is_file():
                skips.add(path or where, f"listed in {METADATA} but file absent")
                continue
            if path in seen:
                skips.add(path, f"listed twice in {METADATA}; first kept")
                continue
            seen.add(path)
            label, fine = canonical_from_finding(record["finding"])
            if label == OTHER:
                skips.add(path, f"finding not recognised by {self.name}")
                continue
            rows.append(new_row(path, label, self.patient(self.patient_of(record["patientid"].strip())), self.name,
                                fine_label=fine, view=normalize_view(record["view"]),
                                age_group=age_group(record.get("age"))))
        return rows

    def _image_path(self, folder: Path, record: dict, by_stem: dict[str, Path]) -> Path | None:
        if self.file_column:
            name = str(record[self.file_column]).strip()
            return folder / "images" / name if name else None
        identifier = record["patientid"].strip()
        return by_stem.get(identifier, folder / "images" / f"{identifier}.*")

    @staticmethod
    def patient_of(identifier: str) -> str:
        """The patient behind a row's ``patientid`` (the identity here; Figure1 overrides)."""
        return identifier


@register_source
class Figure1(AgchungRepository):
    name = "figure1"
    description = "Figure 1 COVID-19 chest X-ray initiative (metadata.csv, file = patientid + extension)"

    @staticmethod
    def patient_of(identifier: str) -> str:
        """``COVID-00003a`` -> ``COVID-00003``: lettered ids are several images of one patient."""
        return re.sub(r"(?<=\d)[a-z]$", "", identifier)


@register_source
class Actualmed(AgchungRepository):
    name = "actualmed"
    description = "Actualmed COVID-19 chest X-ray initiative (metadata.csv with imagename + images/)"
    file_column = "imagename"
