"""Heads that exist only while training: a zoo network wrapped with a head that shapes how it learns.

A :class:`TrainingHead` wraps a zoo classifier (its ``backbone``) and adds a head the checkpoints never
store: the engine trains the wrapper and saves :func:`unwrapped` (the backbone, its own classifier
included). Two live here and in :mod:`~lungscreen.training.contrastive`:

* :class:`SiteAdversary` (``adversary:`` in a stage): a head that predicts each image's source from the
  backbone's pooled embedding through a gradient-reversal layer (Ganin & Lempitsky 2015). The head learns
  to tell the hospitals apart; the reversed gradient teaches the backbone features it cannot tell them
  apart by. Class-conditional by default: the head predicts the source *within each class* (its output is
  one block of source logits per class, scored on the image's true class), so what it removes is the part
  of the embedding that says "which hospital" beyond "which disease" - a plain adversary would also strip
  the disease wherever the label is predictable from the source, which is the case in the public COVID-19
  sets. Feature disentanglement of this kind beat lung masking and equalization on held-out COVID-19 chest
  X-ray sources (Trivedi et al., PLoS ONE 2022).
* the SimCLR projection head (:class:`~lungscreen.training.contrastive.Pretrainer`).

With ``mode="confusion"`` the head learns the sources on detached features, and the encoder is pushed to make
that head's answer uniform (Tzeng et al. 2015; Alvi et al. 2018, "Turning a blind eye"): a reversed gradient
can be satisfied by *flipping* what the head reads (the head then names the wrong hospital every time and
the source is as easy to read as before), a uniform answer only by dropping it.

The reversal's strength follows Ganin & Lempitsky's schedule over the stage's progress ``p`` in [0, 1]:
``weight * (2 / (1 + exp(-gamma * p)) - 1)``, 0 at the start (the head first learns to see the sources) and
close to ``weight`` from the middle on.

Example:
    >>> adversary = SiteAdversary(model, sources=["cohen", "nih"], classes=3)        # doctest: +SKIP
    >>> out = adversary(images)                                                       # doctest: +SKIP
    >>> out["output"].shape, out["site"].shape                                        # doctest: +SKIP
    (torch.Size([8, 3]), torch.Size([8, 6]))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lungscreen.training.objectives import Objective


class TrainingHead(nn.Module):
    """Base of the training-only wrappers: ``backbone`` is the zoo network the checkpoints store."""

    backbone: nn.Module

    def set_progress(self, progress: float) -> None:
        """Told the stage's progress (0 at its first step, 1 at its last) before every training step."""


def unwrapped(model: nn.Module) -> nn.Module:
    """The network a checkpoint stores: a training wrapper's backbone, else the model itself."""
    return model.backbone if isinstance(model, TrainingHead) else model


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx: Any, features: Tensor, factor: float) -> Tensor:  # noqa: ANN401
        ctx.factor = factor
        return features.view_as(features)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN401
        return ctx.factor * grad, None


class GradientScale(nn.Module):
    """Passes features on and sends the gradient back times ``factor``: negative, Ganin's gradient-reversal
    layer; positive, the confusion term's ramp."""

    def __init__(self, factor: float = 0.0) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, features: Tensor) -> Tensor:
        return _ScaleGradient.apply(features, self.factor)


def ganin_ramp(progress: float, weight: float = 1.0, gamma: float = 10.0) -> float:
    """Ganin & Lempitsky's schedule: ``weight * (2 / (1 + exp(-gamma * progress)) - 1)``."""
    return weight * (2.0 / (1.0 + math.exp(-gamma * min(max(progress, 0.0), 1.0))) - 1.0)


class SiteAdversary(TrainingHead):
    """A classifier and a source adversary on its embedding (module docstring).

    Args:
        backbone: a zoo classifier (``features`` and ``classifier``).
        sources: the sources the head tells apart, in output order.
        classes: the classifier's number of classes (blocks of the class-conditional head).
        class_conditional: one block of source logits per class (else one block).
        hidden_dim: width of the head's hidden layer.
        weight: the reversal's (or the confusion term's) final strength.
        gamma: steepness of the ramp.
        mode: ``"reversal"`` or ``"confusion"`` (module docstring).
    """

    def __init__(self, backbone: nn.Module, *, sources: Sequence[str], classes: int, class_conditional: bool = True,
                 hidden_dim: int = 128, weight: float = 1.0, gamma: float = 10.0, mode: str = "reversal") -> None:
        super().__init__()
        if mode not in ("reversal", "confusion"):
            raise ValueError(f"adversary mode must be 'reversal' or 'confusion', got {mode!r}")
        if not hasattr(backbone, "features") or not hasattr(backbone, "classifier"):
            raise ValueError(f"{type(backbone).__name__} has no features()/classifier: a site adversary needs "
                             "a zoo classifier")
        self.backbone = backbone
        self.sources = list(sources)
        self.blocks = classes if class_conditional else 1
        self.weight, self.gamma, self.mode = weight, gamma, mode
        self.gradient = GradientScale(0.0)  # the ramp sets its factor (reversed in mode "reversal")
        width = embedding_width(backbone)
        self.head = nn.Sequential(nn.Linear(width, hidden_dim), nn.ReLU(inplace=True),
                                  nn.Linear(hidden_dim, self.blocks * len(self.sources)))

    def set_progress(self, progress: float) -> None:
        strength = ganin_ramp(progress, self.weight, self.gamma)
        self.gradient.factor = -strength if self.mode == "reversal" else strength

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        features = self.backbone.features(images)
        out = {"output": self.backbone.classifier(features)}
        if self.mode == "reversal":
            out["site"] = self.head(self.gradient(features))
            return out
        out["site"] = self.head(features.detach())  # the head learns the sources; the encoder is not told
        frozen = {name: value.detach() for name, value in self.head.named_parameters()}
        out["confusion"] = torch.func.functional_call(self.head, frozen, (self.gradient(features),))
        return out

    def layer_groups(self) -> list[nn.Module]:
        """The backbone's groups, its classifier and the adversary's head trained together as the last."""
        groups = list(self.backbone.layer_groups())
        return [*groups[:-1], nn.ModuleList([groups[-1], self.head])]


