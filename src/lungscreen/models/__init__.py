"""The model zoo: every network of the five papers behind one registry.

Example:
    >>> from lungscreen.models import create, list_models
    >>> list_models("squeeze*")
    ['squeezenet1_0', 'squeezenet1_0_bypass', 'squeezenet1_1', 'squeezenet1_1_bypass', 'squeezenet_ct']
    >>> model = create("covidnet_tiny", num_classes=3, in_channels=1)
    >>> model.features(torch.zeros(2, 1, 64, 64)).shape   # doctest: +SKIP
    torch.Size([2, 256])

A checkpoint carries its model's :class:`InferenceSpec` (input size, channels, scaling, preprocessing,
heads and their activations, modality, operating point); every consumer reads it and nothing else.

Every classification model has ``features(x)``, ``classifier``, ``cam_layer``, ``layer_groups()`` and
``min_input_size`` (see :mod:`lungscreen.models.registry` for what each task requires), accepts 1 or 3
input channels and any input side >= ``min_input_size``. Checkpoints (:func:`save_checkpoint`) hold JSON
metadata and tensors only, and are read with ``torch.load(weights_only=True)``.

| name | paper | network |
|---|---|---|
| covidnet, covidnet_small, covidnet_tiny | 004 | COVID-Net (PEPX), and narrower variants with global pooling |
| covid_resnet | 003 | ResNet-50 + fastai head |
| resnet18, resnet50, conv8 | 000 | 1-channel ResNets with an MLP head; Conv8 |
| squeezenet1_0, squeezenet1_1 (+ _bypass), squeezenet_ct | 002 | SqueezeNets; the light CT CNN |
| densenet121 | 001 | DenseNet-121 (CheXNet), multi-label |
| lung_unet | 000 | MONAI U-Net for lung masks (segmentation; :mod:`lungscreen.models.unet`, lungs engineer) |

The names below are imported on first use (PEP 562): the inference spec and the ONNX runtime side
(:mod:`lungscreen.models.onnx`) need no torch, so a torch-free predictor can import this package.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule defining it
_PUBLIC = {
    "Checkpoint": "checkpoint", "convert_v1": "checkpoint", "load_checkpoint": "checkpoint",
    "read_checkpoint": "checkpoint", "resolve_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "Complexity": "complexity", "complexity": "complexity", "count_macs": "complexity",
    "count_parameters": "complexity",
    "Head": "inference_spec", "InferenceSpec": "inference_spec", "OodGate": "inference_spec",
    "OperatingPoint": "inference_spec",
    "TASKS": "registry", "ModelInfo": "registry", "ModelSpec": "registry", "create": "registry",
    "list_models": "registry", "model_info": "registry", "register_model": "registry",
    "unregister_model": "registry",
    "UnsafeWeightsError": "errors", "WeightsError": "errors",
}
#: submodules that neither need torch nor the registered zoo
_TORCH_FREE = {"inference_spec", "errors"}


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if module not in _TORCH_FREE:
        importlib.import_module(f"{__name__}.zoo")
    value = getattr(importlib.import_module(f"lungscreen.{module}" if module == "errors" else f"{__name__}.{module}"), name)
    globals()[name] = value  # a submodule of the same name (complexity) must not shadow the function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


__all__ = sorted(_PUBLIC)
