"""Patient-level stratified splits and the leakage guard."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lungscreen.data.manifest import new_row, validate
from lungscreen.data.splits import assign_splits, check_leakage, clusters, parse_ratios
from lungscreen.errors import LeakageError, ManifestError


def population(patients: int = 300, seed: int = 0) -> pd.DataFrame:
    """Two sources, three labels, 1-4 images per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        source = "a" if p % 3 else "b"
        label = ["normal", "pneumonia", "COVID-19"][p % 5 % 3]
        for image in range(rng.integers(1, 5)):
            rows.append(new_row(f"/x/{p}_{image}.png", label, f"{source}:{p}", source))
    return validate(pd.DataFrame(rows))


def test_deterministic_by_seed() -> None:
    frame = population()
    first = assign_splits(frame, seed=3)
    assert first.equals(assign_splits(frame, seed=3))
    assert not first.equals(assign_splits(frame, seed=4))


def test_patients_never_cross_and_ratios_hold() -> None:
    frame = population()
    frame["split"] = assign_splits(frame, ratios=(0.7, 0.15, 0.15), seed=0)
    check_leakage(frame)
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()
    shares = frame["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.7, abs=0.03)
    assert shares["val"] == pytest.approx(0.15, abs=0.03) and shares["test"] == pytest.approx(0.15, abs=0.03)
    # Stratified: every (source, label) stratum appears in every split.
    assert (frame.groupby(["source", "label"])["split"].nunique() == 3).all()


def test_duplicates_join_their_originals_across_sources() -> None:
    frame = population(60)
    frame["dup_group"] = ""
    # Copy of patient a:1's image held by source b under another "patient".
    frame.loc[frame["patient_id"] == "a:1", "dup_group"] = "dup0"
    frame.loc[frame["patient_id"] == "b:0", "dup_group"] = "dup0"
    cluster = clusters(frame)
    assert len(set(cluster[frame["patient_id"].isin(["a:1", "b:0"])])) == 1
    for seed in range(10):
        frame["split"] = assign_splits(frame, seed=seed)
        check_leakage(frame)


def test_zero_ratio_split_stays_empty() -> None:
    frame = population(50)
    assert set(assign_splits(frame, ratios=(0.8, 0.0, 0.2))) == {"train", "test"}


def test_leakage_guard_names_the_patient() -> None:
    frame = population(20)
    frame["split"] = assign_splits(frame)
    patient = frame["patient_id"].value_counts().index[0]  # one with several images
    index = frame.index[frame["patient_id"] == patient]
    frame.loc[index[0], "split"] = "train"
    frame.loc[index[1], "split"] = "test"
    with pytest.raises(LeakageError, match=rf"1 patient\(s\) sit in more than one split, e.g. {patient}"):
        check_leakage(frame)


def test_leakage_guard_catches_near_duplicates() -> None:
    frame = population(20)
    frame["split"] = assign_splits(frame)
    frame["dup_group"] = ""
    train, test = frame.index[frame["split"] == "train"][0], frame.index[frame["split"] == "test"][0]
    frame.loc[[train, test], "dup_group"] = "dup7"
    with pytest.raises(LeakageError, match="near-duplicate group"):
        check_leakage(frame)


@pytest.mark.parametrize("text", ["0.7,0.3", "0.5,0.5,0.5", "-0.1,0.6,0.5", "a,b,c"])
def test_bad_ratios(text: str) -> None:
    with pytest.raises(ManifestError, match="three non-negative numbers"):
        parse_ratios(text)
