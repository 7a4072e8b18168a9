"""The composition table: images and patients per source x modality x label x split (paper 000, Table I).

Example:
    >>> table = composition(manifest)         # doctest: +SKIP
    >>> table.loc[("cohen", "CXR", "COVID-19"), ("train", "images")]   # doctest: +SKIP
"""

from __future__ import annotations

import pandas as pd

SPLIT_ORDER = ("train", "val", "test", "")


def composition(frame: pd.DataFrame) -> pd.DataFrame:
    """Counts indexed by (source, modality, label), columns (split, images|patients), plus a total split."""
    keys = ["source", "modality", "label"]
    splits = [s for s in SPLIT_ORDER if (frame["split"] == s).any()]
    parts = {}
    for split in splits + ["total"]:
        rows = frame if split == "total" else frame[frame["split"] == split]
        grouped = rows.groupby(keys)
        parts[(split or "unsplit", "images")] = grouped.size()
        parts[(split or "unsplit", "patients")] = grouped["patient_id"].nunique()
    table = pd.DataFrame(parts).fillna(0).astype("int64")
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["split", "count"])
    return table.sort_index()


def flat_composition(frame: pd.DataFrame) -> pd.DataFrame:
    """The same counts as a flat table (one column per split/count), for CSV files."""
    table = composition(frame)
    table.columns = [f"{split}_{count}" for split, count in table.columns]
    return table.reset_index()
