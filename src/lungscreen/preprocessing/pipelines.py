"""Named preprocessing chains, stored as plain JSON so a checkpoint can carry the one it was trained with.

=============== ===================================================================================
``none``        ``normalize``: the image as read, rescaled to [0, 1].
``covidnet``    ``top_crop(0.08)``, ``center_square``, ``normalize`` (paper 004's public code; the
                model's own resize follows in training).
``equalize``    ``equalize``, ``normalize``.
``clahe``       ``clahe(clip_limit=2, tile_grid=8)``, ``normalize``.
``tartaglione`` ``equalize``, ``segment_lungs``, ``apply_lung_mask(blur_radius=3)``, ``normalize``
                (paper 000: equalize, U-Net lungs, mask blurred 3 px, keep the lungs, [0, 1]).
``lungcrop``    ``tartaglione`` followed by ``crop_to_lungs(margin=0.05)``, ``normalize``.
``ctcrop``      ``crop_to_body(margin=0.02)``, ``percentile_window(1, 99)``, ``normalize`` (CT slices cut
                from papers: :mod:`lungscreen.preprocessing.ct`).
=============== ===================================================================================

Any parameter can be changed by name (``get_pipeline("tartaglione", {"apply_lung_mask.blur_radius": 5})``),
and a pipeline given as a dict (``{"name": ..., "steps": [...]}``) is rebuilt by :meth:`Pipeline.from_dict`.

A checkpoint stores its pipeline in its inference spec; :mod:`lungscreen.preprocessing.model_input`
runs it, with the resizing and scaling, the one way training and every consumer share.

:meth:`Pipeline.to_dict` stores the *resolved* chain: for ``segment_lungs`` the method actually used
(``unet`` or ``classical``) and the lung model's SHA-256, so a stored pipeline never silently switches
segmenter on another machine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lungscreen.errors import ConfigError
from lungscreen.preprocessing.transforms import (
    LUNGS,
    PreprocessingError,
    Sample,
    Transform,
    check_image,
    transform_from_dict,
)

#: Name of the lung segmentation step (registered by the ``lungs`` package, the layer above this one).
SEGMENT_LUNGS = "segment_lungs"


@dataclass(frozen=True)
class Pipeline:
    """A named chain of steps; calling it on an image returns the preprocessed image.

    Example:
        >>> pipeline = get_pipeline("covidnet")
        >>> pipeline(np.random.default_rng(0).random((100, 80), dtype=np.float32)).shape
        (80, 80)
    """

    name: str
    steps: tuple[Transform, ...]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """float32 (H', W') in [0, 1] from a float image in [0, 1]."""
        return self.apply(Sample(image)).image

    def apply(self, sample: Sample) -> Sample:
        """Run every step on a :class:`Sample` (masks in it follow the geometric steps)."""
        image = check_image(sample.image)
        for key, mask in sample.masks.items():
            if np.shape(mask) != image.shape:
                raise PreprocessingError(f"{key} mask of size {_size(np.shape(mask))} does not match the image "
                                         f"size {_size(image.shape)}")
        sample = sample.replace(image=image).framed()
        for step in self.steps:
            sample = step(sample)
        return sample

    @property
    def segments_lungs(self) -> bool:
        return self.lung_step is not None

    @property
    def lung_step(self) -> Transform | None:
        """The ``segment_lungs`` step, if the chain has one."""
        return next((step for step in self.steps if step.name == SEGMENT_LUNGS), None)

    def resolved(self) -> Pipeline:
        """The same chain with run-time choices fixed (which lung segmenter, which model file)."""
        return Pipeline(self.name, tuple(step.resolved() for step in self.steps))

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., "steps": [{"name": step, **params}, ...]}`` of the resolved chain (plain JSON)."""
        return {"name": self.name, "steps": [step.to_dict() for step in self.resolved().steps]}

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Pipeline:
        """Rebuild a pipeline from :meth:`to_dict`'s output (or a bare ``{"name": NAME}`` of a known chain)."""
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ConfigError(f"a pipeline must be a dict with a 'name' (and 'steps'), got {spec!r}")
        if "steps" not in spec:
            return get_pipeline(str(spec["name"]))
        steps = spec["steps"]
        if not isinstance(steps, list):
            raise ConfigError(f"pipeline {spec['name']!r}: 'steps' must be a list of step dicts")
        return cls(str(spec["name"]), tuple(transform_from_dict(dict(step)) for step in steps))

    def describe(self) -> str:
        """One line: ``name: step(param=value), ...``."""
        parts = []
        for step in self.steps:
            params = {k: v for k, v in step.to_dict().items() if k != "name" and v is not None}
            parts.append(f"{step.name}({', '.join(f'{k}={v}' for k, v in params.items())})")
        return f"{self.name}: " + " -> ".join(parts)


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in reversed(shape))


