"""DenseNet-121 with a multi-label head: CheXNet (Rajpurkar et al. 2017), MultiCheXNet's encoder (paper 001).

torchvision's DenseNet-121 body, then ReLU, global average pooling (1024-d ``features()``) and one linear
layer giving one logit per finding. The task is ``"multilabel"``: findings are independent, so the
trainer uses a sigmoid per output (binary cross-entropy with logits) rather than a softmax; the model
returns logits and leaves the sigmoid to the loss and the predictor. CheXNet reads 224x224 images with 14
findings; MultiCheXNet's encoder reads 256x256.
"""

from __future__ import annotations

import re

import torchvision
from torch import Tensor, nn

from lungscreen.models.layers import ZooClassifier
from lungscreen.models.registry import register_model

# torchvision's ImageNet file predates its module names: "norm.1.weight" is now "norm1.weight"
_OLD_DENSE_LAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


class DenseNet121(ZooClassifier):
    """DenseNet-121 body, ReLU, global average pool, linear multi-label head.

    Args:
        num_classes: findings (14 for ChestX-ray14).
        in_channels: input channels.
        drop_rate: dropout after each dense layer (torchvision's option; 0 in CheXNet).
        memory_efficient: recompute dense-layer activations in the backward pass to save memory.
    """

    min_input_size = 32

    def __init__(self, num_classes: int = 14, in_channels: int = 1, *, drop_rate: float = 0.0,
                 memory_efficient: bool = False) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        densenet = torchvision.models.densenet121(weights=None, drop_rate=drop_rate, memory_efficient=memory_efficient)
        self.body = densenet.features
        if in_channels != 3:
            self.body.conv0 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.activation = nn.ReLU()  # a module (not in place) so that Grad-CAM can hook the pooled maps
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(densenet.classifier.in_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.pool(self.activation(self.body(x)))

    @property
    def cam_layer(self) -> nn.Module:
        return self.activation

    def layer_groups(self) -> list[nn.Module]:
        body = self.body
        return [
            body[:4],  # conv0, norm0, relu0, pool0
            nn.Sequential(body.denseblock1, body.transition1),
            nn.Sequential(body.denseblock2, body.transition2),
            nn.Sequential(body.denseblock3, body.transition3),
            nn.Sequential(body.denseblock4, body.norm5),
            self.classifier,
        ]

    def encoder_stages(self) -> list[nn.Module]:
        body = self.body  # strides 4, 8, 16, 32, 32 (each transition halves the side)
        return [body[:4], nn.Sequential(body.denseblock1, body.transition1),
                nn.Sequential(body.denseblock2, body.transition2), nn.Sequential(body.denseblock3, body.transition3),
                nn.Sequential(body.denseblock4, body.norm5, self.activation)]

    @staticmethod
    def imagenet_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's keys -> ours: old dense-layer names fixed, ``features.`` -> ``body.``, head dropped."""
        converted = {}
        for key, value in state.items():
            if not key.startswith("features."):
                continue
            key = _OLD_DENSE_LAYER_KEY.sub(r"\1\2", key)
            converted["body." + key[len("features."):]] = value
        return converted


@register_model("densenet121", paper="001 MultiCheXNet (CheXNet)", input_size=224, min_input_size=32,
                task="multilabel", defaults={"drop_rate": 0.0, "memory_efficient": False},
                imagenet="DenseNet121_Weights.IMAGENET1K_V1",
                description="DenseNet-121 (CheXNet) with a multi-label head: one sigmoid logit per finding")
def densenet121(*, num_classes: int, in_channels: int, **kwargs: object) -> DenseNet121:
    return DenseNet121(num_classes, in_channels, **kwargs)
