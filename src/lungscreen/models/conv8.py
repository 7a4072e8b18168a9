"""Conv8 (paper 000, Tartaglione et al.): eight conv3x3-BN-ReLU-maxpool blocks and one FC layer.

The paper says only "8 convolutional layers and a final fully-connected layer, inspired by ALL-CNN-C".
The authors' public code (``LeNet1024``) fixes the rest, which we follow: 3x3 convolutions without
padding or bias, channels doubling from 1 to 128 (1, 2, 4, ..., 128), each followed by batch norm, ReLU
and a 2x2 max-pool; on a 1024x1024 image the last map is 2x2x128, flattened into one linear layer. An
adaptive average pool to 2x2 before the flatten (an identity at 1024 px) lets other sizes through.

Unpadded convolutions need at least 766 px; ``padding=1`` brings the minimum down to 256 px for work at
smaller sizes, and ``base_width`` scales every layer (channels ``base_width * 2**i``).
"""

from __future__ import annotations

from torch import Tensor, nn

from lungscreen.models.layers import ZooClassifier
from lungscreen.models.registry import register_model

BLOCKS = 8
GRID = 2  # the last feature map of the paper's 1024-px input is 2x2


def smallest_input(padding: int, blocks: int = BLOCKS) -> int:
    """Smallest side for which every block keeps at least one pixel (conv 3x3, then max-pool 2)."""
    side = 1
    for _ in range(blocks):
        side = 2 * side + 2 - 2 * padding  # undo the pool (floor), then the convolution
    return max(side, 1)


class Conv8(ZooClassifier):
    """Eight conv3x3-BN-ReLU-maxpool blocks, adaptive pool to 2x2, flatten, linear.

    Args:
        num_classes: outputs.
        in_channels: input channels.
        base_width: channels of the first block; block ``i`` has ``base_width * 2**i``.
        padding: 0 as in the authors' code, or 1 to accept smaller images.
    """

    def __init__(self, num_classes: int = 3, in_channels: int = 1, *, base_width: int = 1, padding: int = 0) -> None:
        super().__init__()
        if base_width < 1 or padding not in (0, 1):
            raise ValueError(f"base_width must be >= 1 and padding 0 or 1, got {base_width} and {padding}")
        widths = [base_width * 2**index for index in range(BLOCKS)]
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, kernel_size=3, padding=padding, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
                for c_in, c_out in zip([in_channels, *widths], widths)
            )
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(GRID), nn.Flatten())
        self.classifier = nn.Linear(widths[-1] * GRID * GRID, num_classes)
        self.min_input_size = smallest_input(padding)

    def features(self, x: Tensor) -> Tensor:
        return self.pool(self.blocks(x))

    @property
    def cam_layer(self) -> nn.Module:
        return self.blocks[-1]

    def layer_groups(self) -> list[nn.Module]:
        return [*self.blocks, self.classifier]


@register_model("conv8", paper="000 Tartaglione", input_size=1024, min_input_size=smallest_input(0),
                description="Conv8: 8 x (conv3x3-BN-ReLU-maxpool), channels 1..128, FC",
                defaults={"base_width": 1, "padding": 0})
def conv8(*, num_classes: int, in_channels: int, **kwargs: int) -> Conv8:
    return Conv8(num_classes, in_channels, **kwargs)
