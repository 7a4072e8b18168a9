"""The one scoring runner: a checkpoint and manifest rows in, one row per image out.

``evaluate``, the bias audit, the training engine's test step and (through the same
:class:`~lungscreen.inference.predict.Predictor`) ``predict`` all score images here, through the
checkpoint's own inference spec, so every figure lungscreen reports comes from the same probabilities.

The table keeps what a report needs beside the probabilities: ``image_path``, ``patient_id``, ``source``,
``truth`` (the task's class name, when the row has one) and ``target`` (its index), one column per class,
``prediction`` (the spec's operating point applied when it has one), ``ood`` / ``ood_score``, ``refused``
(why the spec's OOD gate would not screen the image, '' when it would: figures are computed on every image,
the refusals are counted beside them) and ``error``.

Example:
    >>> table = score_rows(Predictor("runs/covid-resnet-cpu"), rows)            # doctest: +SKIP
    >>> table[["source", "truth", "COVID-19", "prediction"]].head()             # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lungscreen.errors import LungscreenError
from lungscreen.inference.predict import Predictor
from lungscreen.io.images import read_image
from lungscreen.preprocessing import Sample

if TYPE_CHECKING:
    from lungscreen.models.inference_spec import OodGate

#: Manifest columns the table carries over when the rows have them.
CARRIED = ("image_path", "patient_id", "source", "label", "split", "dup_group")


def score_rows(predictor: Predictor, rows: pd.DataFrame, *, batch_size: int = 32,
               progress: Callable[[int], None] | None = None,
               prepared: Mapping[str, Sample] | None = None) -> pd.DataFrame:
    """Score manifest rows (from ``for_task``, with ``target``/``target_name`` when known).

    Args:
        predictor: the loaded checkpoint.
        rows: manifest rows; ``image_path`` is required.
        batch_size: images per forward pass.
        progress: called with the number of rows done.
        prepared: samples this predictor's pipeline already made, by image path (several models sharing one
            pipeline, such as a run and its AdaBN copies, then prepare each image once).

    Returns:
        One row per input row, in order (see the module docstring for the columns).
    """
    classes = predictor.class_names
    table = rows[[c for c in CARRIED if c in rows.columns]].reset_index(drop=True).copy()
    if "target_name" in rows.columns:
        table["truth"] = rows["target_name"].to_numpy()
        table["target"] = rows["target"].to_numpy()
    probabilities = np.full((len(table), len(classes)), np.nan)
    predictions = np.full(len(table), "", dtype=object)
    errors = np.full(len(table), "", dtype=object)
    ood, scores = np.zeros(len(table), bool), np.full(len(table), np.nan)
    refused = np.full(len(table), "", dtype=object)
    pending: list[tuple[int, Sample]] = []

    def flush() -> None:
        if pending:
            samples = [sample for _, sample in pending]
            values, features = predictor.scores(samples)
            for (index, _), row, reason in zip(pending, values, predictor.refusals(samples, features), strict=True):
                probabilities[index] = row
                predictions[index] = predictor.decide(row)
                refused[index] = reason
                ood[index] |= bool(reason)
            pending.clear()

    for index, path in enumerate(table["image_path"].astype(str)):
        try:
            sample = prepared[path] if prepared and path in prepared else predictor.prepare(read_image(path).pixels)
        except LungscreenError as error:
            errors[index] = str(error)
        else:
            scores[index] = predictor.distance(sample)
            ood[index] = bool(scores[index] > 1.0)
            pending.append((index, sample))
            if len(pending) >= batch_size:
                flush()
        if progress is not None:
            progress(index + 1)
    flush()
    for column, name in enumerate(classes):
        table[name] = probabilities[:, column]
    table["prediction"], table["ood"], table["ood_score"] = predictions, ood, scores
    table["refused"], table["error"] = refused, errors
    return table


def gate_inputs(predictor: Predictor, rows: pd.DataFrame, *, batch_size: int = 32,
                ) -> tuple[np.ndarray, list[float], list[dict[str, float] | None]]:
    """What an OOD gate is fitted on, for the rows' images: the model's pooled embeddings (N, D), each
    input's intensity distance (in units of the spec's reference threshold) and its lung statistics.
    Images that cannot be prepared are left out.

    Raises:
        LungscreenError: the model gives no embedding (an ONNX export without one, a multi-task model).
    """
    from lungscreen.inference.gate import lung_statistics

    samples = []
    for path in rows["image_path"].astype(str):
        try:
            samples.append(predictor.prepare(read_image(path).pixels))
        except LungscreenError:
            continue
    features = []
    for start in range(0, len(samples), batch_size):
        _, embedding = predictor.scores(samples[start:start + batch_size], features=True)
        if embedding is None:
            raise LungscreenError(f"{predictor.checkpoint.path}: the model gives no embedding to fit a gate on")
        features.append(embedding)
    return (np.concatenate(features) if features else np.zeros((0, 0)), [predictor.distance(s) for s in samples],
            [lung_statistics(s) for s in samples])


def fit_gate_for(predictor: Predictor, train: pd.DataFrame, val: pd.DataFrame, *, target: float,
                 chosen_on: str) -> OodGate:
    """The OOD gate of ``predictor``'s model: the embedding's Gaussian on the ``train`` rows' images, the
    limits on the ``val`` rows' (training's last step, and a finished run's gate fitted afterwards).

    Raises:
        ValueError: too few images to fit it on.
    """
    from lungscreen.inference.gate import fit_gate

    train_features, _, _ = gate_inputs(predictor, train)
    val_features, intensity, lungs = gate_inputs(predictor, val)
    return fit_gate(train_features, val_features, intensity, lungs, target=target, chosen_on=chosen_on)


def original_images(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows as a checkpoint must see them: a manifest ``lungscreen preprocess`` wrote points at pictures
    its pipeline already made, while a checkpoint applies its recorded pipeline itself, so its rows are
    scored from their original images (the same pixels in the end: the cache holds exactly that output)."""
    if "original_image_path" in rows.columns and (rows["original_image_path"].astype(str) != "").all():
        return rows.assign(image_path=rows["original_image_path"])
    return rows


def scored(table: pd.DataFrame) -> pd.DataFrame:
    """The rows that were scored (no error) and have a known truth: what figures are computed on."""
    keep = table["error"] == ""
    if "target" in table.columns:
        keep &= table["target"].notna()
    return table[keep].reset_index(drop=True)
