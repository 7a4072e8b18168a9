"""SqueezeNet 1.0 / 1.1, vanilla and with simple bypass, and the light CT CNN of paper 002 (Polsinelli et al.).

SqueezeNet (Iandola et al. 2016) is built from torchvision's ``Fire`` module with torchvision's layer
layout, so torchvision's ImageNet weights load one to one. Differences from torchvision, for the zoo's
contract: the head is global average pooling then ``Dropout -> Linear`` (the same function as
torchvision's ``Dropout -> 1x1 conv -> ReLU -> average pool`` minus the final ReLU, which would clip the
logits at zero), so ``features()`` is the pooled 512-d fire-9 output and CAM reads the linear weights.

Simple bypass (paper 002, Sec. 2.3): identity shortcuts around fire modules 3, 5, 7 and 9, the ones whose
input and output widths match.

The light CT CNN (paper 002, Fig. 3), ``squeezenet_ct``: SqueezeNet 1.1 without bypass (the paper works in
Matlab, whose SqueezeNet is version 1.1, input 227x227) whose fire modules insert batch norm between the
squeeze convolution and its activation, and ELU replaces every ReLU. A transposed convolution expands the
last fire module's maps 4x in width and height; they are concatenated with fire module 2's maps, mixed by a
1x1 convolution with 128 filters and averaged by global average pooling, then a linear layer classifies.

Parameter count of the light CT CNN. The paper reports 1.26 M but not the transposed convolution's size. We
choose 64 filters of 4x4 with stride 4 (the smallest kernel that expands exactly 4x without overlap;
524,352 parameters, of which the 512 x 64 x 4 x 4 weights dominate): the total is 1.272 M for 3-channel
input and 2 classes (1.271 M with one channel), 1 % above the paper. The rest is fixed by the text:
SqueezeNet 1.1's fire modules (0.72 M), their batch norms (640), the 1x1 mix convolution (24,704), the
classifier. The paper's figure would be matched exactly by about 62.8 filters, so the difference is the
one width the paper leaves out (Matlab's default 8x8 kernel with 16 filters has the same count). At sizes
where 4 x (fire-9 side) differs from fire-2's side (e.g. 52 vs 55 at 224 px; at the paper's 227 px both
are 56), the expanded maps are resized bilinearly to fire-2's grid before the concatenation.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.squeezenet import Fire as TorchvisionFire

from lungscreen.models.layers import ZooClassifier
from lungscreen.models.registry import register_model

Version = Literal["1_0", "1_1"]
# torchvision's layouts: ("conv", out, kernel), ("pool",), ("fire", in, squeeze, expand1x1, expand3x3)
_LAYOUTS: dict[str, list[tuple]] = {
    "1_0": [("conv", 96, 7), ("pool",), ("fire", 96, 16, 64, 64), ("fire", 128, 16, 64, 64),
            ("fire", 128, 32, 128, 128), ("pool",), ("fire", 256, 32, 128, 128), ("fire", 256, 48, 192, 192),
            ("fire", 384, 48, 192, 192), ("fire", 384, 64, 256, 256), ("pool",), ("fire", 512, 64, 256, 256)],
    "1_1": [("conv", 64, 3), ("pool",), ("fire", 64, 16, 64, 64), ("fire", 128, 16, 64, 64), ("pool",),
            ("fire", 128, 32, 128, 128), ("fire", 256, 32, 128, 128), ("pool",), ("fire", 256, 48, 192, 192),
            ("fire", 384, 48, 192, 192), ("fire", 384, 64, 256, 256), ("fire", 512, 64, 256, 256)],
}
_BYPASSED_FIRES = (3, 5, 7, 9)  # fire modules are numbered 2..9 as in the SqueezeNet paper
# smallest input side giving a non-empty fire-9 map (checked by the tests)
_MIN_INPUT = {"1_0": 21, "1_1": 17}


class Fire(TorchvisionFire):
    """torchvision's fire module, optionally with batch norm after the squeeze, ELU, and a simple bypass.

    ``normalize`` and ``elu`` give paper 002's custom fire module (Fig. 2b); ``bypass`` adds the input to
    the output (needs equal widths). Parameter names stay torchvision's, so ImageNet weights still load.
    """

    def __init__(
        self,
        inplanes: int,
        squeeze_planes: int,
        expand1x1_planes: int,
        expand3x3_planes: int,
        *,
        normalize: bool = False,
        elu: bool = False,
        bypass: bool = False,
    ) -> None:
        super().__init__(inplanes, squeeze_planes, expand1x1_planes, expand3x3_planes)
        if bypass and inplanes != expand1x1_planes + expand3x3_planes:
            raise ValueError("a simple bypass needs equal input and output widths")
        activation = nn.ELU if elu else nn.ReLU
        squeeze_activation = activation(inplace=True)
        self.squeeze_activation = (
            nn.Sequential(nn.BatchNorm2d(squeeze_planes), squeeze_activation) if normalize else squeeze_activation
        )
        self.expand1x1_activation = activation(inplace=True)
        self.expand3x3_activation = activation(inplace=True)
        self.bypass = bypass

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out + x if self.bypass else out


def _init_convolutions(module: nn.Module) -> None:
    """torchvision's SqueezeNet initialisation (He uniform, zero bias), so training from scratch matches it."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def _body(version: str, in_channels: int, *, bypass: bool, normalize: bool, elu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    fire_number = 1
    for kind, *sizes in _LAYOUTS[version]:
        if kind == "conv":
            out, kernel = sizes
            layers += [nn.Conv2d(in_channels, out, kernel_size=kernel, stride=2),
                       nn.ELU(inplace=True) if elu else nn.ReLU(inplace=True)]
        elif kind == "pool":
            layers.append(nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
        else:
            fire_number += 1
            layers.append(Fire(*sizes, normalize=normalize, elu=elu, bypass=bypass and fire_number in _BYPASSED_FIRES))
    return nn.Sequential(*layers)


class SqueezeNet(ZooClassifier):
    """SqueezeNet with the zoo's head (global average pool, dropout, linear).

    Args:
        num_classes: outputs.
        in_channels: input channels.
        version: ``"1_0"`` or ``"1_1"``.
        bypass: simple bypass around fire modules 3, 5, 7, 9.
        fire: ``"classic"`` (ReLU) or ``"bn_elu"`` (paper 002's custom fire module, ELU throughout).
        dropout: before the linear classifier (0.5 as in SqueezeNet).
    """

    def __init__(
        self,
        num_classes: int = 3,
        in_channels: int = 1,
        *,
        version: Version = "1_1",
        bypass: bool = False,
        fire: Literal["classic", "bn_elu"] = "classic",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if version not in _LAYOUTS:
            raise ValueError(f"version must be '1_0' or '1_1', got {version!r}")
        if fire not in ("classic", "bn_elu"):
            raise ValueError(f"fire must be 'classic' or 'bn_elu', got {fire!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        custom = fire == "bn_elu"
        self.body = _body(version, in_channels, bypass=bypass, normalize=custom, elu=custom)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(512, num_classes))
        self.min_input_size = _MIN_INPUT[version]
        _init_convolutions(self.body)

    def spatial_features(self, x: Tensor) -> Tensor:
        """The last spatial feature map (the output of :attr:`cam_layer`)."""
        return self.body(x)

    def features(self, x: Tensor) -> Tensor:
        return self.pool(self.spatial_features(x))

    @property
    def cam_layer(self) -> nn.Module:
        return self.body[-1]

    def layer_groups(self) -> list[nn.Module]:
        """Stem, then the body cut after each max-pool (fire modules sharing a resolution), then the head."""
        groups, current = [], []
        for layer in self.body:
            current.append(layer)
            if isinstance(layer, nn.MaxPool2d):
                groups.append(nn.Sequential(*current))
                current = []
        return [*groups, nn.Sequential(*current), self.classifier]

    @staticmethod
    def imagenet_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's keys -> ours: ``features.`` becomes ``body.``, the ImageNet classifier is dropped."""
        return {"body." + key[len("features."):]: value for key, value in state.items() if key.startswith("features.")}


class LightCTNet(SqueezeNet):
    """Paper 002's light CT CNN: SqueezeNet 1.1 with custom fire modules and a fire-2 skip (module docstring).

    Args:
        num_classes: outputs (2 in the paper: COVID-19 or not).
        in_channels: input channels.
        up_channels: filters of the transposed convolution (not given by the paper; see module docstring).
        mix_channels: filters of the 1x1 convolution after the concatenation (128 in the paper).
        dropout: before the linear classifier (the paper names none).
    """

    SKIP_FIRE_INDEX = 3  # body[3] is fire module 2 in SqueezeNet 1.1's layout

    def __init__(
        self,
        num_classes: int = 2,
        in_channels: int = 1,
        *,
        up_channels: int = 64,
        mix_channels: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(num_classes, in_channels, version="1_1", fire="bn_elu", dropout=dropout)
        if up_channels < 1 or mix_channels < 1:
            raise ValueError(f"up_channels and mix_channels must be >= 1, got {up_channels} and {mix_channels}")
        skip_channels = self.body[self.SKIP_FIRE_INDEX].expand1x1.out_channels * 2
        self.upsample = nn.ConvTranspose2d(512, up_channels, kernel_size=4, stride=4)
        self.mix = nn.Sequential(nn.Conv2d(up_channels + skip_channels, mix_channels, kernel_size=1), nn.ELU())
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(mix_channels, num_classes))
        _init_convolutions(self.mix)

    def spatial_features(self, x: Tensor) -> Tensor:
        skip = x
        for index, layer in enumerate(self.body):
            x = layer(x)
            if index == self.SKIP_FIRE_INDEX:
                skip = x
        expanded = self.upsample(x)
        if expanded.shape[-2:] != skip.shape[-2:]:
            expanded = F.interpolate(expanded, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.mix(torch.cat([expanded, skip], dim=1))

    @property
    def cam_layer(self) -> nn.Module:
        return self.mix

    def layer_groups(self) -> list[nn.Module]:
        *body_groups, classifier = super().layer_groups()
        return [*body_groups, nn.Sequential(self.upsample, self.mix), classifier]


def _register_squeezenet(version: str, bypass: bool) -> None:
    suffix = "_bypass" if bypass else ""
    dotted = version.replace("_", ".")
    defaults = {"fire": "classic", "dropout": 0.5}

    @register_model(f"squeezenet{version}{suffix}", paper="002 Polsinelli (SqueezeNet)", input_size=227,
                    min_input_size=_MIN_INPUT[version], defaults=defaults,
                    imagenet=f"SqueezeNet{version}_Weights.IMAGENET1K_V1",
                    description=f"SqueezeNet {dotted}" + (" with simple bypass" if bypass else " (no bypass)"))
    def build(*, num_classes: int, in_channels: int, **kwargs: object) -> SqueezeNet:
        return SqueezeNet(num_classes, in_channels, version=version, bypass=bypass, **{**defaults, **kwargs})


for _version in _LAYOUTS:
    for _bypass in (False, True):
        _register_squeezenet(_version, _bypass)


@register_model("squeezenet_ct", paper="002 Polsinelli", input_size=227, min_input_size=_MIN_INPUT["1_1"],
                description="light CT CNN: BN+ELU fire modules, 4x transposed conv + fire-2 skip, 1x1x128, GAP",
                defaults={"up_channels": 64, "mix_channels": 128, "dropout": 0.0},
                imagenet="SqueezeNet1_1_Weights.IMAGENET1K_V1")
def squeezenet_ct(*, num_classes: int, in_channels: int, **kwargs: object) -> LightCTNet:
    return LightCTNet(num_classes, in_channels, **kwargs)
