"""Pieces shared by the zoo's networks: the classifier base class and the fastai-style concat pool."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ZooClassifier(nn.Module):
    """Base of the zoo's image classifiers: ``forward(x) == classifier(features(x))``.

    Subclasses build ``self.classifier`` and implement :meth:`features`, :attr:`cam_layer` and
    :meth:`layer_groups`; they set ``min_input_size``. Keeping the embedding and the head apart is what lets
    the bias audit read embeddings, CAM weight feature maps by the head, and transfer swap only the head.
    """

    min_input_size: int = 32
    classifier: nn.Module

    def features(self, x: Tensor) -> Tensor:
        """Pooled embedding ``(N, D)``: everything but the head."""
        raise NotImplementedError

    @property
    def cam_layer(self) -> nn.Module:
        """The module whose output is the last spatial feature map (what Grad-CAM and CAM hook)."""
        raise NotImplementedError

    def layer_groups(self) -> list[nn.Module]:
        """Parameter groups from the input side to the head, for discriminative learning rates and freezing."""
        raise NotImplementedError

    def encoder_stages(self) -> list[nn.Module]:
        """The body as stages run one after the other, input side first, each ending at a coarser
        resolution: the multi-scale feature maps dense heads (boxes, masks) read. Models without them cannot
        be an encoder for :mod:`~lungscreen.models.multichexnet`."""
        raise NotImplementedError(f"{type(self).__name__} has no encoder stages")

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` of images ``(N, in_channels, H, W)``."""
        return self.classifier(self.features(x))


class HeadOf(nn.Module):
    """One head's output of a multi-head model as a plain module: what Grad-CAM hooks (a tensor out, the
    model's ``cam_layer``) and what a single-output export takes.

    Example:
        >>> findings = HeadOf(model, "findings")          # doctest: +SKIP
        >>> findings(images).shape                         # doctest: +SKIP
        torch.Size([4, 2])
    """

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        self.model, self.head = model, head

    @property
    def cam_layer(self) -> nn.Module:
        return self.model.cam_layer

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)[self.head]


class WithEmbedding(nn.Module):
    """A classifier that also returns its pooled embedding: ``{head: logits, "features": embedding}``, what an
    export carries so the out-of-distribution gate can run without PyTorch."""

    def __init__(self, model: nn.Module, head: str = "output") -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.model.features(x)
        return {self.head: self.model.classifier(features), "features": features}


class AdaptiveConcatPool2d(nn.Module):
    """Global max and average pooling side by side (fastai's ``AdaptiveConcatPool2d``): ``(N, C, H, W) -> (N, 2C)``.

    Keeping both summaries lets the head see the strongest local finding and the overall picture. The order
    is fastai's, ``[max, avg]``, so heads trained with fastai map one to one.
    """

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([torch.amax(x, dim=(2, 3)), torch.mean(x, dim=(2, 3))], dim=1)
