"""lungscreen's checkpoint format: a model rebuilt from the file alone, with nothing executable inside.

A checkpoint is a ``torch.save`` of a plain dict::

    {"format": "lungscreen-checkpoint", "version": 1,
     "meta": "<JSON text>",            # name, kwargs, in_channels, num_classes, class_names, preprocessing, extra
     "state_dict": {name: tensor}}

Metadata is JSON text rather than Python objects so that :func:`load_checkpoint` can use
``torch.load(weights_only=True)``: loading a checkpoint never runs code, and a file crafted to do so is
refused with :class:`~lungscreen.models.weights.UnsafeWeightsError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lungscreen
from lungscreen.errors import ConfigError
from lungscreen.io.files import atomic_path
from lungscreen.models.registry import ModelSpec, create
from lungscreen.models.weights import CHECKPOINT_FORMAT, WeightsError, merge_state, read_weights_file

CHECKPOINT_VERSION = 1


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    class_names: list[str],
    preprocessing: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` with everything needed to rebuild and use it; atomic (no half-written file).

    Args:
        path: target file (``.pt`` by convention).
        model: a model built by :func:`~lungscreen.models.create` (it carries ``lungscreen_spec``).
        class_names: one name per output, in output order.
        preprocessing: the pipeline that produced the training inputs (JSON-serialisable), so inference
            feeds the model what it was trained on.
        extra: anything else JSON-serialisable (metrics, training config, data manifest hash, ...).

    Raises:
        ConfigError: a model not built by ``create``, a class-name count that differs from the outputs,
            or metadata that JSON cannot hold.
    """
    spec: ModelSpec | None = getattr(model, "lungscreen_spec", None)
    if spec is None:
        raise ConfigError("save_checkpoint needs a model built by lungscreen.models.create (it records how)")
    class_names = [str(name) for name in class_names]
    if len(class_names) != spec.num_classes:
        raise ConfigError(f"{len(class_names)} class names for a model with {spec.num_classes} outputs")
    meta = {
        "name": spec.name,
        "kwargs": spec.kwargs,
        "in_channels": spec.in_channels,
        "num_classes": spec.num_classes,
        "class_names": class_names,
        "preprocessing": preprocessing,
        "extra": extra or {},
        "lungscreen_version": lungscreen.__version__,
        "torch_version": torch.__version__,
    }
    try:
        meta_text = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"checkpoint metadata must be plain JSON (str, numbers, lists, dicts): {error}") from error
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    content = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "meta": meta_text, "state_dict": state}
    with atomic_path(path) as temporary:
        torch.save(content, temporary)
    return Path(path)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from one of our checkpoints: ``(model in eval mode, metadata dict)``.

    The metadata has the keys ``name, kwargs, in_channels, num_classes, class_names, preprocessing, extra``
    (plus ``format_version`` and the lungscreen and torch versions that wrote it).

    Raises:
        UnsafeWeightsError: the file holds pickled objects (refused, nothing executed).
        WeightsError: unreadable file, or a plain state_dict without our metadata.
        ConfigError: metadata naming a model or option this version does not know.
    """
    state, meta = read_weights_file(path)
    if meta is None:
        raise WeightsError(
            f"{path}: a plain state_dict, not a lungscreen checkpoint; use create(name, weights=PATH) instead"
        )
    if meta["format_version"] > CHECKPOINT_VERSION:
        raise WeightsError(f"{path}: written by a newer lungscreen (checkpoint format {meta['format_version']}, "
                           f"this version reads up to {CHECKPOINT_VERSION}); upgrade lungscreen")
    missing = [key for key in ("name", "kwargs", "in_channels", "num_classes") if key not in meta]
    if missing:
        raise WeightsError(f"{path}: checkpoint metadata lacks {', '.join(missing)}")
    model = create(meta["name"], num_classes=meta["num_classes"], in_channels=meta["in_channels"], **meta["kwargs"])
    merge_state(model, state, source=str(path))
    model.eval()
    return model, meta
