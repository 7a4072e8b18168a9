"""Loss functions and loss terms of a classifier stage (``loss:`` in a recipe).

A stage's loss is its task's own (cross-entropy, focal or one-hot BCE for classes, BCE for multi-label
heads; masks and boxes have theirs in :mod:`~lungscreen.training.objectives`), weighted per class, plus the
terms a recipe adds to it:

* ``spectral_decoupling: lambda``: ``lambda / 2 * mean ||logits||^2`` (Pezeshki et al. 2021, "Gradient
  starvation"; Pohjonen et al., iScience 2022: up to +9.5 points on external data, COVID-19 chest X-rays
  among them). Cross-entropy keeps rewarding larger logits for images it already gets right, so the network
  leans ever harder on the first features that separate the training set - in the public COVID-19 sets, the
  hospital. The penalty stops that growth and leaves room for the other features.

Example:
    >>> import torch
    >>> spectral_penalty(torch.tensor([[3.0, 4.0]]), 0.1)    # 0.1 / 2 * (9 + 16)
    tensor(1.2500)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lungscreen.training.config import LossConfig


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017): cross-entropy scaled by ``(1 - p_true) ** gamma``, so the many
    easy images weigh less than the few hard ones."""

    def __init__(self, gamma: float = 2.0, weight: Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        log_p = torch.log_softmax(logits.float(), dim=1)
        log_true = log_p.gather(1, target[:, None]).squeeze(1)
        loss = -((1 - log_true.exp()) ** self.gamma) * log_true
        if self.weight is not None:
            w = self.weight[target]
            return (loss * w).sum() / w.sum()
        return loss.mean()


class OneHotBCE(nn.Module):
    """Binary cross-entropy per class on one-hot targets (multi-label heads); ``pos_weight`` from class weights."""

    def __init__(self, num_classes: int, pos_weight: Tensor | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.loss = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if target.ndim == 1:
            target = nn.functional.one_hot(target, self.num_classes)
        return self.loss(logits.float(), target.float())


def resolve_class_weights(spec: Any, class_names: tuple[str, ...], train_targets: np.ndarray) -> Tensor | None:
    """The ``loss.class_weights`` of a stage as a tensor in class order."""
    from lungscreen.training.sampling import balanced_class_weights

    if spec is None:
        return None
    if spec == "balanced":
        weights = balanced_class_weights(train_targets, len(class_names))
    elif isinstance(spec, dict):
        weights = np.array([float(spec.get(name, 1.0)) for name in class_names])
    else:
        weights = np.array([float(w) for w in spec])
    return torch.tensor(weights, dtype=torch.float32)


def build_loss(config: LossConfig, num_classes: int, weights: Tensor | None) -> nn.Module:
    """A classifier's loss (``ce`` when the recipe leaves the name to the task)."""
    if config.name in (None, "ce"):
        return nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
    if config.name == "focal":
        return FocalLoss(config.gamma, weights)
    return OneHotBCE(num_classes, pos_weight=weights)


def spectral_penalty(logits: Tensor, strength: float) -> Tensor:
    """Spectral decoupling: ``strength / 2`` times the mean over the batch of each image's squared logit norm."""
    return 0.5 * strength * logits.float().pow(2).sum(dim=1).mean()
