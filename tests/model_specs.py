"""Inference specs for models the tests build by hand (training writes them for real runs)."""

from __future__ import annotations

from lungscreen.models import InferenceSpec

NONE_PIPELINE = {"name": "none", "steps": [{"name": "normalize"}]}


def spec_for(classes: list[str], *, kind: str = "multiclass", size: int = 64, channels: int = 1,
             pipeline: dict | None = None, modality: str = "CXR") -> InferenceSpec:
    """A one-head spec: ``classes`` of ``kind``, fed ``size`` x ``size`` through ``pipeline`` (``none``)."""
    return InferenceSpec(input={"size": size, "channels": channels, "pipeline": pipeline or NONE_PIPELINE},
                         heads=[{"kind": kind, "classes": classes}], modality=modality)
