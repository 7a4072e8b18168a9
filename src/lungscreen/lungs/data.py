"""The lung-mask rows of a manifest: which rows teach or test lung segmentation, and which lungs they draw.

Every row with a ``mask_path`` carries its ``mask_convention`` (which lungs the mask draws, see
:mod:`lungscreen.lungs`); v7labs also paints devices and markup over the lungs as "Ignore" (grey 127),
pixels whose truth is unknown, so they count neither as lung nor as background in the loss or in Dice
(:func:`lungscreen.io.read_mask_layers` reads both).
"""

from __future__ import annotations

import pandas as pd

from lungscreen.data.labels import BEHIND_HEART, HEART_EXCLUDED, MASK_CONVENTIONS
from lungscreen.errors import ManifestError
from lungscreen.preprocessing.transforms import PreprocessingError

#: Model output channel -> mask convention (the lung model's classes, in this order; the ``lungs`` task).
CONVENTIONS: tuple[str, ...] = (HEART_EXCLUDED, BEHIND_HEART)


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
