"""What a run optimises and measures, one class per kind of task; the engine is the same for all.

An objective knows three things about its head: the loss of a batch, what validation keeps of a batch
(probabilities and truths, or per-image Dice), and the figures computed from what was kept. The
Lightning module (:mod:`~lungscreen.training.module`) asks the objective and nothing else, so a
multi-class classifier, a multi-label one, the lung U-Net and a multi-task network share one engine:

============  ======================================  =============================================
kind          loss                                    validation figures
============  ======================================  =============================================
multiclass    the recipe's: cross-entropy, focal or   accuracy, per-class sensitivity / PPV / F1 /
              one-hot BCE, with class weights         AUC, balanced accuracy... (metrics module)
multilabel    sigmoid BCE (class weights as           per-label AUC, sensitivity, specificity,
              ``pos_weight``)                         F1; macro AUC
segmentation  soft Dice + BCE on each mask's own      Dice per image on its own channel (unknown
              channel, BCE on the pixels nesting      pixels left out), mean and per channel
              makes known in the other channels
detection     YOLO: objectness, centre and size       mAP at IoU 0.5 and mean IoU of the true boxes
              offsets (:mod:`~lungscreen.models.      (metrics module, torchmetrics' mAP)
              boxes`)
multitask     the heads' losses summed (weighted);    each head's figures, prefixed by its name
              an image without a head's label adds
              nothing to that head's loss
============  ======================================  =============================================

Validation uses the same loss as training (a ``bce`` recipe is validated with BCE, not softmax CE).

Teacher forcing (paper 001): a multi-task objective may gate its box and mask heads behind the findings
head. Per batch, with probability ``p`` those heads learn from the ground-truth positives (images with
boxes, or a drawn mask); otherwise from the images the findings head passes as positive, as they would
at inference. :class:`TeacherForcing` draws from its own seeded generator, so a run replays its choices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lungscreen.data.labels import Task
from lungscreen.evaluation.metrics import classification_figures, detection_figures, dice_iou, multilabel_figures
from lungscreen.models.boxes import AnchorGrid, detections
from lungscreen.training.config import LossConfig
from lungscreen.training.losses import build_loss, spectral_penalty

#: Logit that makes a pixel "certainly background" (sigmoid ~ 1e-13): how unknown pixels leave the Dice.
_OFF = -30.0


class Objective:
    """Loss, validation keeping and figures of one head (see the module docstring)."""

    kind = ""

    def __init__(self, task: Task) -> None:
        self.task = task

    def loss(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        raise NotImplementedError

    def validation_loss(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """The loss on a validation batch (the training loss, minus any training-only choice of rows)."""
        return self.loss(logits, batch)

    def activate(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits.float())

    def keep(self, logits: Tensor, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def figures(self, kept: Mapping[str, np.ndarray]) -> dict[str, float]:
        raise NotImplementedError


class MulticlassObjective(Objective):
    """One class of k (softmax)."""

    kind = "multiclass"

    def __init__(self, task: Task, loss: LossConfig, class_weights: Tensor | None = None) -> None:
        super().__init__(task)
        self.criterion = build_loss(loss, len(task.classes), class_weights)
        self.spectral_decoupling = loss.spectral_decoupling

    def loss(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        loss = self.criterion(logits.float(), batch["label"])
        return loss + spectral_penalty(logits, self.spectral_decoupling) if self.spectral_decoupling else loss

    def activate(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits.float(), dim=1)

    def keep(self, logits: Tensor, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {"probs": self.activate(logits).cpu().numpy(), "labels": batch["label"].cpu().numpy(),
                "row": np.arange(len(logits))}

    def figures(self, kept: Mapping[str, np.ndarray]) -> dict[str, float]:
        return classification_figures(kept["labels"], kept["probs"], self.task.classes)


class MultilabelObjective(Objective):
    """Independent yes/no labels (a sigmoid each)."""

    kind = "multilabel"

    def __init__(self, task: Task, loss: LossConfig, class_weights: Tensor | None = None) -> None:
        super().__init__(task)
        self.criterion = nn.BCEWithLogitsLoss(pos_weight=class_weights)
        self.spectral_decoupling = loss.spectral_decoupling

    def loss(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        loss = self.criterion(logits.float(), batch["label"].float())
        return loss + spectral_penalty(logits, self.spectral_decoupling) if self.spectral_decoupling else loss

    def keep(self, logits: Tensor, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {"probs": self.activate(logits).cpu().numpy(), "labels": batch["label"].cpu().numpy(),
                "row": np.arange(len(logits))}

    def figures(self, kept: Mapping[str, np.ndarray]) -> dict[str, float]:
        return multilabel_figures(kept["labels"], kept["probs"], self.task.classes)


class SegmentationObjective(Objective):
    """Masks: soft Dice + BCE on each image's labelled channel, BCE on the pixels nesting makes known.

    Args:
        task: a segmentation task (channels, nested pairs).
        nested_weight: weight of the BCE on the pixels of channels a mask teaches only through nesting.
    """

    kind = "segmentation"

    def __init__(self, task: Task, loss: LossConfig) -> None:
        super().__init__(task)
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)
        self.nested_weight = loss.nested_weight

    def loss(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        logits = logits.float()
        target, known = batch["mask"].float(), batch["known"].float()
        labelled = batch["labelled"].bool()[:, :, None, None].expand_as(target)
        own = labelled.float() * known
        # Unknown pixels become "certain background, and background": no Dice, no gradient.
        dice = self.dice(torch.where(own > 0, logits, torch.full_like(logits, _OFF)), target * own)
        dice = dice.flatten(1)[batch["labelled"].bool()].mean()
        pixels = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = dice + (pixels * own).sum() / labelled.float().sum().clamp(min=1)
        nested = (~labelled).float() * known
        if self.nested_weight > 0 and nested.sum() > 0:
            loss = loss + self.nested_weight * (pixels * nested).sum() / nested.sum()
        return loss

    def keep(self, logits: Tensor, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        predicted = (self.activate(logits) >= 0.5).cpu().numpy()
        target, known = batch["mask"].cpu().numpy() > 0.5, batch["known"].cpu().numpy() > 0.5
        rows, channels = np.nonzero(batch["labelled"].cpu().numpy())
        scores = [dice_iou(predicted[i, c], target[i, c], ~known[i, c])[0] for i, c in zip(rows, channels, strict=True)]
        return {"dice": np.asarray(scores, np.float64), "channel": channels.astype(np.int64), "row": rows.astype(np.int64)}

    def figures(self, kept: Mapping[str, np.ndarray]) -> dict[str, float]:
        figures = {"dice": float(np.mean(kept["dice"])) if len(kept["dice"]) else float("nan")}
        for index, name in enumerate(self.task.classes):
            chosen = kept["dice"][kept["channel"] == index]
            figures[f"dice/{name}"] = float(np.mean(chosen)) if len(chosen) else float("nan")
        return figures


class DetectionObjective(Objective):
    """Boxes of one-stage anchors: the loss and decoding of :class:`~lungscreen.models.boxes.AnchorGrid`.

    The batch carries ``target_boxes``: a list of (n_i, 4) xyxy tensors in input pixels, one per image. What
    validation keeps is per image (object arrays), so the bootstrap can resample images like any figure.

    Args:
        task: a detection task (its classes are the box classes).
        grid: the model's anchor grid (``model.grid``).
        score_threshold: score from which a decoded box counts as predicted (mAP ranks all of them).
    """

    kind = "detection"

    def __init__(self, task: Task, grid: AnchorGrid, score_threshold: float = 0.05) -> None:
        super().__init__(task)
        self.grid, self.score_threshold = grid, score_threshold

    def loss(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return self.grid.loss(logits, batch["target_boxes"])

    def keep(self, logits: Tensor, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        found = detections(logits.detach(), self.grid, score_threshold=self.score_threshold)
        predicted = np.empty(len(found), dtype=object)
        truth = np.empty(len(found), dtype=object)
        for i, (boxes, true) in enumerate(zip(found, batch["target_boxes"], strict=True)):
            predicted[i] = {key: value.cpu().numpy() for key, value in boxes.items()}
            truth[i] = {"boxes": true.reshape(-1, 4).cpu().numpy(), "labels": np.zeros(len(true), np.int64)}
        return {"predicted": predicted, "truth": truth, "row": np.arange(len(found))}

    def figures(self, kept: Mapping[str, np.ndarray]) -> dict[str, float]:
        return detection_figures(list(kept["predicted"]), list(kept["truth"]))


class TeacherForcing:
    """Which images the gated heads learn from in a batch (module docstring): one coin per batch.

    Args:
        p: probability of a batch using the ground-truth positives (the paper uses 0.9).
        gate: the head whose probabilities filter (the findings head).
        threshold: the gate passes an image whose highest probability reaches it.
        seed: seed of the coin.
    """

    def __init__(self, p: float, gate: str, threshold: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"teacher forcing p must be in [0, 1], got {p}")
        self.p, self.gate, self.threshold = p, gate, threshold
        self.generator = torch.Generator().manual_seed(seed)
        self.forced = 0  # batches that used the ground truth, for logs and tests
        self.tosses = 0

    def toss(self) -> bool:
        """This batch's coin: True (with probability p) to feed the ground-truth positives."""
        self.tosses += 1
        forced = float(torch.rand((), generator=self.generator)) < self.p
        self.forced += forced
        return forced

    def rows(self, forced: bool, truth_positive: Tensor, gate_logits: Tensor) -> Tensor:
        """Bool mask of the batch: the true positives when forced, else the images the gate passes."""
        if forced:
            return truth_positive
        passed = torch.sigmoid(gate_logits.detach().float()).max(dim=1).values >= self.threshold
        return passed.to(truth_positive.device)


