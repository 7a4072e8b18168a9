"""COVID-Net (paper 004, Wang, Lin and Wong 2020) and its narrower CPU variants.

What the paper fixes (Fig. 2, Sec. 2.1.3, Table 1): PEPX blocks (1x1 first-stage projection, 1x1
expansion, 3x3 depthwise, 1x1 second-stage projection, 1x1 extension); a 7x7 stride-2 stem to 112x112x64;
four stages ending at 56x56x256 (3 PEPX), 28x28x512 (4), 14x14x1024 (6) and 7x7x2048 (3), each with a 1x1
side branch and long-range connections between its blocks; flatten, FC-1024, FC-1024, softmax;
117.4 M parameters and 2.26 G MACs at 224x224.

Assumptions (the paper and its public code never give them; chosen here, documented, tested):

- **PEPX widths.** For a block with ``C`` output channels: first-stage projection to ``C/5``, expansion
  to ``2C/5`` (twice the projection, still narrower than the output), depthwise at ``2C/5``, second-stage
  projection back to ``C/5``, extension to ``C``; the same ratios in every stage (integer division). This
  gives 117.39 M parameters at 224x224 with 3 input channels and 3 classes (paper: 117.4 M; 117.38 M with
  one input channel), of which 102.76 M are the first FC layer (7x7x2048 = 100,352 -> 1,024), and 2.34 G
  MACs (paper: 2.26 G, +3.5 %; 2.26 G with one input channel, lungscreen's default). Ratios 1/4 and 1/2
  would give 121.1 M and 2.96 G; 1/6 and 1/3 give 115.2 M and 1.97 G: the parameter count barely
  constrains the blocks (the FC layer dominates it), the MACs pin them down.
- **Normalisation and activation.** Every convolution is followed by batch norm; ReLU follows the
  projections, expansion and depthwise convolution, while the extension and the side branch stay linear
  because their outputs are summed (as in a residual block); ReLU is applied to each stage's output.
- **Connectivity.** In each stage the side branch (1x1 conv of the stage input) and every PEPX output are
  summed; each PEPX block reads the stage input (first block) or the running sum of the side branch and all
  earlier blocks of its stage (dense long-range connections, the pattern of the paper's figure). Stage
  ``k`` starts with a 2x2 max-pool (112 -> 56 -> 28 -> 14 -> 7).
- **Head.** The flatten is preceded by an adaptive average pool to 7x7 (an identity at 224x224) so any
  input size works; FC layers use ReLU. ``features()`` returns the second FC-1024 output, the embedding the
  paper's classifier reads; ``classifier`` is the last linear layer. (ONNX's TorchScript exporter turns the
  adaptive pool into a fixed one: export the flatten variant at a side that is a multiple of 224.)

Variants: ``width`` multiplies every channel count and ``pooling="avg"`` replaces the 100,352-wide flatten
by global average pooling; ``covidnet_small`` (width 0.5, FC-512: 4.2 M parameters, 0.55 G MACs at 224 px)
and ``covidnet_tiny`` (width 0.25, FC-256: 1.07 M, 0.14 G) use both and train on two CPU cores.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from lungscreen.models.layers import ZooClassifier
from lungscreen.models.registry import register_model

STAGE_CHANNELS = (256, 512, 1024, 2048)
STAGE_BLOCKS = (3, 4, 6, 3)
STEM_CHANNELS = 64
PROJECTION_DIVISOR = 5  # first- and second-stage projection: out // 5 (an assumption, see above)
EXPANSION_FACTOR = 2  # expansion and depthwise: twice the projection


def _scaled(channels: int, width: float) -> int:
    """Channels times ``width``, rounded to a multiple of 8 (at least 8)."""
    return max(8, round(channels * width / 8) * 8)


class PEPX(nn.Module):
    """Projection-expansion-projection-extension: 1x1 -> 1x1 -> 3x3 depthwise -> 1x1 -> 1x1 (linear)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        projected = max(1, out_channels // PROJECTION_DIVISOR)
        expanded = projected * EXPANSION_FACTOR
        self.layers = nn.Sequential(
            Conv2dNormActivation(in_channels, projected, kernel_size=1),  # first-stage projection
            Conv2dNormActivation(projected, expanded, kernel_size=1),  # expansion
            Conv2dNormActivation(expanded, expanded, kernel_size=3, groups=expanded),  # depthwise
            Conv2dNormActivation(expanded, projected, kernel_size=1),  # second-stage projection
            Conv2dNormActivation(projected, out_channels, kernel_size=1, activation_layer=None),  # extension
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Stage(nn.Module):
    """Max-pool, then a 1x1 side branch and densely connected PEPX blocks, all summed."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.side = Conv2dNormActivation(in_channels, out_channels, kernel_size=1, activation_layer=None)
        self.blocks = nn.ModuleList(
            PEPX(in_channels if index == 0 else out_channels, out_channels) for index in range(blocks)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)
        total = self.side(x)
        for index, block in enumerate(self.blocks):
            total = total + block(x if index == 0 else total)
        return torch.relu(total)


class COVIDNet(ZooClassifier):
    """COVID-Net: stem, four PEPX stages, flatten (or global pool), two FC layers, linear classifier.

    Args:
        num_classes: outputs (3 in the paper: normal, non-COVID pneumonia, COVID-19).
        in_channels: 1 or 3.
        width: multiplier of every convolution's channels (1.0 = the paper's stage shapes).
        pooling: ``"flatten"`` (the paper: adaptive-pool to 7x7, then flatten) or ``"avg"`` (global average).
        fc_width: width of the two hidden FC layers (1024 in the paper).
        dropout: dropout before each FC layer (0 in the paper).
    """

    min_input_size = 32

    def __init__(
        self,
        num_classes: int = 3,
        in_channels: int = 1,
        *,
        width: float = 1.0,
        pooling: Literal["flatten", "avg"] = "flatten",
        fc_width: int = 1024,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        if pooling not in ("flatten", "avg"):
            raise ValueError(f"pooling must be 'flatten' or 'avg', got {pooling!r}")
        if fc_width < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"fc_width must be >= 1 and dropout in [0, 1), got {fc_width} and {dropout}")
        stem = _scaled(STEM_CHANNELS, width)
        channels = [_scaled(c, width) for c in STAGE_CHANNELS]
        self.stem = Conv2dNormActivation(in_channels, stem, kernel_size=7, stride=2, padding=3)
        self.stages = nn.Sequential(
            *(Stage(c_in, c_out, blocks) for c_in, c_out, blocks in zip([stem, *channels], channels, STAGE_BLOCKS))
        )
        grid = 7 if pooling == "flatten" else 1
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels[-1] * grid * grid, fc_width),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_width, fc_width),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(fc_width, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))

    @property
    def cam_layer(self) -> nn.Module:
        return self.stages[-1]

    def layer_groups(self) -> list[nn.Module]:
        return [self.stem, *self.stages, self.fc, self.classifier]


_OPTIONS = {"width": 1.0, "pooling": "flatten", "fc_width": 1024, "dropout": 0.0}


def _factory(name: str, description: str, input_size: int, **defaults: object):
    options = {**_OPTIONS, **defaults}

    @register_model(name, paper="004 COVID-Net", input_size=input_size, min_input_size=COVIDNet.min_input_size,
                    description=description, defaults=options)
    def build(*, num_classes: int, in_channels: int, **kwargs: object) -> COVIDNet:
        return COVIDNet(num_classes, in_channels, **{**options, **kwargs})

    return build


covidnet = _factory("covidnet", "COVID-Net as published: PEPX stages, flatten, FC-1024 x2 (117 M parameters)", 224)
covidnet_small = _factory("covidnet_small", "COVID-Net at half width with global pooling (CPU training)", 224,
                          width=0.5, pooling="avg", fc_width=512)
covidnet_tiny = _factory("covidnet_tiny", "COVID-Net at quarter width with global pooling (tests, demo)", 224,
                         width=0.25, pooling="avg", fc_width=256)
