"""The manifest: one table of every image, its labels, patient, source and split.

A manifest is a pandas DataFrame with the columns in :data:`COLUMNS` (more columns are allowed and kept),
saved side by side as Parquet (fast, typed) and CSV (readable, diffable). :func:`validate` is the one
gate every manifest passes through when it is built, loaded or saved.

Boxes are stored as JSON text ``[[x0, y0, x1, y1, "label"], ...]`` in the pixel frame named by
``box_frame_width`` x ``box_frame_height`` (for NIH that is 1024 x 1024 even when the file on disk was
downscaled); :func:`boxes_for_size` scales them to the size of the image actually read.

Example:
    >>> frame = validate(pd.DataFrame([new_row("a.png", "normal", "p1", "demo")]))
    >>> list(frame.columns[:4])
    ['image_path', 'label', 'fine_label', 'patient_id']
"""

from __future__ import annotations

import json
from collections.abc import Iterable
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
        base: folder that relative image and mask paths are relative to (the manifest's folder).

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
        frame["image_path"] = [_resolve(base, p) for p in frame["image_path"]]
        frame["mask_path"] = [_resolve(base, p) if p else "" for p in frame["mask_path"]]
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


def _resolve(base: Path, path: str) -> str:
    candidate = Path(path)
    return str(candidate if candidate.is_absolute() else (base / candidate).resolve())


def manifest_paths(target: str | Path) -> tuple[Path, Path]:
    """(parquet, csv) paths for a manifest named ``target`` (with or without a suffix)."""
    target = Path(target)
    stem = target.with_suffix("") if target.suffix in (".parquet", ".csv") else target
    return stem.with_suffix(".parquet"), stem.with_suffix(".csv")


def save_manifest(frame: pd.DataFrame, target: str | Path) -> tuple[Path, Path]:
    """Validate and write ``target``.parquet and ``target``.csv, each atomically."""
    frame = validate(frame)
    parquet, csv = manifest_paths(target)
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
        frame = pd.read_parquet(path)
    else:
        raise ManifestError(f"no manifest at {source} (looked for {parquet.name} and {csv.name})")
    try:
        return validate(frame, base=path.parent)
    except ManifestError as error:
        raise ManifestError(f"{path}: {error}") from None


def for_task(frame: pd.DataFrame, task: str | Task, *, modality: str = "CXR",
             views: tuple[str, ...] | None = FRONTAL_VIEWS) -> pd.DataFrame:
    """Rows usable for a task, with ``target`` (the task's integer target) and ``target_name`` columns.

    CXR tasks keep frontal views only by default (laterals and CT stay in the manifest, filtered here).
    Rows whose value the task leaves out (unknown, other, ...) are dropped; a segmentation task keeps only
    rows with a mask.
    """
    task = get_task(task) if isinstance(task, str) else task
    keep = frame["modality"] == modality
    if views is not None and modality == "CXR":
        keep &= frame["view"].isin(views)
    if task.kind == "segmentation":
        keep &= frame["mask_path"].astype(str) != ""
    rows = frame.loc[keep & frame[task.column].isin(list(task.mapping))].copy()
    rows["target"] = rows[task.column].map(task.index_of).astype("int64")
    rows["target_name"] = rows[task.column].map(lambda value: _target_name(task.class_of(value)))
    return rows.reset_index(drop=True)


def _target_name(target: Any) -> str:
    return "+".join(target) or "none" if isinstance(target, tuple) else str(target)
