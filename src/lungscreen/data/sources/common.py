"""Small helpers the source adapters share: image listings, CSV headers, ages and lung-mask conventions.

Two extra manifest columns are filled here, beside the schema's own:

* ``mask_convention`` - which lungs a mask set draws. Public sets disagree: most trace the visible lung
  fields and leave the heart out (:data:`HEART_EXCLUDED`), while v7labs draws the whole lung including the
  part hidden behind the heart (:data:`BEHIND_HEART`). A segmentation model trained on a mix must handle
  the difference on purpose, so every row with a mask says which one it follows.
* ``age_group`` - ``pediatric``, ``adult`` or empty when unknown. Pediatric images sit only among the
  negatives of several public COVID sets (Kermany's children), a known shortcut the bias audit looks for.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lungscreen.data.labels import BEHIND_HEART, HEART_EXCLUDED, MASK_CONVENTIONS  # noqa: F401  (the adapters' vocabulary)
from lungscreen.io.images import IMAGE_SUFFIXES

PEDIATRIC = "pediatric"
ADULT = "adult"
#: Age (years) from which a patient counts as an adult.
ADULT_AGE = 18.0

# A number, then a unit: spelt out after optional spaces ("18 months"), or one letter right after it ("036Y").
_AGE = re.compile(r"(\d+(?:\.\d+)?)\+?(?:\s*(years?|yrs?|months?|mos?|weeks?|wks?|days?)\b|([ymwd])\b)?", re.IGNORECASE)
_UNIT_YEARS = {"m": 1 / 12, "w": 1 / 52, "d": 1 / 365}


def parse_age(text: object) -> float | None:
    """Age in years from the spellings public metadata use, or None.

    Examples:
        >>> parse_age("036Y"), parse_age("male 35yrs"), parse_age("50+"), parse_age("18 months")
        (36.0, 35.0, 50.0, 1.5)
    """
    if text is None or (isinstance(text, float) and text != text):
        return None
    match = _AGE.search(str(text))
    if not match:
        return None
    unit = (match.group(2) or match.group(3) or "y").lower()
    return float(match.group(1)) * _UNIT_YEARS.get(unit[0], 1.0)


def age_group(age: object) -> str:
    """``pediatric`` below :data:`ADULT_AGE`, ``adult`` from it, empty when the age is unknown."""
    years = age if isinstance(age, (int, float)) and age == age else parse_age(age)
    if years is None:
        return ""
    return PEDIATRIC if years < ADULT_AGE else ADULT


def is_image_file(path: Path | os.DirEntry) -> bool:
    """An image by suffix, skipping hidden files and macOS ``._`` resource forks that ride along in zips."""
    name = path.name
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and path.is_file()


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (empty if the folder does not exist)."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        return sorted((Path(entry.path) for entry in entries if is_image_file(entry)), key=lambda p: p.name)


def has_images(folder: Path) -> bool:
    """True when ``folder`` directly holds at least one image file (stops at the first)."""
    if not folder.is_dir():
        return False
    with os.scandir(folder) as entries:
        return any(is_image_file(entry) for entry in entries)


def csv_header(path: Path) -> set[str]:
    """Column names of a CSV file's first line (any encoding), or an empty set if it cannot be read."""
    try:
        with path.open("rb") as handle:
            line = handle.readline().decode("latin-1").lstrip("\ufeff\xef\xbb\xbf").strip()
    except OSError:
        return set()
    return {column.strip().strip('"') for column in line.split(",")}


def blank(value: object) -> bool:
    """True for None, NaN and whitespace-only text: a missing value in a metadata table."""
    return value is None or (isinstance(value, float) and value != value) or not str(value).strip()
