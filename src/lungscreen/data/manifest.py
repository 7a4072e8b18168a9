"""The manifest: one table of every image, its labels, patient, source and split.

A manifest is a pandas DataFrame with the columns in :data:`COLUMNS` (more columns are allowed and kept),
saved side by side as Parquet (fast, typed) and CSV (readable, diffable). :func:`validate` is the one
gate every manifest passes through when it is built, loaded or saved.

Boxes are stored as JSON text ``[[x0, y0, x1, y1, "label"], ...]`` in the pixel frame named by
``box_frame_width`` x ``box_frame_height`` (for NIH that is 1024 x 1024 even when the file on disk was
downscaled); :func:`boxes_for_size` scales them to the size of the image actually read.

Paths (``image_path``, ``mask_path`` and any other column named ``*_path``) follow one rule, written and
read the same way:

* **On disk** a path is stored *relative to the manifest file's folder* when the file lies under that
  folder, and absolute otherwise. A data folder moved or copied together with its manifest keeps working,
  and a manifest beside data it does not contain still names that data unambiguously (a ``../`` path
  would break as soon as the manifest alone moved). :func:`save_manifest` converts whatever it is given:
  absolute paths, or relative ones, which are the caller's and so relative to the current working folder.
* **In memory** paths are absolute: :func:`load_manifest` joins stored relative paths to the manifest's
  folder, and ``data build`` makes its adapters' paths absolute at once, so nothing downstream depends
  on the working folder. Paths are made absolute lexically (``..`` collapsed, symlinks kept), so a path
  reached through a symlinked folder inside the manifest's folder stays relative to it.

:func:`missing_files` and :func:`check_files` say which listed files do not exist (a manifest whose data
moved); :func:`relocate_manifest` rewrites the prefix of its paths after such a move.

Example:
    >>> frame = validate(pd.DataFrame([new_row("a.png", "normal", "p1", "demo")]))
    >>> list(frame.columns[:4])
    ['image_path', 'label', 'fine_label', 'patient_id']
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lungscreen.data.labels import CANONICAL_LABELS, Task, get_task
from lungscreen.errors import ManifestError
from lungscreen.io.files import atomic_path

#: Column -> what it holds. Order is the order written to disk.
COLUMNS: dict[str, str] = {
    "image_path": "path of the image file (absolute, or relative to the manifest's folder)",
    "label": f"canonical label, one of {', '.join(CANONICAL_LABELS)}",
    "fine_label": "the source's own finding text (organism, 'COVID-19, ARDS', ...)",
    "patient_id": "patient identifier, prefixed with the source so sources never collide",
    "source": "which public dataset the image comes from",
    "view": "PA, AP, AP Supine, Lateral, Axial, Coronal or unknown",
    "modality": "CXR or CT",
    "mask_path": "lung mask file, or empty",
    "mask_convention": "heart-excluded or behind-heart-included (how the mask set draws the lungs), or empty",
    "boxes": "JSON list of [x0, y0, x1, y1, label] in the box frame, or empty",
    "box_frame_width": "width of the pixel frame the boxes are in (0 without boxes)",
    "box_frame_height": "height of the pixel frame the boxes are in (0 without boxes)",
    "split": "train, val, test, or empty before splitting",
}
REQUIRED = ("image_path", "label", "patient_id", "source")
#: Columns whose files must exist for a manifest to be usable (empty mask paths excepted).
FILE_COLUMNS = ("image_path", "mask_path")
VIEWS = ("PA", "AP", "AP Supine", "Lateral", "Axial", "Coronal", "unknown")
MODALITIES = ("CXR", "CT")
SPLITS = ("train", "val", "test", "")
FRONTAL_VIEWS = ("PA", "AP", "AP Supine", "unknown")
_DEFAULTS = {"fine_label": "", "view": "unknown", "modality": "CXR", "mask_path": "", "mask_convention": "", "boxes": "",
             "box_frame_width": 0, "box_frame_height": 0, "split": ""}


def new_row(image_path: str | Path, label: str, patient_id: str, source: str, **fields: object) -> dict:
    """One manifest row with defaults for every optional column; adapters build rows with this."""
    row = {"image_path": str(image_path), "label": label, "patient_id": str(patient_id), "source": source}
    row.update({key: value for key, value in _DEFAULTS.items()})
    row.update(fields)
    return row


def normalize_view(text: object) -> str:
    """Map the many spellings of a radiographic view onto :data:`VIEWS`."""
    value = "" if text is None or (isinstance(text, float) and text != text) else str(text).strip().lower()
    if value in ("", "nan", "unknown"):
        return "unknown"
    if "supine" in value:
        return "AP Supine"
    if value in ("l", "ll", "rl", "lat", "lateral") or value.startswith("lateral"):
        return "Lateral"
    if value.startswith("pa"):
        return "PA"
    if value.startswith("ap"):
        return "AP"
    if value.startswith("axial"):
        return "Axial"
    if value.startswith("coronal"):
        return "Coronal"
    return "unknown"


def encode_boxes(boxes: Iterable[tuple[float, float, float, float, str]]) -> str:
    """Boxes as the JSON text stored in the ``boxes`` column (empty string for none)."""
    items = [[round(float(x0), 2), round(float(y0), 2), round(float(x1), 2), round(float(y1), 2), str(name)]
             for x0, y0, x1, y1, name in boxes]
    return json.dumps(items) if items else ""


def decode_boxes(text: str) -> list[tuple[float, float, float, float, str]]:
    """The boxes of a ``boxes`` cell (JSON text; empty for none)."""
    return [(float(x0), float(y0), float(x1), float(y1), str(name)) for x0, y0, x1, y1, name in json.loads(text)] if text else []


#: Box labels of anatomy, not findings (Cohen's lung-box annotations): a findings detector leaves them out.
LUNG_BOX_LABELS = frozenset({"Right Lung", "Left Lung", "lung"})


def finding_boxes(boxes: Iterable[tuple[float, float, float, float, str]]) -> list[tuple[float, float, float, float, str]]:
    """The boxes that mark findings (lung boxes left out)."""
    return [box for box in boxes if box[4] not in LUNG_BOX_LABELS]


def boxes_for_size(row: pd.Series | dict, width: int, height: int) -> list[tuple[float, float, float, float, str]]:
    """The row's boxes scaled from their stored frame to an image of ``width`` x ``height``."""
    text = row.get("boxes", "") or ""
    if not text:
        return []
    frame_w, frame_h = int(row.get("box_frame_width", 0) or 0), int(row.get("box_frame_height", 0) or 0)
    if frame_w <= 0 or frame_h <= 0:
        raise ManifestError(f"{row.get('image_path')}: boxes without a frame size")
    sx, sy = width / frame_w, height / frame_h
    return [(x0 * sx, y0 * sy, x1 * sx, y1 * sy, name) for x0, y0, x1, y1, name in decode_boxes(text)]


