"""Patient-level, label-stratified train/val/test splits and the leakage guard.

The unit of splitting is a *cluster*: every image of one patient plus every near-duplicate of those
images (a copy of a Cohen image in the Radiography Database belongs with its original, whatever the
source says about patients). Clusters are assigned whole, stratum by stratum (source x label), each
to the split furthest below its target share, in a seeded random order; so splits are deterministic
for a seed, every source and label is spread over the splits in the given ratios, and no patient or
duplicate crosses a split. :func:`check_leakage` refuses any manifest where one does.

Example:
    >>> frame["split"] = assign_splits(frame, ratios=(0.7, 0.15, 0.15), seed=0)   # doctest: +SKIP
    >>> check_leakage(frame)                                                      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from lungscreen.data.graph import chain_edges, connected_components
from lungscreen.errors import LeakageError, ManifestError

SPLIT_NAMES = ("train", "val", "test")


def parse_ratios(text: str | Sequence[float]) -> tuple[float, float, float]:
    """'0.7,0.15,0.15' (or a sequence) -> three non-negative ratios summing to 1."""
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 0 for v in values) or not np.isclose(sum(values), 1.0, atol=1e-6):
        raise ManifestError(f"split ratios must be three non-negative numbers summing to 1, got {text!r}")
    return values[0], values[1], values[2]


def clusters(frame: pd.DataFrame) -> np.ndarray:
    """Cluster id per row: connected components of 'same patient' and 'same duplicate group'."""
    rows = pd.Series(np.arange(len(frame)))
    groups = list(rows.groupby(frame["patient_id"].astype(str).to_numpy()).indices.values())
    if "dup_group" in frame.columns:
        duplicates = rows.groupby(frame["dup_group"].astype(str).to_numpy()).indices
        groups += [members for key, members in duplicates.items() if key not in ("", "-1", "nan")]
    return connected_components(len(frame), chain_edges(groups))


def assign_splits(frame: pd.DataFrame, ratios: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> pd.Series:
    """A split name per row: whole clusters, stratified by (source, label), deterministic by seed."""
    ratios = np.asarray(parse_ratios(ratios))
    cluster = clusters(frame)
    table = pd.DataFrame({"cluster": cluster, "source": frame["source"].to_numpy(), "label": frame["label"].to_numpy()})
    units = _units(table)
    choice = np.empty(len(units), dtype=object)
    for (source, label), stratum in units.groupby(["source", "label"], sort=True):
        rng = np.random.default_rng([seed, _stable(f"{source}|{label}")])
        indices, sizes = stratum.index.to_numpy(), stratum["size"].to_numpy()
        filled = np.zeros(3)
        for position in rng.permutation(len(stratum)):
            deficit = np.where(ratios > 0, ratios * sizes.sum() - filled, -np.inf)
            target = int(np.argmax(deficit))
            choice[indices[position]] = SPLIT_NAMES[target]
            filled[target] += sizes[position]
    return pd.Series(choice[cluster], index=frame.index, name="split")


def _units(table: pd.DataFrame) -> pd.DataFrame:
    """One row per cluster (index = cluster id): its size, first source and most frequent label."""
    sizes = table.groupby("cluster").size()
    sources = table.groupby("cluster")["source"].first()
    counts = table.groupby(["cluster", "label"]).size().reset_index(name="count")
    majority = counts.sort_values(["cluster", "count", "label"], ascending=[True, False, True]).drop_duplicates("cluster")
    return pd.DataFrame({"size": sizes, "source": sources, "label": majority.set_index("cluster")["label"]})


def _stable(text: str) -> int:
    """A hash of a string that does not change between Python runs (unlike hash())."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:4], "little")


def check_leakage(frame: pd.DataFrame) -> None:
    """Refuse a manifest in which a patient, or a near-duplicate group, sits in two splits.

    Raises:
        LeakageError: naming how many patients/groups leak and a few examples with their splits.
    """
    assigned = frame[frame["split"].astype(str) != ""]
    _refuse_crossing(assigned, "patient_id", "patient")
    if "dup_group" in assigned.columns:
        grouped = assigned[~assigned["dup_group"].astype(str).isin(["", "-1", "nan"])]
        _refuse_crossing(grouped, "dup_group", "near-duplicate group")


def _refuse_crossing(frame: pd.DataFrame, column: str, what: str) -> None:
    spread = frame.groupby(column)["split"].nunique()
    leaking = spread[spread > 1]
    if leaking.empty:
        return
    examples = []
    for key in leaking.index[:3]:
        rows = frame[frame[column] == key]
        where = ", ".join(f"{split}: {name}" for split, name in
                          zip(rows["split"], rows["image_path"].map(lambda p: p.rsplit("/", 1)[-1])))
        examples.append(f"{key} ({where})")
    raise LeakageError(f"{len(leaking)} {what}(s) sit in more than one split, e.g. " + "; ".join(examples))


def with_splits(rows: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The rows with a train/val/test ``split`` by patient (and near-duplicate cluster), stratified by source.

    A manifest built by ``lungscreen data build`` already has patient-level splits and they are kept, so a
    lung model never trains on a patient whose classification images sit in another split. Rows without a
    split get one from :func:`assign_splits`.
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
