"""Your own images: a hand-written CSV checked row by row, then made a manifest the way ``data build`` makes one.

A hospital's images follow no public layout, so no adapter reads them; a CSV names them instead, one row per
image (paths relative to the CSV's own folder, or absolute)::

    image_path,label,patient_id,source,split
    images/0001.png,normal,P0001,stmarys,train
    images/0002.dcm,COVID-19,P0002,stmarys,test

``label`` is a canonical label (normal, bacterial, viral, fungal, pneumonia, COVID-19, other, unknown);
``split`` is train, val or test for every row, or empty for every row (the split is then made as ``data
build`` makes it: whole patients and near-duplicates, stratified by source and label, by seed). Any other
manifest column (view, modality, fine_label, mask_path, mask_convention) may be given too.

:func:`import_csv` reports every problem it finds with its line and column (the first few, and how many),
decodes every image once (size and near-duplicate fingerprint, as a build does), groups near-duplicates,
and refuses a patient or a near-duplicate in two splits.

Example:
    >>> result = import_csv("my_hospital.csv")                              # doctest: +SKIP
    >>> save_manifest(result.manifest, "my_hospital")                       # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lungscreen.data.build import inspect_images, mark_duplicates
from lungscreen.data.dedup import DuplicatePair
from lungscreen.data.labels import CANONICAL_LABELS
from lungscreen.data.manifest import MODALITIES, REQUIRED, SPLITS, VIEWS, validate
from lungscreen.data.sources import Skips
from lungscreen.data.splits import assign_splits, check_leakage
from lungscreen.errors import ManifestError

#: Problems listed in the one-line error before "and N more".
SHOWN = 5
#: The values a column may hold, where it is closed.
ALLOWED = {"label": CANONICAL_LABELS, "split": SPLITS, "view": VIEWS, "modality": MODALITIES}


@dataclass
class Imported:
    """A manifest made from a CSV, and what was found on the way."""

    manifest: pd.DataFrame
    duplicates: list[DuplicatePair]
    split_made: bool  # True when the CSV had no split and one was made


def import_csv(path: str | Path, *, ratios: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0, workers: int = 2,
               show_progress: bool = True) -> Imported:
    """Check ``path`` row by row, decode its images, group near-duplicates and split (or check its split).

    Raises:
        ManifestError: the CSV cannot be read, lacks a column, or has rows that are wrong (each named by
            line and column) or images that do not decode; LeakageError: a patient or a near-duplicate group
            in two splits.
    """
    path = Path(path)
    frame = read_csv(path)
    problems = row_problems(frame, path.parent)
    if problems:
        raise ManifestError(summary(path, problems))
    frame = validate(frame, base=path.parent)
    lines = dict(zip(frame["image_path"], range(2, len(frame) + 2)))
    skips = Skips()
    frame, hashes, thumbnails = inspect_images(frame, skips, workers=workers, show_progress=show_progress)
    if skips.items:
        raise ManifestError(summary(path, sorted((lines[image], "image_path", reason) for image, reason in skips.items)))
    frame, pairs = mark_duplicates(frame, hashes, thumbnails)
    split_made = (frame["split"] == "").all()
    if split_made:
        frame["split"] = assign_splits(frame, ratios=ratios, seed=seed)
    check_leakage(frame)
    return Imported(validate(frame), pairs, bool(split_made))


def read_csv(path: Path) -> pd.DataFrame:
    """The CSV as text cells, its required columns present (named in the error when not)."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except UnicodeDecodeError as error:
        raise ManifestError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ManifestError(f"{path}: not a readable CSV ({str(error).splitlines()[0]})") from None
    frame.columns = [str(column).strip() for column in frame.columns]
    missing = [name for name in REQUIRED if name not in frame.columns]
    if missing:
        raise ManifestError(f"{path}: no column {', '.join(repr(m) for m in missing)} in the header (found: "
                            f"{', '.join(frame.columns) or 'nothing'}); the header must name image_path, label, "
                            "patient_id, source and, optionally, split")
    if frame.empty:
        raise ManifestError(f"{path}: a header and no row")
    return frame.apply(lambda column: column.str.strip())


def row_problems(frame: pd.DataFrame, folder: Path) -> list[tuple[int, str, str]]:
    """(line, column, what is wrong) of every bad cell: empty required cells, unknown values, missing files,
    an image listed twice, a split given for some rows only."""
    problems = []
    for index, row in enumerate(frame.to_dict("records")):
        line = index + 2  # the header is line 1
        for column in REQUIRED:
            if not row[column]:
                problems.append((line, column, "empty"))
        for column, allowed in ALLOWED.items():
            value = row.get(column, "")
            if value and value not in allowed:
                problems.append((line, column, _not_allowed(value, allowed)))
        image = row["image_path"]
        if image and not os.path.isfile(folder / image):
            problems.append((line, "image_path", f"no file {folder / image}"))
        mask = row.get("mask_path", "")
        if mask and not os.path.isfile(folder / mask):
            problems.append((line, "mask_path", f"no file {folder / mask}"))
    seen: dict[str, int] = {}
    for index, image in enumerate(frame["image_path"]):
        if image and image in seen:
            problems.append((index + 2, "image_path", f"the same image as line {seen[image]}"))
        seen.setdefault(image, index + 2)
    if "split" in frame.columns and (frame["split"] == "").any() and (frame["split"] != "").any():
        first = int((frame["split"] == "").to_numpy().nonzero()[0][0])
        problems.append((first + 2, "split", "empty while other rows have one (give every row a split, or none)"))
    return sorted(problems)


def _not_allowed(value: str, allowed: tuple[str, ...]) -> str:
    spelled = {name.lower(): name for name in allowed if name}
    close = difflib.get_close_matches(value.lower(), list(spelled), n=1, cutoff=0.5)
    hint = f"; did you mean {spelled[close[0]]!r}?" if close else ""
    return f"{value!r} is not one of {', '.join(repr(a) for a in allowed if a)}{hint}"


def summary(path: Path, problems: list[tuple[int, str, str]]) -> str:
    """One line: the first problems with their line and column, and how many there are."""
    shown = "; ".join(f"line {line}, column {column}: {what}" for line, column, what in problems[:SHOWN])
    more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
    return f"{path}: {len(problems)} problem(s): {shown}{more}"