def validate(frame: pd.DataFrame, *, base: Path | None = None) -> pd.DataFrame:
    """Check the schema and return the manifest with every column present and typed.

    Args:
        frame: the table to check.
        base: folder that relative paths (every ``*_path`` column) are relative to (the manifest's folder,
            or the working folder for a caller's frame); they come back absolute. None leaves paths as they are.

    Raises:
        ManifestError: missing required columns, empty or NaN required values, unknown labels, views,
            modalities or splits, or the same image listed twice.
    """
    missing = [name for name in REQUIRED if name not in frame.columns]
    if missing:
        raise ManifestError(f"manifest lacks required column(s): {', '.join(missing)}")
    frame = frame.copy()
    for name, default in _DEFAULTS.items():
        if name not in frame.columns:
            frame[name] = default
    for name in REQUIRED:
        blank = frame[name].isna() | (frame[name].astype(str).str.strip() == "")
        if blank.any():
            raise ManifestError(f"column {name!r} is empty in {int(blank.sum())} row(s), first at row {_first(blank)}")
    text_columns = [c for c in COLUMNS if c not in ("box_frame_width", "box_frame_height")]
    frame[text_columns] = frame[text_columns].fillna("").astype(str)
    extra_text = [c for c in frame.columns if c not in COLUMNS and frame[c].dtype == object]
    frame[extra_text] = frame[extra_text].fillna("")  # source-specific columns: blank where a source has none
    for name in ("box_frame_width", "box_frame_height"):
        frame[name] = pd.to_numeric(frame[name], errors="coerce").fillna(0).astype("int64")
    _check_values(frame, "label", CANONICAL_LABELS)
    _check_values(frame, "view", VIEWS)
    _check_values(frame, "modality", MODALITIES)
    _check_values(frame, "split", SPLITS)
    if base is not None:
        frame = absolute_paths(frame, base)
    duplicated = frame["image_path"].duplicated(keep=False)
    if duplicated.any():
        example = frame.loc[duplicated, "image_path"].iloc[0]
        raise ManifestError(f"{int(duplicated.sum())} rows list the same image twice, e.g. {example}")
    ordered = list(COLUMNS) + [c for c in frame.columns if c not in COLUMNS]
    return frame[ordered].reset_index(drop=True)


