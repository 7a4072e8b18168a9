"""The lung U-Net (paper 000 segments the lungs with a U-Net before classifying), built on MONAI's UNet.

Registered as ``lung_unet`` (task ``segmentation``): ``forward(x) -> (N, num_classes, H, W)`` logits, one
output channel per lung-mask convention (see :mod:`lungscreen.lungs` for why). Input sides must be
multiples of ``2 ** (len(channels) - 1)`` (16 by default); the segmenter always feeds 256 x 256.

Example:
    >>> model = create("lung_unet", num_classes=2, in_channels=1)          # doctest: +SKIP
    >>> model(torch.zeros(1, 1, 256, 256)).shape                           # doctest: +SKIP
    torch.Size([1, 2, 256, 256])
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lungscreen.models.registry import register_model

#: The default architecture: 4 down-samplings, 16 -> 256 channels, plain (non-residual) blocks: a third of
#: the MACs of MONAI's 2-residual-unit default, which is what keeps segmentation above 20 images/s on 2 cores.
DEFAULTS = {"channels": (16, 32, 64, 128, 256), "num_res_units": 0, "norm": "batch", "dropout": 0.0}


class LungUNet(nn.Module):
    """MONAI's 2-D residual U-Net with the attributes the registry expects of a segmentation model.

    Args:
        num_classes: output channels (logits; the loss applies the sigmoid).
        in_channels: image channels (1 for radiographs).
        channels: feature channels per level; each level after the first halves the resolution.
        num_res_units: residual units per block (0 = plain convolutions, faster, a little less accurate).
        norm: MONAI norm name; ``"batch"`` folds into the convolutions at inference, ``"instance"`` is
            MONAI's default.
        dropout: dropout probability inside the blocks.
    """

    def __init__(self, num_classes: int = 2, in_channels: int = 1, channels: Sequence[int] = DEFAULTS["channels"],
                 num_res_units: int = 0, norm: str = "batch", dropout: float = 0.0) -> None:
        super().__init__()
        from monai.networks.nets import UNet

        channels = tuple(int(c) for c in channels)
        if len(channels) < 2 or any(c < 1 for c in channels):
            raise ValueError(f"channels must list at least two positive widths, got {channels}")
        if num_res_units < 0:
            raise ValueError(f"num_res_units must be >= 0, got {num_res_units}")
        self.net = UNet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes, channels=channels,
                        strides=(2,) * (len(channels) - 1), num_res_units=num_res_units, norm=norm, dropout=dropout)
        self.min_input_size = 2 ** (len(channels) - 1)

    def forward(self, x: Tensor) -> Tensor:
        size = self.min_input_size
        if x.shape[-1] % size or x.shape[-2] % size:
            raise ValueError(f"lung_unet needs sides that are multiples of {size}, got {tuple(x.shape[-2:])}")
        return self.net(x)


@register_model("lung_unet", paper="000 (lung segmentation)", input_size=256, min_input_size=16, task="segmentation",
                description="MONAI residual U-Net for lung masks, one output per mask convention",
                defaults=DEFAULTS)
def lung_unet(*, num_classes: int, in_channels: int, **kwargs) -> LungUNet:
    return LungUNet(num_classes, in_channels, **kwargs)
