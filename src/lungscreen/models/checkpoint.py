"""lungscreen's checkpoint format: a model rebuilt from the file alone, with nothing executable inside.

A checkpoint is a ``torch.save`` of a plain dict::

    {"format": "lungscreen-checkpoint", "version": 2,
     "meta": "<JSON text>",   # name, kwargs, in_channels, num_classes, spec (the inference spec), extra
     "state_dict": {name: tensor}}

Metadata is JSON text rather than Python objects so that :func:`load_checkpoint` can use
``torch.load(weights_only=True)``: loading a checkpoint never runs code, and a file crafted to do so is
refused with :class:`~lungscreen.models.weights.UnsafeWeightsError`.

Version 2 carries the :class:`~lungscreen.models.inference_spec.InferenceSpec`, checked against the model
before anything else happens. Version 1 files (no spec: their input size and pipeline sat in free-form
fields, and readers guessed defaults) are refused with the command that converts them
(:func:`convert_v1`, ``lungscreen models convert``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lungscreen
from lungscreen.errors import ConfigError
from lungscreen.io.files import atomic_path, file_sha256
from lungscreen.models.inference_spec import InferenceSpec
from lungscreen.models.registry import ModelSpec, create, model_info
from lungscreen.models.weights import CHECKPOINT_FORMAT, WeightsError, merge_state, read_weights_file

CHECKPOINT_VERSION = 2


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: the network, in eval mode.
        spec: what it eats and emits (the only source consumers read).
        meta: how it was built (``name``, ``kwargs``, ``in_channels``, ``num_classes``) and ``extra``
            (training provenance: run, seed, best epoch, training patients...).
        path: the file it came from.
    """

    model: nn.Module
    spec: InferenceSpec
    meta: dict[str, Any]
    path: Path

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)


def save_checkpoint(path: str | Path, model: nn.Module, *, spec: InferenceSpec,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` with its inference spec; atomic (no half-written file).

    Args:
        path: target file (``.pt`` by convention).
        model: a model built by :func:`~lungscreen.models.create` (it carries ``lungscreen_spec``).
        spec: what the model eats and emits; checked against the model here, so no file contradicts itself.
        extra: anything else JSON-serialisable (metrics, training config, data provenance, ...).

    Raises:
        ConfigError: a model not built by ``create``, a spec that contradicts it, or metadata that JSON
            cannot hold.
    """
    built: ModelSpec | None = getattr(model, "lungscreen_spec", None)
    if built is None:
        raise ConfigError("save_checkpoint needs a model built by lungscreen.models.create (it records how)")
    spec.check_model(model_task=model_info(built.name).task, in_channels=built.in_channels,
                     num_classes=built.num_classes)
    meta = {
        "name": built.name,
        "kwargs": built.kwargs,
        "in_channels": built.in_channels,
        "num_classes": built.num_classes,
        "spec": spec.model_dump(mode="json"),
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


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], InferenceSpec, dict[str, torch.Tensor]]:
    """The metadata, the checked inference spec and the tensors of a checkpoint, without building the model.

    Everything that can be wrong with the file is found here, before any image is read.

    Raises:
        UnsafeWeightsError: the file holds pickled objects (refused, nothing executed).
        WeightsError: unreadable file, a plain state_dict, a newer format, or a version-1 file (with the
            command that converts it).
        ConfigError: a spec missing, malformed, or contradicting the model (the field is named).
    """
    state, meta = read_weights_file(path)
    if meta is None:
        raise WeightsError(f"{path}: a plain state_dict, not a lungscreen checkpoint; use create(name, weights=PATH) "
                           "to load it into a model")
    version = meta["format_version"]
    if version > CHECKPOINT_VERSION:
        raise WeightsError(f"{path}: written by a newer lungscreen (checkpoint format {version}, this version reads "
                           f"{CHECKPOINT_VERSION}); upgrade lungscreen")
    if version < CHECKPOINT_VERSION or "spec" not in meta:
        raise WeightsError(f"{path}: checkpoint format {version} carries no inference spec (what the model eats and "
                           f"emits); convert it with `lungscreen models convert {path} NEW.pt`")
    missing = [key for key in ("name", "kwargs", "in_channels", "num_classes") if key not in meta]
    if missing:
        raise WeightsError(f"{path}: checkpoint metadata lacks {', '.join(missing)}")
    spec = InferenceSpec.parse(meta["spec"], f"{path}: inference spec")
    try:
        spec.check_model(model_task=model_info(meta["name"]).task, in_channels=meta["in_channels"],
                         num_classes=meta["num_classes"])
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return meta, spec, state


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Rebuild a model from one of our checkpoints (see :func:`read_checkpoint` for what is refused)."""
    meta, spec, state = read_checkpoint(path)
    model = create(meta["name"], num_classes=meta["num_classes"], in_channels=meta["in_channels"], **meta["kwargs"])
    merge_state(model, state, source=str(path))
    model.eval()
    return Checkpoint(model, spec, meta, Path(path))


def resolve_checkpoint(run: str | Path, what: str = "RUN") -> Path:
    """A run folder's ``best.pt``, or a checkpoint file given directly.

    Raises:
        ConfigError: neither exists (``what`` names the argument or key in the message).
    """
    path = Path(run)
    candidate = path / "best.pt" if path.is_dir() else path
    if not candidate.is_file():
        raise ConfigError(f"{what}: no checkpoint at {candidate} (give a run folder holding best.pt, or a .pt file)")
    return candidate


def convert_v1(source: str | Path, target: str | Path, *, modality: str = "CXR") -> InferenceSpec:
    """Write a version-1 checkpoint as version 2, building its inference spec from the old free-form fields.

    Version 1 kept the input size in ``extra.image_size`` (classifiers) or ``preprocessing.input_size``
    (the lung U-Net, which equalized its input), the pipeline in ``preprocessing.pipeline`` and the class
    names beside them; it recorded no modality, so give it.

    Raises:
        WeightsError: not a version-1 lungscreen checkpoint, or one lacking its input size.
    """
    state, meta = read_weights_file(source)
    if meta is None or meta["format_version"] != 1:
        raise WeightsError(f"{source}: not a version-1 lungscreen checkpoint (nothing to convert)")
    preprocessing = meta.get("preprocessing") or {}
    size = meta.get("extra", {}).get("image_size") or preprocessing.get("input_size")
    if not size:
        raise WeightsError(f"{source}: records no input size (extra.image_size or preprocessing.input_size)")
    task = model_info(meta["name"]).task
    if task == "segmentation":
        pipeline = {"name": "equalize", "steps": [{"name": "equalize"}, {"name": "normalize"}]}
        head = {"kind": "segmentation", "name": "output", "classes": meta["class_names"]}
    else:
        pipeline = preprocessing.get("pipeline") or {"name": "none", "steps": [{"name": "normalize"}]}
        head = {"kind": "multilabel" if task == "multilabel" else "multiclass", "classes": meta["class_names"]}
    spec = InferenceSpec.parse({"input": {"size": int(size), "channels": meta["in_channels"], "pipeline": pipeline},
                                "heads": [head], "task": meta.get("extra", {}).get("task", ""), "modality": modality},
                               f"{source}: converted spec")
    model = create(meta["name"], num_classes=meta["num_classes"], in_channels=meta["in_channels"], **meta["kwargs"])
    merge_state(model, state, source=str(source))
    save_checkpoint(target, model, spec=spec, extra={**meta.get("extra", {}), "converted_from_v1": str(source)})
    return spec
