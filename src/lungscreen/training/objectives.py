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
multitask     the heads' losses summed (weighted);    each head's figures, prefixed by its name
              an image without a head's label adds
              nothing to that head's loss
============  ======================================  =============================================

Validation uses the same loss as training (a ``bce`` recipe is validated with BCE, not softmax CE).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lungscreen.data.labels import Task
from lungscreen.evaluation.metrics import classification_figures, dice_iou, multilabel_figures
from lungscreen.training.config import LossConfig
from lungscreen.training.optim import build_loss

#: Logit that makes a pixel "certainly background" (sigmoid ~ 1e-13): how unknown pixels leave the Dice.
_OFF = -30.0


class Objective:
    """Loss, validation keeping and figures of one head (see the module docstring)."""

    kind = ""

    def __init__(self, task: Task) -> None:
        self.task = task

    def loss(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        raise NotImplementedError

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

    def loss(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return self.criterion(logits.float(), batch["label"])

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

    def loss(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return self.criterion(logits.float(), batch["label"].float())

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


class MultitaskObjective(Objective):
    """Several heads on one network; each image teaches only the heads it has labels for.

    Args:
        heads: head name -> its objective (the model's output dict uses the same names).
        weights: head name -> weight of its loss in the sum (1 by default).
    """

    kind = "multitask"

    def __init__(self, heads: Mapping[str, Objective], weights: Mapping[str, float] | None = None) -> None:
        self.heads = dict(heads)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in self.heads}

    def loss(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        total = None
        for name, head in self.heads.items():
            present = batch[name]["present"]
            if not present.any():
                continue  # no label for this head in the batch: nothing to learn, no gradient
            part = self.weights[name] * head.loss(outputs[name][present], _select(batch[name], present))
            total = part if total is None else total + part
        if total is None:  # a batch with no label at all still needs a graph for the optimizer step
            total = sum(output.sum() * 0.0 for output in outputs.values())
        return total

    def activate(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: head.activate(outputs[name]) for name, head in self.heads.items()}

    def keep(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        kept = {}
        for name, head in self.heads.items():
            present = batch[name]["present"]
            if present.any():
                own = head.keep(outputs[name][present], _select(batch[name], present))
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


def _select(targets: Mapping[str, Tensor], present: Tensor) -> dict[str, Tensor]:
    """The rows of a head's targets where the head has a label."""
    return {key: value[present] for key, value in targets.items() if key != "present"}


def build_objective(task: Task | Mapping[str, Task], loss: LossConfig, class_weights: Tensor | None = None) -> Objective:
    """The objective of a task (head name -> task for a multi-task model; each head gets its kind's loss)."""
    if isinstance(task, Mapping):
        return MultitaskObjective({name: build_objective(head, loss) for name, head in task.items()},
                                  loss.head_weights)
    if task.kind == "multiclass":
        return MulticlassObjective(task, loss, class_weights)
    if task.kind == "multilabel":
        return MultilabelObjective(task, loss, class_weights)
    return SegmentationObjective(task, loss)


def head_of(kept: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """What validation kept for one head of a multi-task objective (prefix removed)."""
    return {key.split("/", 1)[1]: value for key, value in kept.items() if key.startswith(f"{name}/")}