def embedding_width(backbone: nn.Module) -> int:
    """The size of a zoo classifier's pooled embedding (one forward pass of a blank batch)."""
    spec = backbone.lungscreen_spec
    side = max(32, int(getattr(backbone, "min_input_size", 32)))
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        width = backbone.features(torch.zeros(2, spec.in_channels, side, side)).shape[1]
    backbone.train(was_training)
    return int(width)


class SiteAdversaryObjective(Objective):
    """The classifier's own objective on ``output`` plus the adversary's cross-entropy on ``site``.

    Validation adds ``site/accuracy`` (how well the adversary still tells the sources apart within a class)
    and ``site/chance`` (the accuracy of always naming each class's most common source) to the classifier's
    figures: the adversary works while the first stays near the second.
    """

    kind = "adversarial"

    def __init__(self, classifier: Objective, sources: Sequence[str], *, class_conditional: bool = True) -> None:
        super().__init__(classifier.task)
        self.classifier = classifier
        self.index = {name: i for i, name in enumerate(sources)}
        self.count = len(self.index)
        self.class_conditional = class_conditional

    def site_targets(self, batch: Mapping[str, Any]) -> Tensor:
        """Each image's source index (-1 for a source the head was not built for: left out of its loss)."""
        return torch.tensor([self.index.get(str(name), -1) for name in batch["source"]], dtype=torch.int64)

    def site_logits(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """The block of source logits of each image's true class ``(N, sources)``."""
        blocks = logits.float().view(len(logits), -1, self.count)
        if not self.class_conditional:
            return blocks[:, 0]
        return blocks[torch.arange(len(logits)), batch["label"].long()]

    def loss(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        loss = self.classifier.loss(outputs["output"], batch) + self.site_loss(outputs["site"], batch)
        if "confusion" in outputs:  # the encoder's term: the (frozen) head's answer towards uniform
            loss = loss + self.site_loss(outputs["confusion"], batch, uniform=True)
        return loss

    def site_loss(self, logits: Tensor, batch: Mapping[str, Any], *, uniform: bool = False) -> Tensor:
        """Cross-entropy of the source within each image's class (against the uniform answer when
        ``uniform``), every (class, source) cell of the batch weighted alike: a head that only names each
        class's most common source earns nothing, so it must find what tells the sources apart, and the
        encoder learns to hide exactly that."""
        targets = self.site_targets(batch).to(logits.device)
        known = targets >= 0
        if not known.any():
            return logits.sum() * 0.0
        chosen = self.site_logits(logits, batch)[known]
        losses = (-nn.functional.log_softmax(chosen, dim=1).mean(dim=1) if uniform
                  else nn.functional.cross_entropy(chosen, targets[known], reduction="none"))
        classes = batch["label"].to(logits.device)[known] if self.class_conditional else torch.zeros_like(targets[known])
        cells = classes * self.count + targets[known]
        _, inverse, counts = torch.unique(cells, return_inverse=True, return_counts=True)
        weights = 1.0 / counts[inverse].float()
        return (losses * weights).sum() / weights.sum()

    def validation_loss(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        return self.classifier.validation_loss(outputs["output"], batch)

    def activate(self, outputs: Any) -> Tensor:  # noqa: ANN401
        return self.classifier.activate(outputs["output"] if isinstance(outputs, Mapping) else outputs)

    def keep(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        kept = self.classifier.keep(outputs["output"], batch)
        kept["site_true"] = self.site_targets(batch).numpy()
        kept["site_predicted"] = self.site_logits(outputs["site"], batch).argmax(1).cpu().numpy()
        kept["site_class"] = batch["label"].cpu().numpy() if self.class_conditional else np.zeros(len(kept["row"]))
        return kept

    def figures(self, kept: Mapping[str, np.ndarray]) -> dict[str, float]:
        figures = self.classifier.figures({k: v for k, v in kept.items() if not k.startswith("site_")})
        known = kept["site_true"] >= 0
        truth, predicted, classes = kept["site_true"][known], kept["site_predicted"][known], kept["site_class"][known]
        figures["site/accuracy"] = float(np.mean(truth == predicted)) if known.any() else float("nan")
        majority = sum(np.bincount(truth[classes == c]).max() for c in np.unique(classes))
        figures["site/chance"] = float(majority / len(truth)) if known.any() else float("nan")
        return figures
