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
"""

from lungscreen.models import conv8, covidnet, densenet, resnets, squeezenet, unet  # noqa: F401  (registers them)
from lungscreen.models import multichexnet  # noqa: F401  (registers it; its encoder is a zoo model above)
from lungscreen.models.checkpoint import (
    Checkpoint,
    convert_v1,
    load_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from lungscreen.models.complexity import Complexity, complexity, count_macs, count_parameters
from lungscreen.models.inference_spec import Head, InferenceSpec, OperatingPoint
from lungscreen.models.registry import (
    TASKS,
    ModelInfo,
    ModelSpec,
    create,
    list_models,
    model_info,
    register_model,
    unregister_model,
)
from lungscreen.models.weights import UnsafeWeightsError, WeightsError

__all__ = [
    "TASKS",
    "Checkpoint",
    "Head",
    "InferenceSpec",
    "OperatingPoint",
    "convert_v1",
    "read_checkpoint",
    "resolve_checkpoint",
    "Complexity",
    "ModelInfo",
    "ModelSpec",
    "UnsafeWeightsError",
    "WeightsError",
    "complexity",
    "count_macs",
    "count_parameters",
    "create",
    "list_models",
    "load_checkpoint",
    "model_info",
    "register_model",
    "save_checkpoint",
    "unregister_model",
]