def _check_values(frame: pd.DataFrame, column: str, allowed: tuple[str, ...]) -> None:
    bad = ~frame[column].isin(allowed)
    if bad.any():
        values = sorted(set(frame.loc[bad, column]))[:5]
        raise ManifestError(
            f"column {column!r} has unknown value(s) {values} in {int(bad.sum())} row(s) "
            f"(first at row {_first(bad)}); allowed: {', '.join(repr(a) for a in allowed)}"
        )


def _first(mask: pd.Series) -> int:
    return int(mask.to_numpy().nonzero()[0][0])


def path_columns(frame: pd.DataFrame) -> list[str]:
    """The columns holding file paths: ``image_path``, ``mask_path`` and every other ``*_path`` column."""
    return [str(c) for c in frame.columns if str(c).endswith("_path")]


def absolute_paths(frame: pd.DataFrame, base: str | Path | None = None) -> pd.DataFrame:
    """The frame with every path absolute: relative ones joined to ``base`` (default: the working folder)."""
    root = os.path.abspath(base if base is not None else os.curdir)
    frame = frame.copy()
    for column in path_columns(frame):
        frame[column] = [os.path.normpath(os.path.join(root, p)) if p else "" for p in _texts(frame[column])]
    return frame


def stored_paths(frame: pd.DataFrame, folder: str | Path) -> pd.DataFrame:
    """The frame with paths as a manifest in ``folder`` stores them: relative to it when under it, else absolute."""
    root = Path(os.path.abspath(folder))
    frame = absolute_paths(frame)
    for column in path_columns(frame):
        frame[column] = [_stored(root, p) for p in frame[column]]
    return frame


def _stored(root: Path, path: str) -> str:
    if not path:
        return ""
    try:
        relative = Path(path).relative_to(root)
    except ValueError:
        return path
    return relative.as_posix() if relative.parts else path


def _texts(column: pd.Series) -> list[str]:
    return ["" if pd.isna(value) else str(value) for value in column]


def manifest_paths(target: str | Path) -> tuple[Path, Path]:
    """(parquet, csv) paths for a manifest named ``target`` (with or without a suffix)."""
    target = Path(target)
    stem = target.with_suffix("") if target.suffix in (".parquet", ".csv") else target
    return stem.with_suffix(".parquet"), stem.with_suffix(".csv")


def save_manifest(frame: pd.DataFrame, target: str | Path) -> tuple[Path, Path]:
    """Validate and write ``target``.parquet and ``target``.csv, each atomically.

    Paths are written by the module's rule (relative to ``target``'s folder when under it, else
    absolute); relative paths in ``frame`` are taken as relative to the current working folder.
    """
    parquet, csv = manifest_paths(target)
    frame = stored_paths(validate(frame, base=Path.cwd()), parquet.parent)
    with atomic_path(parquet) as temporary:
        frame.to_parquet(temporary, index=False)
    with atomic_path(csv) as temporary:
        frame.to_csv(temporary, index=False)
    return parquet, csv


def load_manifest(source: str | Path) -> pd.DataFrame:
    """Read a manifest (Parquet preferred, CSV otherwise) and validate it."""
    source = Path(source)
    parquet, csv = manifest_paths(source)
    if source.suffix == ".csv" or (not parquet.exists() and csv.exists()):
        path = csv
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except UnicodeDecodeError as error:
            raise ManifestError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    elif parquet.exists():
        path = parquet
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is both: a text file named .parquet
            raise ManifestError(f"{path}: not a readable Parquet file ({str(error).splitlines()[0]})") from None
    else:
        raise ManifestError(f"no manifest at {source} (looked for {parquet.name} and {csv.name})")
    try:
        return validate(frame, base=path.parent)
    except ManifestError as error:
        raise ManifestError(f"{path}: {error}") from None


