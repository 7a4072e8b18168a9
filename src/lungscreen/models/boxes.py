"""One-stage anchor boxes (YOLO style) for MultiCheXNet's detection head (paper 001).

The head predicts, for every cell of a feature map of stride ``s`` and every anchor shape, five numbers
``(tx, ty, tw, th, to)`` plus one logit per box class when there are several:

- centre: ``cx = (gx + sigmoid(tx)) * s`` (the centre stays inside its cell);
- size: ``w = anchor_w * side * exp(tw)`` (anchors are fractions of the image side, so one grid serves
  every input size);
- objectness: ``sigmoid(to)``, the probability that the anchor holds a box.

:meth:`AnchorGrid.encode` turns true boxes into those targets (each box goes to the cell of its centre and
the anchor whose shape overlaps it most); :meth:`AnchorGrid.decode` turns raw outputs into boxes and
scores; :func:`detections` keeps the confident ones and removes duplicates with torchvision's
``batched_nms`` (per class). Boxes are ``(x1, y1, x2, y2)`` in pixels of the model input.

Example:
    >>> grid = AnchorGrid(anchors=((0.2, 0.4), (0.4, 0.6)), stride=32)
    >>> raw = torch.zeros(1, grid.channels, 8, 8)
    >>> grid.decode(raw)[0].shape       # boxes of every cell and anchor
    torch.Size([1, 128, 4])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

#: Anchor shapes (width, height as fractions of the image side) spanning lung-field findings: a lesion
#: patch, part of a lung, a whole lung. A recipe sets its own with the model option ``anchors``.
DEFAULT_ANCHORS: tuple[tuple[float, float], ...] = ((0.12, 0.12), (0.3, 0.35), (0.35, 0.7))


@dataclass(frozen=True)
class AnchorGrid:
    """Anchor shapes on a feature map of one stride, with the box coding of the module docstring.

    Args:
        anchors: (width, height) of each anchor as fractions of the image side.
        stride: input pixels per feature-map cell.
        num_classes: box classes (1: one kind of finding, no class logits).
    """

    anchors: tuple[tuple[float, float], ...] = DEFAULT_ANCHORS
    stride: int = 32
    num_classes: int = 1

    def __post_init__(self) -> None:
        if not self.anchors or any(len(a) != 2 or not (0 < a[0] <= 1 and 0 < a[1] <= 1) for a in self.anchors):
            raise ValueError(f"anchors must be (width, height) fractions in (0, 1], got {self.anchors}")
        if self.stride < 1 or self.num_classes < 1:
            raise ValueError(f"stride and num_classes must be >= 1, got {self.stride} and {self.num_classes}")

    @property
    def per_anchor(self) -> int:
        """Outputs per anchor: 4 box numbers, objectness, and class logits when there are several classes."""
        return 5 + (self.num_classes if self.num_classes > 1 else 0)

    @property
    def channels(self) -> int:
        """Output channels of the head: ``anchors * per_anchor``."""
        return len(self.anchors) * self.per_anchor

    def _split(self, raw: Tensor) -> Tensor:
        """(N, A * per_anchor, h, w) -> (N, h, w, A, per_anchor)."""
        n, _, h, w = raw.shape
        return raw.float().view(n, len(self.anchors), self.per_anchor, h, w).permute(0, 3, 4, 1, 2)

    def _anchor_pixels(self, h: int, w: int, device: torch.device) -> Tensor:
        """(A, 2) anchor sizes in pixels of an input of side (h * stride, w * stride)."""
        sides = torch.tensor([w * self.stride, h * self.stride], dtype=torch.float32, device=device)
        return torch.tensor(self.anchors, dtype=torch.float32, device=device) * sides

    def decode(self, raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Raw head outputs -> (boxes (N, K, 4) xyxy px, scores (N, K), labels (N, K)), K = h * w * A.

        The score is objectness times the class probability (objectness alone for one class).
        """
        parts = self._split(raw)
        n, h, w, _, _ = parts.shape
        gy, gx = torch.meshgrid(torch.arange(h, device=raw.device), torch.arange(w, device=raw.device), indexing="ij")
        cx = (gx[None, :, :, None] + torch.sigmoid(parts[..., 0])) * self.stride
        cy = (gy[None, :, :, None] + torch.sigmoid(parts[..., 1])) * self.stride
        sizes = self._anchor_pixels(h, w, raw.device)
        bw = sizes[:, 0] * torch.exp(parts[..., 2].clamp(max=8.0))
        bh = sizes[:, 1] * torch.exp(parts[..., 3].clamp(max=8.0))
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1).reshape(n, -1, 4)
        objectness = torch.sigmoid(parts[..., 4]).reshape(n, -1)
        if self.num_classes == 1:
            return boxes, objectness, torch.zeros_like(objectness, dtype=torch.int64)
        classes = torch.softmax(parts[..., 5:], dim=-1).reshape(n, -1, self.num_classes)
        best, labels = classes.max(dim=-1)
        return boxes, objectness * best, labels

    def encode(self, boxes: Sequence[Tensor], labels: Sequence[Tensor] | None, h: int, w: int) -> dict[str, Tensor]:
        """Targets of true boxes (one (n_i, 4) xyxy tensor per image) on an h x w map.

        Returns:
            ``assigned`` bool (N, h, w, A): anchors that hold a box; ``xy`` (N, h, w, A, 2) the centre's
            offset in its cell (what ``sigmoid(tx), sigmoid(ty)`` should become); ``wh`` (N, h, w, A, 2)
            ``log(size / anchor)`` (what ``tw, th`` should become); ``label`` (N, h, w, A) box class.
            Two boxes falling on the same cell and anchor: the later one is kept.
        """
        n, a = len(boxes), len(self.anchors)
        device = boxes[0].device if n else torch.device("cpu")
        assigned = torch.zeros((n, h, w, a), dtype=torch.bool, device=device)
        xy = torch.zeros((n, h, w, a, 2), device=device)
        wh = torch.zeros((n, h, w, a, 2), device=device)
        label = torch.zeros((n, h, w, a), dtype=torch.int64, device=device)
        sizes = self._anchor_pixels(h, w, device)
        for i, image_boxes in enumerate(boxes):
            image_boxes = image_boxes.float().reshape(-1, 4)
            keep = (image_boxes[:, 2] > image_boxes[:, 0]) & (image_boxes[:, 3] > image_boxes[:, 1])
            image_boxes = image_boxes[keep]
            if not len(image_boxes):
                continue
            image_labels = labels[i].reshape(-1)[keep] if labels is not None else torch.zeros(len(image_boxes), dtype=torch.int64)
            centre = (image_boxes[:, :2] + image_boxes[:, 2:]) / 2
            size = image_boxes[:, 2:] - image_boxes[:, :2]
            cells = (centre / self.stride).floor().long()
            cells[:, 0].clamp_(0, w - 1)
            cells[:, 1].clamp_(0, h - 1)
            best = box_iou(_centred(size), _centred(sizes)).argmax(dim=1)
            for j in range(len(image_boxes)):
                gx, gy, k = int(cells[j, 0]), int(cells[j, 1]), int(best[j])
                assigned[i, gy, gx, k] = True
                xy[i, gy, gx, k] = (centre[j] / self.stride - cells[j].float()).clamp(1e-4, 1 - 1e-4)
                wh[i, gy, gx, k] = torch.log(size[j] / sizes[k])
                label[i, gy, gx, k] = int(image_labels[j])
        return {"assigned": assigned, "xy": xy, "wh": wh, "label": label}

    def loss(self, raw: Tensor, boxes: Sequence[Tensor], labels: Sequence[Tensor] | None = None) -> Tensor:
        """YOLO loss of a batch: objectness BCE (positives and negatives each averaged, so the thousands of
        empty anchors do not drown the few boxes), centre BCE and size MSE on assigned anchors, class CE."""
        parts = self._split(raw)
        _, h, w, _, _ = parts.shape
        target = self.encode(boxes, labels, h, w)
        assigned = target["assigned"]
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        objectness = bce(parts[..., 4], assigned.float(), reduction="none")
        loss = objectness[~assigned].mean() if (~assigned).any() else parts.sum() * 0.0
        if assigned.any():
            chosen = parts[assigned]
            loss = loss + objectness[assigned].mean()
            loss = loss + bce(chosen[:, :2], target["xy"][assigned]) + 2.0 * (chosen[:, 2:4] - target["wh"][assigned]).pow(2).mean()
            if self.num_classes > 1:
                loss = loss + torch.nn.functional.cross_entropy(chosen[:, 5:], target["label"][assigned])
        return loss


