"""The inference spec: everything a consumer must know to feed a model and read its outputs.

Training writes it into every checkpoint; predict, evaluate, explain, export, serve and PACS read it and
nothing else (no consumer keeps a default of its own). It holds:

* ``input``: the :class:`InputSpec` (size, channels, intensity
  scaling, the resolved preprocessing pipeline with the lung model's hash);
* ``heads``: per output head its kind, class names and activation (softmax for one-of-k classes,
  sigmoid for labels and masks); ``task_definition``: the label map it learned (so a run is evaluated on
  a manifest with its own task, even one defined inline in a recipe);
* ``modality``, ``views`` and ``reference`` (the training inputs' intensity histogram): what the model
  was trained on, so it is not silently used on other images;
* ``operating_point``: the threshold chosen on validation, once evaluation sets one;
* ``gate``: the out-of-distribution limits an image must stay within to be screened at all.

Example:
    >>> spec = InferenceSpec(
    ...     input={"size": 224, "pipeline": {"name": "none", "steps": [{"name": "normalize"}]}},
    ...     heads=[{"kind": "multiclass", "classes": ["normal", "pneumonia", "COVID-19"]}])
    >>> spec.head().activation, spec.class_names
    ('softmax', ['normal', 'pneumonia', 'COVID-19'])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lungscreen.errors import ConfigError

if TYPE_CHECKING:
    import torch


class InputSpec(BaseModel):
    """What a model eats: stored in its checkpoint, read by every consumer (no consumer has defaults).

    :mod:`lungscreen.preprocessing.model_input` turns an image into this input; the spec itself is plain
    data, so it lives with the checkpoint, beneath the preprocessing that reads it.

    Attributes:
        size: side of the square input in pixels.
        channels: input channels; a gray image is repeated to fill them.
        mean: subtracted after scaling to [0, 1].
        std: divides after subtracting ``mean`` (ImageNet-style normalisation when a model needs it).
        pipeline: the resolved preprocessing pipeline (``Pipeline.to_dict()``: every step's parameters,
            the lung model's SHA-256 for ``segment_lungs``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(ge=8)
    channels: int = Field(default=1, ge=1)
    mean: float = 0.0
    std: float = Field(default=1.0, gt=0)
    pipeline: dict[str, Any]

    @model_validator(mode="after")
    def _pipeline_is_complete(self) -> InputSpec:
        if "name" not in self.pipeline or not isinstance(self.pipeline.get("steps"), list):
            raise ValueError("pipeline must be a resolved pipeline dict with 'name' and 'steps'")
        return self


HeadKind = Literal["multiclass", "multilabel", "segmentation", "detection"]
#: The activation each kind of head needs (one class of k; independent labels; pixels of masks; anchor
#: boxes decoded by the model's grid, :mod:`lungscreen.models.boxes`).
ACTIVATIONS: dict[str, str] = {"multiclass": "softmax", "multilabel": "sigmoid", "segmentation": "sigmoid",
                               "detection": "anchors"}
#: Head kinds a model of each registry task may carry.
MODEL_TASK_HEADS: dict[str, tuple[str, ...]] = {
    "classification": ("multiclass", "multilabel"),
    "multilabel": ("multiclass", "multilabel"),
    "segmentation": ("segmentation",),
    "multitask": ("multiclass", "multilabel", "segmentation", "detection"),
}


class Head(BaseModel):
    """One output of a model.

    Attributes:
        name: the output's name (the key in a multi-head model's output dict; ``output`` for one head).
        kind: ``multiclass`` (softmax over ``classes``), ``multilabel`` (a sigmoid per class) or
            ``segmentation`` (a sigmoid mask per class).
        classes: class, label or mask-channel names, in output order.
        activation: derived from ``kind``; stored so a reader needs no table.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "output"
    kind: HeadKind
    classes: list[str] = Field(min_length=1)
    activation: Literal["softmax", "sigmoid", "anchors"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_activation(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("activation") is None and data.get("kind") in ACTIVATIONS:
            return {**data, "activation": ACTIVATIONS[data["kind"]]}
        return data

    @model_validator(mode="after")
    def _activation_fits_kind(self) -> Head:
        wanted = ACTIVATIONS[self.kind]
        if self.activation != wanted:
            raise ValueError(f"a {self.kind} head needs {wanted}, not {self.activation}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"class names repeat: {self.classes}")
        return self


class OperatingPoint(BaseModel):
    """A decision threshold chosen on validation and applied unchanged to every later prediction.

    Attributes:
        head: the head it applies to.
        positive_class: the class whose probability is compared with ``threshold``.
        threshold: probability at or above which an image is called ``positive_class``.
        rule: how it was chosen (``"sensitivity>=0.95 on val"``).
        chosen_on: the split or sources it was chosen on.
        figures: what it reached there (sensitivity, specificity, ...).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    head: str = "output"
    positive_class: str
    threshold: float = Field(ge=0.0, le=1.0)
    rule: str = ""
    chosen_on: str = ""
    figures: dict[str, float] = Field(default_factory=dict)


class IntensityReference(BaseModel):
    """What the training inputs looked like: their mean intensity histogram at the model's input, and how
    far from it the training images themselves lie. An input much farther away (a CT slice fed to a chest
    X-ray model, a photograph, a blank film) is flagged as out of distribution, not silently scored.

    Attributes:
        histogram: mean normalised histogram of the training inputs (equal-width bins over 0..255).
        threshold: the ``quantile`` of the training images' Jensen-Shannon distance to ``histogram``.
        quantile: which quantile the threshold is (0.99: one training image in a hundred lies beyond it).
        images: how many training images it summarises.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    histogram: list[float] = Field(min_length=2)
    threshold: float = Field(gt=0)
    quantile: float = Field(default=0.99, gt=0, lt=1)
    images: int = Field(ge=1)


class OodGate(BaseModel):
    """What in-distribution looks like for a model, measured at the end of training: an image beyond any of
    these limits is refused ("not screened"), not answered (:mod:`lungscreen.inference.gate`).

    Attributes:
        mean: mean of the training images' pooled embeddings (the model's penultimate features).
        components: the leading principal axes of those embeddings (k x D).
        variances: the embeddings' variance along each axis (k).
        residual_variance: their mean variance per dimension off those axes.
        feature_threshold: the largest Mahalanobis-type distance (over the embedding's dimension) accepted.
        intensity_threshold: the largest intensity-histogram distance accepted, in units of the reference's
            threshold (``reference``).
        lung_ranges: per lung-mask statistic (share of the input, share of the image the lungs span, the
            smaller lung over the larger), the accepted [low, high]; empty when the pipeline draws no lungs.
        rejected_on_validation: the share of validation images these limits refuse (calibrated to stay below
            ``target``), and ``validation_images``, how many it was measured on.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mean: list[float] = Field(min_length=1)
    components: list[list[float]]
    variances: list[float]
    residual_variance: float = Field(gt=0)
    feature_threshold: float = Field(gt=0)
    intensity_threshold: float = Field(gt=0)
    lung_ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)
    target: float = Field(gt=0, lt=1)
    rejected_on_validation: float = Field(ge=0, le=1)
    validation_images: int = Field(ge=1)
    chosen_on: str = ""