class MultitaskObjective(Objective):
    """Several heads on one network; each image teaches only the heads it has labels for.

    Args:
        heads: head name -> its objective (the model's output dict uses the same names).
        weights: head name -> weight of its loss in the sum (1 by default).
    """

    kind = "multitask"

    def __init__(self, heads: Mapping[str, Objective], weights: Mapping[str, float] | None = None,
                 teacher_forcing: TeacherForcing | None = None) -> None:
        self.heads = dict(heads)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in self.heads}
        self.teacher_forcing = teacher_forcing

    def gated(self, name: str) -> bool:
        """Whether a head learns behind the teacher-forcing gate (box and mask heads, when one is set)."""
        return self.teacher_forcing is not None and self.heads[name].kind in ("detection", "segmentation")

    def learning_rows(self, name: str, outputs: Mapping[str, Tensor], batch: Mapping[str, Any],
                      forced: bool | None = None) -> Tensor:
        """The images a head learns from in this batch: those with its label, and behind the gate (a
        training batch, ``forced`` its coin) only the true positives or those the gate passes."""
        present = batch[name]["present"].bool()
        if forced is None or not self.gated(name):
            return present
        forcing = self.teacher_forcing
        assert forcing is not None
        return present & forcing.rows(forced, present & _has_content(batch, name), outputs[forcing.gate])

    def loss(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any], training: bool = True) -> Tensor:
        forced = self.teacher_forcing.toss() if training and self.teacher_forcing is not None else None
        total = None
        for name, head in self.heads.items():
            present = self.learning_rows(name, outputs, batch, forced)
            if not present.any():
                continue  # no label for this head in the batch: nothing to learn, no gradient
            part = self.weights[name] * head.loss(outputs[name][present], _select(batch, name, present))
            total = part if total is None else total + part
        if total is None:  # a batch with no label at all still needs a graph for the optimizer step
            total = sum(output.sum() * 0.0 for output in outputs.values())
        return total

    def validation_loss(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        return self.loss(outputs, batch, training=False)

    def activate(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: head.activate(outputs[name]) for name, head in self.heads.items()}

    def keep(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        kept = {}
        for name, head in self.heads.items():
            present = batch[name]["present"]
            if present.any():
                own = head.keep(outputs[name][present], _select(batch, name, present))
                own["row"] = np.flatnonzero(present.cpu().numpy())[own["row"]]  # rows of the whole batch
                kept.update({f"{name}/{key}": value for key, value in own.items()})
        return kept

    def figures(self, kept: Mapping[str, np.ndarray]) -> dict[str, float]:
        figures = {}
        for name, head in self.heads.items():
            own = head_of(kept, name)
            if own:
                figures.update({f"{name}/{key}": value for key, value in head.figures(own).items()})
        return figures


def _select(batch: Mapping[str, Any], name: str, present: Tensor) -> dict[str, Any]:
    """A head's targets at the rows where it learns, with the batch's boxes of those rows."""
    selected: dict[str, Any] = {key: value[present] for key, value in batch[name].items() if key != "present"}
    rows = torch.nonzero(present.cpu()).flatten().tolist()
    if "target_boxes" in batch:
        selected["target_boxes"] = [batch["target_boxes"][i] for i in rows]
    return selected


def _has_content(batch: Mapping[str, Any], name: str) -> Tensor:
    """Images that are positive for a head: at least one box, or a drawn mask pixel."""
    present = batch[name]["present"].bool()
    if "mask" in batch[name]:
        return present & (batch[name]["mask"].flatten(1).amax(dim=1) > 0)
    return present & torch.tensor([len(b) > 0 for b in batch["target_boxes"]], dtype=torch.bool, device=present.device)


def build_objective(task: Task | Mapping[str, Task], loss: LossConfig, class_weights: Tensor | None = None, *,
                    grid: AnchorGrid | None = None, teacher_forcing: TeacherForcing | None = None) -> Objective:
    """The objective of a task (head name -> task for a multi-task model; each head gets its kind's loss).

    ``grid``: the model's anchor grid, which a detection head needs; ``teacher_forcing``: the gate of a
    multi-task model's box and mask heads.
    """
    if isinstance(task, Mapping):
        return MultitaskObjective({name: build_objective(head, loss, grid=grid) for name, head in task.items()},
                                  loss.head_weights, teacher_forcing)
    if task.kind == "multiclass":
        return MulticlassObjective(task, loss, class_weights)
    if task.kind == "multilabel":
        return MultilabelObjective(task, loss, class_weights)
    if task.kind == "detection":
        if grid is None:
            raise ValueError(f"task {task.name} predicts boxes: the model needs an anchor grid (model.grid)")
        return DetectionObjective(task, grid)
    return SegmentationObjective(task, loss)


def head_of(kept: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """What validation kept for one head of a multi-task objective (prefix removed)."""
    return {key.split("/", 1)[1]: value for key, value in kept.items() if key.startswith(f"{name}/")}
