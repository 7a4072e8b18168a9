"""COVID-CT (Zhao et al., github.com/UCSD-AI4H/COVID-CT): CT slices cropped from papers and web pages.

Layout::

    CT_COVID/*.png                  COVID-19 slices (349 in v1)
    CT_NonCOVID/*.{png,jpg}         slices without COVID-19 (397 in v1): normal lungs *and* other diseases
    COVID-CT-MetaInfo.xlsx          File name -> Patient ID ("Patient 12"), age, gender, source paper
    NonCOVID-CT-MetaInfo.csv        image name -> patient id ("crawled_patient_12")

(the meta files may also sit one folder up, in the repository root, with the images under
``Images-processed/``). ``CT_NonCOVID`` is not "normal": it is labelled ``other`` (fine label NonCOVID).

Some meta file names differ from the files on disk (no extension, other case, ``%`` escapes). A file is
matched to its meta row by ever looser spellings - as written; URL-decoded and case-folded; then also
without the extension - taking a looser spelling only where it names one meta row alone. An image still
without a meta row (or whose row leaves the patient blank) gets its patient from a documented rule: the
source prefix of its name. For COVID slices that is the paper (``2020.03.22.20040782-p24-1533-4`` ->
``paper 2020.03.22.20040782``), so every slice of one paper is one patient - the rule can merge patients,
never split one. NonCOVID names are bare numbers (``12%3.jpg``, ``14.png``): there the rule groups the
slices of one crawled case but would split a MedPix patient whose slices got separate numbers, which is why
the meta file matters. How many images needed the rule is logged and kept in :attr:`CovidCT.fallbacks`
(none in the v1 release: every file matches its meta row).
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from pathlib import Path

import pandas as pd

from lungscreen.data.labels import COVID, OTHER
from lungscreen.data.manifest import new_row
from lungscreen.data.sources.base import Skips, SourceAdapter, read_table, register_source, require_columns
from lungscreen.data.sources.common import blank, image_files
from lungscreen.errors import SourceError

log = logging.getLogger(__name__)

COVID_META = "COVID-CT-MetaInfo.xlsx"
NONCOVID_META = "NonCOVID-CT-MetaInfo.csv"
#: class folder -> (canonical label, fine label, meta file, its file-name column, its patient column)
CLASSES = {
    "CT_COVID": (COVID, "COVID-19", COVID_META, "File name", "Patient ID"),
    "CT_NonCOVID": (OTHER, "NonCOVID", NONCOVID_META, "image name", "patient id"),
}
_EXTENSION = re.compile(r"\.(png|jpe?g|bmp|tiff?)$", re.IGNORECASE)
_SOURCE_PREFIX = re.compile(r"-p\d+-|%")


def spellings(name: str) -> tuple[str, str, str]:
    """Ever looser spellings of a file name: as written; URL-decoded and case-folded; and without extension."""
    exact = str(name).strip()
    loose = urllib.parse.unquote(exact).casefold()
    return exact, loose, _EXTENSION.sub("", loose)


class MetaIndex:
    """Finds a file's meta row by the strictest spelling that names exactly one row."""

    def __init__(self, names: list[str]) -> None:
        self.tiers: list[dict[str, int | None]] = [{}, {}, {}]
        for row, name in enumerate(names):
            for tier, key in zip(self.tiers, spellings(name)):
                tier[key] = None if key in tier else row  # None marks an ambiguous spelling

    def find(self, name: str) -> int | None:
        """The meta row of file ``name``, or None when no spelling names exactly one row."""
        for tier, key in zip(self.tiers, spellings(name)):
            if key in tier:
                return tier[key]
        return None


def source_prefix(stem: str) -> str:
    """The fallback patient rule: the paper (or crawled case) a slice was cut from."""
    return _SOURCE_PREFIX.split(stem, maxsplit=1)[0]


@register_source
class CovidCT(SourceAdapter):
    name = "covid-ct"
    description = "UCSD-AI4H COVID-CT: CT_COVID / CT_NonCOVID slices, patient ids from the meta files"
    modality = "CT"

    def __init__(self) -> None:
        self.fallbacks: list[Path] = []

    @classmethod
    def matches(cls, folder: Path) -> bool:
        return all((folder / name).is_dir() for name in CLASSES)

    def read(self, folder: Path, skips: Skips) -> list[dict]:
        self.fallbacks = []
        rows = []
        for class_name, (label, fine, meta_name, file_column, patient_column) in CLASSES.items():
            meta = _find(folder, meta_name)
            listed = _listed(meta, file_column, patient_column) if meta else []
            index, used = MetaIndex([name for name, _ in listed]), set()
            for path in image_files(folder / class_name):
                row = index.find(path.name)
                patient = None if row is None else listed[row][1]
                used.add(row)
                if patient is None:
                    patient = f"paper {source_prefix(path.stem)}"
                    self.fallbacks.append(path)
                rows.append(new_row(path, label, self.patient(patient), self.name, fine_label=fine, modality="CT"))
            for row, (name, _) in enumerate(listed):
                if row not in used:
                    skips.add(folder / class_name / name, f"listed in {meta_name} but file absent")
        if self.fallbacks:
            log.warning("covid-ct: %d image(s) without a patient in the meta files; patient id from the source "
                        "prefix of the file name (e.g. %s)", len(self.fallbacks), self.fallbacks[0].name)
        return rows


def _listed(meta: Path, file_column: str, patient_column: str) -> list[tuple[str, str | None]]:
    """(file name as listed, patient id or None when blank) for every file row of a meta table."""
    listed = []
    for record in _read_meta(meta, (file_column, patient_column)).to_dict("records"):
        if blank(record[file_column]):
            continue  # the xlsx ends with a caption line and no file name
        patient = record[patient_column]
        listed.append((str(record[file_column]).strip(), None if blank(patient) else str(patient).strip()))
    return listed


def _find(folder: Path, name: str) -> Path | None:
    """A meta file beside the class folders or one level up (the repository root)."""
    return next((p for p in (folder / name, folder.parent / name) if p.is_file()), None)


def _read_meta(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if path.suffix.lower() != ".xlsx":
        return read_table(path, required)
    try:
        table = pd.read_excel(path, dtype=str)
    except (ValueError, OSError, KeyError) as error:  # openpyxl raises these for non-xlsx content
        raise SourceError(f"{path}: not a readable .xlsx workbook ({error})") from None
    return require_columns(table, required, path)