_TARTAGLIONE: list[dict[str, Any]] = [{"name": "equalize"}, {"name": SEGMENT_LUNGS},
                                     {"name": "apply_lung_mask", "blur_radius": 3.0}, {"name": "normalize"}]

#: Pipeline name -> its steps as plain dicts (rebuilt through the step registry, where ``segment_lungs``
#: comes from the ``lungs`` package).
PIPELINES: dict[str, list[dict[str, Any]]] = {
    "none": [{"name": "normalize"}],
    "covidnet": [{"name": "top_crop", "fraction": 0.08}, {"name": "center_square"}, {"name": "normalize"}],
    "equalize": [{"name": "equalize"}, {"name": "normalize"}],
    "clahe": [{"name": "clahe", "clip_limit": 2.0, "tile_grid": 8}, {"name": "normalize"}],
    "tartaglione": _TARTAGLIONE,
    "lungcrop": _TARTAGLIONE[:-1] + [{"name": "crop_to_lungs", "margin": 0.05}, {"name": "normalize"}],
    "ctcrop": [{"name": "crop_to_body", "margin": 0.02}, {"name": "percentile_window", "low": 1.0, "high": 99.0},
               {"name": "normalize"}],
}


def list_pipelines() -> list[str]:
    return list(PIPELINES)


def get_pipeline(name: str, overrides: Mapping[str, Any] | Iterable[str] | None = None) -> Pipeline:
    """A named pipeline, with parameters changed by ``{"step.param": value}`` or ``["step.param=value"]``.

    Raises:
        ConfigError: unknown pipeline, step or parameter (the message lists the known ones).
    """
    if name not in PIPELINES:
        raise ConfigError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}")
    steps = [dict(step) for step in PIPELINES[name]]
    for key, value in _parse_overrides(overrides).items():
        step_name, _, param = key.partition(".")
        matching = [spec for spec in steps if spec["name"] == step_name]
        if not matching or not param:
            raise ConfigError(f"override {key!r}: pipeline {name!r} has steps "
                              f"{', '.join(spec['name'] for spec in steps)}; write STEP.PARAM=VALUE")
        for spec in matching:
            spec[param] = value
    return Pipeline(name, tuple(transform_from_dict(spec) for spec in steps))


def load_pipeline(spec: str | Mapping[str, Any] | Pipeline) -> Pipeline:
    """A pipeline from its name, its dict, or itself."""
    if isinstance(spec, Pipeline):
        return spec
    if isinstance(spec, Mapping):
        return Pipeline.from_dict(spec)
    return get_pipeline(str(spec))


def _parse_overrides(overrides: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    import yaml

    parsed = {}
    for item in overrides:
        key, sep, text = str(item).partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: write STEP.PARAM=VALUE (e.g. apply_lung_mask.blur_radius=5)")
        parsed[key.strip()] = yaml.safe_load(text)  # numbers, booleans, null and strings, as YAML reads them
    return parsed


__all__ = ["LUNGS", "PIPELINES", "Pipeline", "get_pipeline", "list_pipelines", "load_pipeline"]
