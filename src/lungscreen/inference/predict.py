"""Batch prediction with a trained run: files and folders in, one CSV row per image out.

The run's ``best.pt`` carries the model, its class names and the preprocessing its training images went
through, so new images are fed exactly as the training ones were (same pipeline, same resizing). An image
that cannot be read or preprocessed gets a row with empty probabilities and the reason in ``error``; the
batch goes on.

Example:
    >>> frame = predict_paths("runs/covid-resnet-cpu", ["new_images/"])       # doctest: +SKIP
    >>> list(frame.columns)                                                     # doctest: +SKIP
    ['path', 'normal', 'pneumonia', 'COVID-19', 'prediction', 'error']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungscreen.errors import ConfigError, LungscreenError
from lungscreen.io.files import iter_image_files


def resolve_checkpoint(run: str | Path) -> Path:
    """A run folder's ``best.pt``, or a checkpoint file given directly."""
    path = Path(run)
    candidate = path / "best.pt" if path.is_dir() else path
    if not candidate.is_file():
        raise ConfigError(f"RUN: no checkpoint at {candidate} (give a run folder holding best.pt, or a .pt file)")
    return candidate


class Predictor:
    """A loaded checkpoint plus the preprocessing it was trained with."""

    def __init__(self, run: str | Path) -> None:
        import torch

        from lungscreen.models import load_checkpoint
        from lungscreen.training.data import Preprocessor

        self.checkpoint = resolve_checkpoint(run)
        self.model, self.meta = load_checkpoint(self.checkpoint)
        self.model.eval()
        self.class_names: list[str] = list(self.meta["class_names"])
        extra, spec = self.meta.get("extra", {}), self.meta.get("preprocessing", {})
        self.image_size = int(extra.get("image_size", 224))
        self.preprocessor = Preprocessor(spec.get("pipeline", "none"), int(spec.get("base_size", self.image_size)))
        self._torch = torch

    def load(self, path: Path) -> np.ndarray:
        """uint8 ``(S, S)`` as in training: pipeline, base size, then the stage's size."""
        from lungscreen.training.data import resize_square

        return resize_square(self.preprocessor(str(path)), self.image_size)

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        torch = self._torch
        batch = torch.from_numpy(np.stack(images)).to(torch.float32).div_(255.0).unsqueeze(1)
        with torch.inference_mode():
            return torch.softmax(self.model(batch).float(), dim=1).numpy()


def predict_paths(run: str | Path, inputs: Iterable[str | Path], *, batch_size: int = 32,
                  progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Predict every image file named in ``inputs`` or found (recursively) under folders in it.

    Returns:
        One row per image: ``path``, a probability column per class (named by the class), ``prediction``
        (the most probable class) and ``error`` (empty, or why the image could not be used).
    """
    predictor = Predictor(run)
    paths = list(iter_image_files(*inputs))
    rows: list[dict[str, Any]] = []
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        probabilities = predictor.probabilities([image for _, image in pending])
        for (row_index, _), values in zip(pending, probabilities):
            rows[row_index].update({name: float(p) for name, p in zip(predictor.class_names, values)})
            rows[row_index]["prediction"] = predictor.class_names[int(np.argmax(values))]
        pending.clear()

    for done, path in enumerate(paths, start=1):
        row: dict[str, Any] = {"path": str(path), **{name: np.nan for name in predictor.class_names},
                               "prediction": "", "error": ""}
        rows.append(row)
        try:
            pending.append((len(rows) - 1, predictor.load(path)))
        except LungscreenError as error:
            row["error"] = getattr(error, "reason", None) or str(error)
        if len(pending) >= batch_size:
            flush()
        if progress is not None:
            progress(done)
    flush()
    columns = ["path", *predictor.class_names, "prediction", "error"]
    return pd.DataFrame(rows, columns=columns)
