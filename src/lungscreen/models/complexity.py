"""Parameters and multiply-accumulates (MACs) of the zoo's models, counted without running them.

MACs come from PyTorch's own :class:`torch.utils.flop_counter.FlopCounterMode` (no extra dependency): it
counts the FLOPs of every matrix multiplication and convolution dispatched by a forward pass (2 FLOPs = 1
MAC), whatever module or functional call issues them, so custom blocks need no per-layer rules. Norms,
activations, pooling and additions are not counted, the usual convention behind papers' MAC figures.
Models are built on the ``meta`` device: shapes only, no memory, no compute, instant even for COVID-Net.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lungscreen.models.registry import create, model_info


@dataclass(frozen=True)
class Complexity:
    """Size and cost of one configuration of a model at one input size."""

    name: str
    parameters: int
    macs: int
    input_size: int
    in_channels: int
    num_classes: int


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_size: int | tuple[int, int], in_channels: int = 1) -> int:
    """MACs of one forward pass on one image (batch 1), in eval mode, on the model's device."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_channels, height, width, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def complexity(
    name: str, *, input_size: int | None = None, num_classes: int = 3, in_channels: int = 1, **kwargs: object
) -> Complexity:
    """Parameters and MACs of a registered model, at the paper's input size unless ``input_size`` is given
    (a multi-task model with every head, each of ``num_classes`` outputs)."""
    info = model_info(name)
    size = input_size or info.input_size
    outputs = {head: num_classes for head in info.heads} if info.task == "multitask" else num_classes
    with torch.device("meta"):
        model = create(name, num_classes=outputs, in_channels=in_channels, **kwargs)
    return Complexity(name, count_parameters(model), count_macs(model, size, in_channels), size, in_channels,
                      num_classes)
