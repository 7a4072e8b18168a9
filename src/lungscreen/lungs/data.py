"""Image/mask pairs for lung segmentation, taken from any manifest (rows with a ``mask_path``).

Each pair carries its ``mask_convention`` (which lungs the mask draws) and an *ignore* map: v7labs paints
devices and markup over the lungs as "Ignore" (grey 127), pixels whose truth is unknown, so they count
neither as lung nor as background in the loss or in Dice.

Masks are resized to their image with nearest neighbour (the viral-pneumonia masks are 256 px for 299 px
images), but a mask whose aspect ratio differs from its image's is refused: it belongs to another picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lungscreen.data.sources.common import (
    BEHIND_HEART,
    HEART_EXCLUDED,
    MASK_CONVENTIONS,
)
from lungscreen.data.splits import assign_splits
from lungscreen.errors import ManifestError
from lungscreen.io.images import read_image
from lungscreen.preprocessing.transforms import (
    PreprocessingError,
    resize_image,
    resize_mask,
)

#: Model output channel -> mask convention (the checkpoint's class names, in this order).
CONVENTIONS: tuple[str, ...] = (HEART_EXCLUDED, BEHIND_HEART)
#: Aspect ratios of mask and image may differ by this share (rounding in downscaled copies), no more.
ASPECT_TOLERANCE = 0.03


@dataclass(frozen=True)
class ReferenceMask:
    """A reference lung mask at its image's size: ``lung`` and ``ignore`` (unknown truth), both bool."""

    lung: np.ndarray
    ignore: np.ndarray


def read_reference_mask(path: str, shape: tuple[int, int]) -> ReferenceMask:
    """Read a mask file and align it with an image of ``shape`` (height, width).

    Grey levels: bright (> 0.65) is lung, mid-grey (0.35-0.65, v7labs' 127 "Ignore") is unknown, dark is
    background; a mask stored as 0/1 in 8 bits is read as 0/255.

    Raises:
        ImageReadError: unreadable file.
        PreprocessingError: aspect ratio differs from the image's (the mask of another picture).
    """
    values = read_image(path).pixels  # float [0, 1], any mode, resized below
    height, width = shape
    mask_h, mask_w = values.shape
    if abs((mask_w / mask_h) / (width / height) - 1) > ASPECT_TOLERANCE:
        raise PreprocessingError(f"{path}: mask of size {mask_w}x{mask_h} does not fit an image of size "
                                 f"{width}x{height} (another aspect ratio: the mask of another picture?)")
    if 0 < values.max() <= 1.5 / 255:  # 0/1 masks stored in 8 bits
        values = values * 255.0
    lung = resize_mask(values > 0.65, height, width)
    ignore = resize_mask((values >= 0.35) & (values <= 0.65), height, width)
    return ReferenceMask(lung, ignore)


@dataclass(frozen=True)
class Pair:
    """One training or evaluation pair at the working size."""

    image: np.ndarray          # float32 (S, S) in [0, 1]
    lung: np.ndarray           # bool (S, S)
    ignore: np.ndarray         # bool (S, S)
    convention: int            # index into CONVENTIONS
    source: str
    patient: str
    path: str


def load_pair(image_path: str, mask_path: str, convention: str, size: int, source: str = "",
              patient: str = "") -> Pair:
    """Read an image and its mask, check them, resize both to ``size`` x ``size``.

    Raises:
        ImageReadError: unreadable file.
        PreprocessingError: mask of another aspect ratio, empty mask, blank image, unknown convention.
    """
    image = read_image(image_path).pixels
    reference = read_reference_mask(mask_path, image.shape)
    if not reference.lung.any():
        raise PreprocessingError(f"{mask_path}: empty lung mask (no lung pixel); a pair needs drawn lungs")
    if float(image.max() - image.min()) < 1e-3:
        raise PreprocessingError(f"{image_path}: blank image (every pixel {float(image.min()):.3f})")
    return Pair(resize_image(image, size, size), resize_mask(reference.lung, size, size),
                resize_mask(reference.ignore, size, size), convention_index(convention), source, patient,
                str(image_path))


def convention_index(convention: str) -> int:
    if convention not in CONVENTIONS:
        raise PreprocessingError(f"unknown mask convention {convention!r}; known: {', '.join(CONVENTIONS)} "
                                 f"({'; '.join(f'{k}: {v}' for k, v in MASK_CONVENTIONS.items())})")
    return CONVENTIONS.index(convention)


def mask_rows(frame: pd.DataFrame, default_convention: str | None = None) -> pd.DataFrame:
    """Rows with a lung mask, each with a known ``mask_convention``.

    Args:
        frame: a manifest.
        default_convention: convention for rows that do not state one (a manifest written by hand);
            None refuses such rows, because mixing conventions unknowingly is exactly the mistake to avoid.

    Raises:
        ManifestError: no row with a mask, or rows without a convention and no default.
    """
    rows = frame.loc[frame["mask_path"].fillna("").astype(str) != ""].copy()
    if rows.empty:
        raise ManifestError("the manifest has no row with a lung mask (mask_path); lung segmentation needs "
                            "mask sets such as OpenIST, v7labs, Montgomery/Shenzhen")
    if "mask_convention" not in rows.columns:
        rows["mask_convention"] = ""
    rows["mask_convention"] = rows["mask_convention"].fillna("").astype(str)
    unknown = rows["mask_convention"] == ""
    if unknown.any():
        if default_convention is None:
            raise ManifestError(
                f"{int(unknown.sum())} row(s) with a mask but no mask_convention (e.g. {rows.loc[unknown, 'mask_path'].iloc[0]}); "
                f"say which lungs they draw with --default-convention ({' or '.join(CONVENTIONS)})")
        rows.loc[unknown, "mask_convention"] = default_convention
    bad = ~rows["mask_convention"].isin(CONVENTIONS)
    if bad.any():
        raise ManifestError(f"unknown mask_convention value(s) {sorted(set(rows.loc[bad, 'mask_convention']))}; "
                            f"known: {', '.join(CONVENTIONS)}")
    return rows.reset_index(drop=True)


def with_splits(rows: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The rows with a train/val/test ``split`` by patient (and near-duplicate cluster), stratified by source.

    A manifest built by ``lungscreen data build`` already has patient-level splits and they are kept, so a
    lung model never trains on a patient whose classification images sit in another split. Rows without a
    split get one from :func:`lungscreen.data.splits.assign_splits`.
    """
    rows = rows.copy()
    if "split" not in rows.columns:
        rows["split"] = ""
    rows["split"] = rows["split"].fillna("").astype(str)
    known = rows.loc[rows["split"] != ""].drop_duplicates("patient_id").set_index("patient_id")["split"]
    inherit = (rows["split"] == "") & rows["patient_id"].isin(known.index)
    rows.loc[inherit, "split"] = rows.loc[inherit, "patient_id"].map(known)  # a patient stays in one split
    missing = rows["split"] == ""
    if missing.any():
        rows.loc[missing, "split"] = assign_splits(rows.loc[missing], seed=seed).to_numpy()
    return rows