def missing_files(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(column, path) of every listed image or mask (non-empty mask paths) that is not an existing file.

    Paths are checked as they are: give a loaded manifest (absolute paths), not a stored one.
    """
    return [(column, path) for column in FILE_COLUMNS if column in frame.columns
            for path in _texts(frame[column]) if path and not os.path.isfile(path)]


def listed_files(frame: pd.DataFrame) -> int:
    """How many image and (non-empty) mask paths the frame lists: the whole that :func:`missing_files` checks."""
    return sum(sum(1 for path in _texts(frame[column]) if path) for column in FILE_COLUMNS if column in frame.columns)


def check_files(frame: pd.DataFrame, manifest: str | Path) -> None:
    """Refuse a manifest (named ``manifest`` in the message) whose images or masks do not all exist.

    Raises:
        ManifestError: how many of how many files are missing, the first few, and how to fix a moved folder.
    """
    missing = missing_files(frame)
    if missing:
        first = ", ".join(path for _, path in missing[:3])
        raise ManifestError(
            f"{manifest}: {len(missing)} of {listed_files(frame)} image/mask files it lists are missing, "
            f"first: {first} (if the data folder moved: lungscreen data relocate {manifest} --from OLD --to NEW)")


@dataclass
class Relocation:
    """What :func:`relocate_manifest` did (or would do, on a dry run)."""

    frame: pd.DataFrame
    changed: list[tuple[str, str]]  # (before, after) of every rewritten path
    listed: int  # image and mask paths in the manifest
    missing: list[tuple[str, str]] = field(default_factory=list)  # (column, path) still missing afterwards
    written: tuple[Path, Path] | None = None  # (parquet, csv), None on a dry run


def relocate_paths(frame: pd.DataFrame, old: str | Path, new: str | Path) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The frame with prefix folder ``old`` of its (absolute) paths replaced by ``new``, and the (before, after) pairs.

    ``old`` and ``new`` are made absolute against the working folder, as the user typed them there.
    """
    old_root, new_root = Path(os.path.abspath(old)), Path(os.path.abspath(new))
    frame, changed = frame.copy(), []
    for column in path_columns(frame):
        paths = _texts(frame[column])
        moved = [_moved(path, old_root, new_root) for path in paths]
        changed += [(before, after) for before, after in zip(paths, moved) if before != after]
        frame[column] = moved
    return frame, changed


def _moved(path: str, old: Path, new: Path) -> str:
    if not path:
        return path
    try:
        return str(new / Path(path).relative_to(old))
    except ValueError:
        return path


def relocate_manifest(manifest: str | Path, old: str | Path, new: str | Path, *, dry_run: bool = False,
                      allow_missing: bool = False) -> Relocation:
    """Point a manifest at its data folder's new place (``old`` -> ``new``) and write it back atomically.

    Raises:
        ManifestError: no path lies under ``old``, or ``new`` does not exist (unless ``allow_missing``).
    """
    frame = load_manifest(manifest)
    relocated, changed = relocate_paths(frame, old, new)
    if not changed:
        example = frame["image_path"].iloc[0] if len(frame) else "none"
        raise ManifestError(f"{manifest}: no image or mask path lies under {os.path.abspath(old)} "
                            f"(--from must be the old data folder; its first image is {example})")
    if not allow_missing and not os.path.isdir(new):
        raise ManifestError(f"{manifest}: --to {os.path.abspath(new)} is not an existing folder "
                            "(move the data there first, or pass --allow-missing)")
    result = Relocation(relocated, changed, listed_files(relocated), missing_files(relocated))
    if not dry_run:
        result.written = save_manifest(relocated, manifest)
    return result


def for_task(frame: pd.DataFrame, task: str | Task, *, modality: str = "CXR",
             views: tuple[str, ...] | None = FRONTAL_VIEWS) -> pd.DataFrame:
    """Rows usable for a task, with ``target`` (the task's integer target) and ``target_name`` columns.

    CXR tasks keep frontal views only by default (laterals and CT stay in the manifest, filtered here).
    Rows whose value the task leaves out (unknown, other, ...) are dropped; a segmentation task keeps only
    rows with a mask, a detection task rows with boxes and normal images.
    """
    task = get_task(task) if isinstance(task, str) else task
    keep = frame["modality"] == modality
    if views is not None and modality == "CXR":
        keep &= frame["view"].isin(views)
    if task.kind == "segmentation" or task.column == "mask_convention":
        keep &= frame["mask_path"].astype(str) != ""
    elif task.kind == "detection":  # finding boxes drawn, or a normal image (nothing to draw); others unlabelled
        keep &= frame["boxes"].map(lambda text: bool(finding_boxes(decode_boxes(str(text or ""))))) | (frame["label"] == "normal")
    rows = frame.loc[keep & frame[task.column].isin(list(task.mapping))].copy()
    rows["target"] = rows[task.column].map(task.index_of).astype("int64")
    rows["target_name"] = rows[task.column].map(lambda value: _target_name(task.class_of(value)))
    return rows.reset_index(drop=True)


def _target_name(target: Any) -> str:
    return "+".join(target) or "none" if isinstance(target, tuple) else str(target)
