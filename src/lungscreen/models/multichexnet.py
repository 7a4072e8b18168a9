"""MultiCheXNet (paper 001): one encoder, three heads - findings, boxes and a mask.

The encoder is any zoo classifier's body that exposes :meth:`~lungscreen.models.layers.ZooClassifier.encoder_stages`
(DenseNet-121 as in the authors' code; a narrow ResNet-18 for CPUs). One pass through it yields the
multi-scale feature maps every head reads:

- ``findings``: global average pool and a linear layer, one sigmoid logit per finding (multi-label);
- ``boxes``: a small convolution tower on the deepest map and a one-stage anchor output
  (:mod:`~lungscreen.models.boxes`: centre and size offsets plus objectness per anchor);
- ``mask``: an upsampling decoder with a skip from every encoder stage (U-Net style), one logit per
  mask channel at the input resolution.

``num_classes`` maps head names to output counts: ``findings`` is required, ``boxes`` (box classes) and
``mask`` (mask channels) are optional, so one class serves the single-task baselines and the multi-task
model, and their weights move between them by name. :meth:`MultiCheXNet.screen` is the paper's filtered
inference: images the findings head calls negative skip the box and mask heads, which reuse the encoder
output of the same pass.

Layer groups (for a stage's ``train``): the encoder stages first, then the heads in the order findings,
boxes, mask. With all three heads and a 5-stage encoder: 0-4 encoder, 5 findings, 6 boxes, 7 mask.

Example:
    >>> model = create("multichexnet_cpu", num_classes={"findings": 2, "boxes": 1, "mask": 1})  # doctest: +SKIP
    >>> {name: tuple(out.shape) for name, out in model(torch.zeros(2, 1, 128, 128)).items()}   # doctest: +SKIP
    {'findings': (2, 2), 'boxes': (2, 15, 4, 4), 'mask': (2, 1, 128, 128)}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lungscreen.models.boxes import DEFAULT_ANCHORS, AnchorGrid, detections
from lungscreen.models.registry import create, model_info, register_model

#: Head names, as in ``num_classes``, the output dict and a multi-task recipe's ``data.task.heads``.
FINDINGS, BOXES, MASK = "findings", "boxes", "mask"


def _conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


class MaskDecoder(nn.Module):
    """Upsample from the deepest map, joining each shallower stage's map (a skip) on the way up.

    Args:
        channels: output channels of the encoder stages, input side first.
        width: channels of every decoder block.
        out_channels: mask channels (logits).
    """

    def __init__(self, channels: Sequence[int], width: int, out_channels: int) -> None:
        super().__init__()
        self.enter = _conv(channels[-1], width)
        self.blocks = nn.ModuleList(_conv(width + skip, width) for skip in reversed(channels[:-1]))
        self.out = nn.Conv2d(width, out_channels, 1)

    def forward(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        x = self.enter(features[-1])
        for block, skip in zip(self.blocks, reversed(features[:-1]), strict=True):
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.out(nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False))


class BoxHead(nn.Module):
    """Two 3x3 convolutions and the anchor outputs on the deepest feature map."""

    def __init__(self, in_channels: int, width: int, grid: AnchorGrid) -> None:
        super().__init__()
        self.grid = grid
        self.tower = nn.Sequential(_conv(in_channels, width), _conv(width, width))
        self.out = nn.Conv2d(width, grid.channels, 1)
        with torch.no_grad():  # start with few confident anchors (objectness ~0.01), as YOLO does
            per = grid.per_anchor
            self.out.bias.view(len(grid.anchors), per)[:, 4].fill_(-4.6)

    def forward(self, deepest: Tensor) -> Tensor:
        return self.out(self.tower(deepest))


class MultiCheXNet(nn.Module):
    """A shared encoder with a findings head and optional box and mask heads (module docstring).

    Args:
        num_classes: head name -> outputs: ``findings`` (required), ``boxes`` (box classes), ``mask`` (channels).
        in_channels: image channels.
        backbone: zoo classifier whose body is the encoder (it must have ``encoder_stages``).
        backbone_options: architecture options of the backbone (``{"width": 32}`` for a narrow ResNet).
        anchors: anchor (width, height) fractions of the image side for the box head.
        head_width: channels of the box tower and of the mask decoder.

    Raises:
        ValueError: no ``findings`` head, an unknown head name, or a backbone without encoder stages.
    """

    #: Heads a checkpoint may hold or lack: weights move by name between the single-task stages and the
    #: multi-task model (:func:`~lungscreen.models.weights.merge_state`).
    optional_parts = (f"{BOXES}.", f"{MASK}.")

    def __init__(self, num_classes: Mapping[str, int], in_channels: int = 1, *, backbone: str = "densenet121",
                 backbone_options: Mapping[str, Any] | None = None,
                 anchors: Sequence[Sequence[float]] = DEFAULT_ANCHORS, head_width: int = 64) -> None:
        super().__init__()
        unknown = sorted(set(num_classes) - {FINDINGS, BOXES, MASK})
        if FINDINGS not in num_classes or unknown:
            raise ValueError(f"num_classes needs a '{FINDINGS}' head and may add '{BOXES}' and '{MASK}'; got "
                             f"{sorted(num_classes)}")
        if head_width < 1:
            raise ValueError(f"head_width must be >= 1, got {head_width}")
        body = create(backbone, num_classes=1, in_channels=in_channels, **dict(backbone_options or {}))
        try:
            stages = body.encoder_stages()
        except (AttributeError, NotImplementedError):
            raise ValueError(f"backbone {backbone!r} exposes no encoder stages; use densenet121, resnet18 or "
                             "resnet50") from None
        self.stages = nn.ModuleList(stages)
        self.min_input_size = max(32, model_info(backbone).min_input_size)
        channels, strides = self._probe(in_channels)
        self.heads = list(num_classes)
        self.findings = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], num_classes[FINDINGS]))
        self.grid = AnchorGrid(tuple(tuple(float(v) for v in a) for a in anchors), strides[-1],  # type: ignore[misc]
                               int(num_classes.get(BOXES, 1)))
        self.boxes = BoxHead(channels[-1], head_width, self.grid) if BOXES in num_classes else None
        self.mask = MaskDecoder(channels, head_width, int(num_classes[MASK])) if MASK in num_classes else None

    def _probe(self, in_channels: int) -> tuple[list[int], list[int]]:
        """Channels and strides of each encoder stage (one dry pass at 64 px)."""
        side = 64
        was_training = self.training
        self.eval()
        with torch.no_grad():
            maps = self.encode(torch.zeros(1, in_channels, side, side))
        self.train(was_training)
        return [m.shape[1] for m in maps], [side // m.shape[-1] for m in maps]

    def encode(self, x: Tensor) -> list[Tensor]:
        """Every encoder stage's feature map, input side first (one pass)."""
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def decode(self, maps: Sequence[Tensor], size: tuple[int, int], heads: Sequence[str] | None = None) -> dict[str, Tensor]:
        """The heads' raw outputs from encoder maps (``heads``: a subset, all by default)."""
        out: dict[str, Tensor] = {}
        for name in heads or self.heads:
            if name == FINDINGS:
                out[name] = self.findings(maps[-1])
            elif name == BOXES and self.boxes is not None:
                out[name] = self.boxes(maps[-1])
            elif name == MASK and self.mask is not None:
                out[name] = self.mask(maps, size)
        return out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Raw outputs of every head: findings logits (N, C), box outputs (N, A * per_anchor, h, w), mask
        logits (N, M, H, W)."""
        return self.decode(self.encode(x), (x.shape[-2], x.shape[-1]))

    def features(self, x: Tensor) -> Tensor:
        """Pooled embedding (N, D) the findings head reads (for the audit's probe and for transfer)."""
        return self.findings[:2](self.encode(x)[-1])

    @property
    def classifier(self) -> nn.Module:
        return self.findings[2]

    @property
    def cam_layer(self) -> nn.Module:
        return self.stages[-1]

    def layer_groups(self) -> list[nn.Module]:
        heads = [module for module in (self.findings, self.boxes, self.mask) if module is not None]
        return [*self.stages, *heads]

    @torch.no_grad()
    def screen(self, x: Tensor, *, threshold: float = 0.5, score_threshold: float = 0.25,
               iou_threshold: float = 0.45) -> list[dict[str, Any]]:
        """The paper's filtered inference: findings for every image; boxes and mask only for the images
        whose highest finding probability reaches ``threshold`` (the others get ``None``), computed from
        the same encoder pass.

        The filter reads the findings as multi-label (a sigmoid each): an image passes when one finding's
        probability reaches ``threshold``.

        Returns:
            One dict per image: ``logits`` and ``findings`` (C,) logits and sigmoid probabilities,
            ``positive`` (bool), ``boxes`` (a dict of ``boxes``, ``scores``, ``labels``) or None, ``mask``
            (M, H, W) probabilities or None.
        """
        maps = self.encode(x)
        logits = self.findings(maps[-1]).float()
        probabilities = torch.sigmoid(logits)
        positive = probabilities.max(dim=1).values >= threshold
        results: list[dict[str, Any]] = [{"logits": z, "findings": p, "positive": bool(flag), "boxes": None,
                                          "mask": None}
                                         for z, p, flag in zip(logits, probabilities, positive, strict=True)]
        chosen = torch.nonzero(positive).flatten()
        if len(chosen) and (self.boxes is not None or self.mask is not None):
            dense = self.decode([m[chosen] for m in maps], (x.shape[-2], x.shape[-1]), heads=[BOXES, MASK])
            found = detections(dense[BOXES], self.grid, score_threshold=score_threshold,
                               iou_threshold=iou_threshold) if BOXES in dense else [None] * len(chosen)
            for slot, index in enumerate(chosen.tolist()):
                results[index]["boxes"] = found[slot]
                if MASK in dense:
                    results[index]["mask"] = torch.sigmoid(dense[MASK][slot].float())
        return results


_ANCHORS = [list(a) for a in DEFAULT_ANCHORS]
_PAPER = {"backbone": "densenet121", "backbone_options": {}, "anchors": _ANCHORS, "head_width": 64}
_CPU = {"backbone": "resnet18", "backbone_options": {"width": 32}, "anchors": _ANCHORS, "head_width": 32}


@register_model("multichexnet", paper="001 MultiCheXNet", input_size=256, min_input_size=32, task="multitask",
                heads=(FINDINGS, BOXES, MASK), defaults=_PAPER,
                description="DenseNet-121 encoder with findings, box (YOLO-style) and mask heads")
def multichexnet(*, num_classes: Mapping[str, int], in_channels: int, **kwargs: Any) -> MultiCheXNet:
    return MultiCheXNet(num_classes, in_channels, **{**_PAPER, **kwargs})


@register_model("multichexnet_cpu", paper="001 MultiCheXNet", input_size=256, min_input_size=32, task="multitask",
                heads=(FINDINGS, BOXES, MASK), defaults=_CPU,
                description="MultiCheXNet on a width-32 ResNet-18 encoder (CPU-sized)")
def multichexnet_cpu(*, num_classes: Mapping[str, int], in_channels: int, **kwargs: Any) -> MultiCheXNet:
    return MultiCheXNet(num_classes, in_channels, **{**_CPU, **kwargs})
