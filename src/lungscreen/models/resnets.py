"""ResNets of papers 000 (Tartaglione et al.) and 003 (COVID-ResNet), on torchvision's ResNet body.

- ``resnet18`` / ``resnet50`` (paper 000): 1-channel first convolution by default, global average pool,
  head ``Linear(512, 256) -> ReLU -> Linear(256, classes)`` for ResNet-18. The paper gives no head; the
  authors' public code uses that one for ResNet-18 and ``2048 -> 512 -> classes`` for ResNet-50, which we
  follow (``hidden`` changes it). Their code also keeps only the red filters of the ImageNet first conv; we
  sum the three (:mod:`lungscreen.models.weights`), which preserves the response to a gray image.
- ``covid_resnet`` (paper 003): ResNet-50 with fastai's (v1, 2020) transfer head: concat of adaptive max
  and average pooling (4096), ``BN -> Dropout(0.25) -> Linear(4096, 512) -> ReLU -> BN -> Dropout(0.5) ->
  Linear(512, classes)``. Its ``layer_groups()`` are fastai's three groups for ResNets (stem to layer2,
  layer3 to layer4, head), the split behind the paper's discriminative learning rates 1e-6 .. 1e-4.
  The paper trains at 128, 224 and 229 px (its text also says 299 once); 229 is its final size.

``width`` (an option of every variant) sets the first stage's channels, each later stage doubling them, as
in the ResNet paper's 64 (the default, the only width ImageNet weights fit). Narrower bodies are for CPUs:
ResNet-18 at width 32 has a quarter of the MACs per image, so the same minutes train at a higher
resolution or for more epochs.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torchvision
from torch import Tensor, nn

from lungscreen.models.layers import AdaptiveConcatPool2d, ZooClassifier
from lungscreen.models.registry import register_model

_BODIES = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}
_BODY_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_STAGES = ("layer1", "layer2", "layer3", "layer4")


def torchvision_resnet(depth: int, in_channels: int = 3, width: int = 64) -> torchvision.models.ResNet:
    """torchvision's ResNet of ``depth`` with ``in_channels`` inputs and stage widths ``width * (1, 2, 4, 8)``.

    Other widths than 64 rebuild the stem and the four stages with torchvision's own blocks and
    ``_make_layer``, then initialise them as torchvision does (He normal for convolutions, unit BatchNorm).
    """
    resnet = _BODIES[depth](weights=None)
    if width != 64:
        block = type(resnet.layer1[0])
        resnet.inplanes = width
        resnet.bn1 = nn.BatchNorm2d(width)
        for index, name in enumerate(_STAGES):
            blocks = len(getattr(resnet, name))
            setattr(resnet, name, resnet._make_layer(block, width * 2**index, blocks, stride=1 if index == 0 else 2))
        resnet.fc = nn.Linear(8 * width * block.expansion, resnet.fc.out_features)
        for module in resnet.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
    if in_channels != 3 or width != 64:
        resnet.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(resnet.conv1.weight, mode="fan_out", nonlinearity="relu")
    return resnet


class ResNet(ZooClassifier):
    """A torchvision ResNet body with the head of paper 000 (``"mlp"``) or of paper 003 (``"fastai"``).

    Args:
        num_classes: outputs.
        in_channels: input channels of the first convolution.
        depth: 18 or 50.
        head: ``"mlp"`` (avg pool, Linear-ReLU-Linear) or ``"fastai"`` (concat pool, BN-dropout-linear x2).
        hidden: width of the head's hidden layer.
        dropout: the fastai head's last dropout (the first is half of it, as in fastai); unused by "mlp".
        width: channels of the first stage (each later stage doubles them); 64 as in torchvision.

    Example:
        >>> model = ResNet(num_classes=3, width=32)
        >>> model.features(torch.zeros(2, 1, 128, 128)).shape
        torch.Size([2, 256])
    """

    min_input_size = 32

    def __init__(
        self,
        num_classes: int = 3,
        in_channels: int = 1,
        *,
        depth: Literal[18, 50] = 18,
        head: Literal["mlp", "fastai"] = "mlp",
        hidden: int = 256,
        dropout: float = 0.5,
        width: int = 64,
    ) -> None:
        super().__init__()
        if depth not in _BODIES:
            raise ValueError(f"depth must be one of {sorted(_BODIES)}, got {depth}")
        if head not in ("mlp", "fastai"):
            raise ValueError(f"head must be 'mlp' or 'fastai', got {head!r}")
        if hidden < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"hidden must be >= 1 and dropout in [0, 1), got {hidden} and {dropout}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        resnet = torchvision_resnet(depth, in_channels, width)
        self.body = nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in _BODY_LAYERS))
        self.head_type = head
        channels = resnet.fc.in_features
        if head == "mlp":
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.classifier = nn.Sequential(
                nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
            )
        else:
            self.pool = AdaptiveConcatPool2d()
            self.classifier = nn.Sequential(
                nn.BatchNorm1d(2 * channels),
                nn.Dropout(dropout / 2),
                nn.Linear(2 * channels, hidden),
                nn.ReLU(inplace=True),
                nn.BatchNorm1d(hidden),
                nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            )

    def features(self, x: Tensor) -> Tensor:
        return self.pool(self.body(x))

    @property
    def cam_layer(self) -> nn.Module:
        return self.body.layer4

    def layer_groups(self) -> list[nn.Module]:
        if self.head_type == "fastai":
            return [self.body[:6], self.body[6:], self.classifier]
        return [self.body[:4], *self.body[4:], self.classifier]

    def encoder_stages(self) -> list[nn.Module]:
        return [self.body[:4], *self.body[4:]]  # strides 4, 4, 8, 16, 32

    @staticmethod
    def imagenet_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's ResNet keys -> ours: the body moves under ``body.``, the ImageNet head is dropped."""
        return {f"body.{key}": value for key, value in state.items() if not key.startswith("fc.")}


def _register(name: str, *, paper: str, input_size: int, description: str, depth: int, head: str,
              defaults: dict[str, object]):
    """Register a ResNet variant: ``depth`` and ``head`` fix the architecture, ``defaults`` are options."""

    @register_model(name, paper=paper, input_size=input_size, min_input_size=ResNet.min_input_size,
                    description=description, defaults=defaults, imagenet=f"ResNet{depth}_Weights.IMAGENET1K_V1")
    def build(*, num_classes: int, in_channels: int, **kwargs: object) -> ResNet:
        return ResNet(num_classes, in_channels, depth=depth, head=head, **{**defaults, **kwargs})

    return build


resnet18 = _register("resnet18", paper="000 Tartaglione", input_size=224, depth=18, head="mlp",
                     defaults={"hidden": 256, "width": 64}, description="ResNet-18, 1-channel stem, head 512-256-classes")
resnet50 = _register("resnet50", paper="000 Tartaglione", input_size=224, depth=50, head="mlp",
                     defaults={"hidden": 512, "width": 64}, description="ResNet-50, 1-channel stem, head 2048-512-classes")
covid_resnet = _register("covid_resnet", paper="003 COVID-ResNet", input_size=229, depth=50, head="fastai",
                         defaults={"hidden": 512, "dropout": 0.5, "width": 64},
                         description="ResNet-50 + fastai head (concat pool, BN, dropout, 4096-512-classes)")