class InferenceSpec(BaseModel):
    """What a checkpoint's model eats and emits (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: InputSpec
    heads: list[Head] = Field(min_length=1)
    task: str = ""
    task_definition: dict[str, Any] | None = None
    modality: Literal["CXR", "CT"] = "CXR"
    views: list[str] | None = None
    operating_point: OperatingPoint | None = None
    reference: IntensityReference | None = None
    gate: OodGate | None = None

    @model_validator(mode="after")
    def _heads_are_unique(self) -> InferenceSpec:
        names = [head.name for head in self.heads]
        if len(set(names)) != len(names):
            raise ValueError(f"head names repeat: {names}")
        point = self.operating_point
        if point is not None:
            head = self.head(point.head)
            if point.positive_class not in head.classes:
                raise ValueError(f"operating_point.positive_class {point.positive_class!r} is not a class of head "
                                 f"{head.name!r} ({', '.join(head.classes)})")
        return self

    # ---- reading ---------------------------------------------------------------------------------------
    def head(self, name: str | None = None) -> Head:
        """The head called ``name`` (the only head when None)."""
        if name is None:
            if len(self.heads) != 1:
                raise ConfigError(f"this model has {len(self.heads)} heads ({', '.join(h.name for h in self.heads)}); "
                                  "name the one you want")
            return self.heads[0]
        for head in self.heads:
            if head.name == name:
                return head
        raise ConfigError(f"no head {name!r}; heads: {', '.join(h.name for h in self.heads)}")

    @property
    def class_names(self) -> list[str]:
        """The classes of a single-head model."""
        return list(self.head().classes)

    def activate(self, logits: torch.Tensor, head: str | None = None) -> torch.Tensor:
        """Probabilities from a head's logits (softmax over dimension 1, or an element-wise sigmoid)."""
        import torch

        logits = logits.float()
        if self.head(head).activation == "softmax":
            return torch.softmax(logits, dim=1)
        return torch.sigmoid(logits)

    def probabilities(self, logits: np.ndarray, head: str | None = None) -> np.ndarray:
        """:meth:`activate` on a NumPy array (the torch-free path: exported models on onnxruntime)."""
        from scipy.special import expit, softmax

        logits = np.asarray(logits, np.float32)
        if self.head(head).activation == "softmax":
            return softmax(logits, axis=1)
        return expit(logits)

    def with_pipeline_steps(self, steps: list[dict[str, Any]]) -> InferenceSpec:
        """The spec with other preprocessing steps (same pipeline name): an export's rebound lung model."""
        pipeline = {**self.input.pipeline, "steps": steps}
        return self.model_copy(update={"input": self.input.model_copy(update={"pipeline": pipeline})})

    def with_operating_point(self, point: OperatingPoint | None) -> InferenceSpec:
        return self.model_copy(update={"operating_point": point})

    def with_gate(self, gate: OodGate | None) -> InferenceSpec:
        return self.model_copy(update={"gate": gate})

    # ---- checking against a model ----------------------------------------------------------------------
    def check_model(self, *, model_task: str, in_channels: int, num_classes: int | dict[str, int]) -> None:
        """Refuse a spec that contradicts the model it travels with, naming the field.

        Raises:
            ConfigError: ``input.channels`` differs from the model's input channels, a head's ``classes``
                count differs from the model's outputs, or a head kind the model cannot emit.
        """
        if self.input.channels != in_channels:
            raise ConfigError(f"inference spec input.channels is {self.input.channels} but the model reads "
                              f"{in_channels} channel(s)")
        allowed = MODEL_TASK_HEADS.get(model_task, ())
        for index, head in enumerate(self.heads):
            if head.kind not in allowed:
                raise ConfigError(f"inference spec heads.{index}.kind is {head.kind!r} but the model is a "
                                  f"{model_task} model ({' or '.join(allowed)} heads)")
        outputs = num_classes if isinstance(num_classes, dict) else {self.heads[0].name: num_classes}
        if sorted(head.name for head in self.heads) != sorted(outputs):  # a dict of outputs: names, not order
            raise ConfigError(f"inference spec heads name {', '.join(h.name for h in self.heads)} but the model's "
                              f"outputs are {', '.join(outputs)}")
        for index, head in enumerate(self.heads):
            if len(head.classes) != outputs[head.name]:
                raise ConfigError(f"inference spec heads.{index}.classes names {len(head.classes)} class(es) but the "
                                  f"model has {outputs[head.name]} output(s)")

    @classmethod
    def parse(cls, data: Any, where: str = "inference spec") -> InferenceSpec:
        """Validate plain data (from a checkpoint or a file); :class:`ConfigError` naming the first bad field."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            location = ".".join(str(part) for part in first["loc"]) or "spec"
            raise ConfigError(f"{where} {location}: {first['msg']}") from None


__all__ = ["ACTIVATIONS", "Head", "InferenceSpec", "InputSpec", "IntensityReference", "OodGate", "OperatingPoint"]