def detections(raw: Tensor, grid: AnchorGrid, *, score_threshold: float = 0.25, iou_threshold: float = 0.45,
               max_detections: int = 100) -> list[dict[str, Tensor]]:
    """Per image: the boxes scoring at least ``score_threshold`` after per-class non-maximum suppression.

    Returns:
        One dict per image with ``boxes`` (k, 4) xyxy px, ``scores`` (k,) and ``labels`` (k,), best first
        (the format torchmetrics' ``MeanAveragePrecision`` takes).
    """
    boxes, scores, labels = grid.decode(raw)
    out = []
    for image_boxes, image_scores, image_labels in zip(boxes, scores, labels, strict=True):
        confident = image_scores >= score_threshold
        image_boxes, image_scores, image_labels = image_boxes[confident], image_scores[confident], image_labels[confident]
        keep = batched_nms(image_boxes, image_scores, image_labels, iou_threshold)[:max_detections]
        out.append({"boxes": image_boxes[keep], "scores": image_scores[keep], "labels": image_labels[keep]})
    return out


def _centred(sizes: Tensor) -> Tensor:
    """(n, 2) widths and heights -> (n, 4) boxes centred on the origin (to compare shapes alone)."""
    return torch.cat([-sizes / 2, sizes / 2], dim=1)
