"""The LightningModule every classification recipe trains through.

One module serves every stage: it holds a zoo model, the stage's loss and optimizer settings and the
class names, and it measures validation with the same figures the evaluation report uses
(:func:`lungscreen.evaluation.metrics.classification_figures`), logged as ``val/<figure>`` (for example
``val/sensitivity/COVID-19``) so any of them can drive early stopping, the best checkpoint or a search.

Speed: the model and every batch are kept channels-last (NHWC), the layout oneDNN's CPU convolutions
run fastest in (measured 15-25 % faster training steps for the ResNets, SqueezeNets and COVID-Net of the
zoo on two cores, in fp32 and bf16); the results are the same up to rounding.

Determinism: before every training step the global RNG (dropout, stochastic depth) is seeded from
``(seed, stage, step, rank)``, and augmentations carry their own seeds (:mod:`~lungscreen.training.data`),
so no random state needs saving and a run resumed from a checkpoint replays exactly what an uninterrupted
run does.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from lungscreen.evaluation.metrics import classification_figures
from lungscreen.training.config import StageConfig
from lungscreen.training.optim import build_loss, build_optimizer, build_schedule, plan_groups


def channels_last(images: Tensor) -> Tensor:
    """A 4-D image batch in the channels-last layout (other tensors as they are)."""
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


class ClassifierModule(L.LightningModule):
    """Trains a zoo classifier for one stage.

    Args:
        model: a zoo classification model.
        class_names: names of the output classes, in order.
        stage: the stage's settings (trainable groups, optimizer, schedule, loss).
        lr: the stage's resolved learning rate (a rate or ``(first, last)``; ``find`` already replaced).
        class_weights: loss weights in class order, or None.
        seed: run seed (with ``stage_index``) for the per-step RNG.
        stage_index: index of the stage in the recipe.
        monitor_mode: ``max`` or ``min``, for the plateau schedule watching a figure.
    """

    def __init__(self, model: nn.Module, *, class_names: tuple[str, ...], stage: StageConfig,
                 lr: float | tuple[float, float], class_weights: Tensor | None = None, seed: int = 0,
                 stage_index: int = 0, monitor_mode: str = "max") -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)
        self.class_names = tuple(class_names)
        self.stage = stage
        self.lr = lr[1] if isinstance(lr, tuple) else lr  # the head's rate; what the LR finder moves
        self._spread = (lr[1] / lr[0]) if isinstance(lr, tuple) else 1.0
        self.criterion = build_loss(stage.loss, len(class_names), class_weights)
        self.seed = seed
        self.stage_index = stage_index
        self.monitor_mode = monitor_mode
        self.plan = plan_groups(model, stage.train, self.stage_rates(), train_bn=stage.train_bn,
                                key=f"stages.{stage_index}.train")
        self._train_loss = torch.zeros(2, dtype=torch.float64)
        self._val_outputs: list[tuple[Tensor, Tensor, Tensor]] = []
        self.last_validation: dict[str, float] = {}

    def stage_rates(self) -> float | tuple[float, float]:
        return (self.lr / self._spread, self.lr) if self._spread != 1.0 else self.lr

    # ---- modes ---------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ClassifierModule:
        """Like nn.Module.train, but BatchNorm layers of frozen groups stay in eval mode (their running
        statistics belong to the weights being kept)."""
        super().train(mode)
        if mode:
            for norm in self.plan.frozen_norms(self.model):
                norm.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        return self.model(channels_last(images))

    # ---- training ------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(int(np.random.SeedSequence([self.seed, self.stage_index, self.global_step,
                                                      self.global_rank]).generate_state(1)[0]))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits = self(batch["image"])
        loss = self.criterion(logits, batch["label"])
        self._train_loss += torch.tensor([loss.detach().double().item() * len(logits), len(logits)], dtype=torch.float64)
        return loss

    def on_train_epoch_start(self) -> None:
        self._train_loss.zero_()

    def train_loss(self) -> float:
        total, count = self._train_loss.tolist()
        return total / count if count else float("nan")

    # ---- validation ----------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self(batch["image"]).float()
        loss = nn.functional.cross_entropy(logits, batch["label"], reduction="sum")
        self._val_outputs.append((torch.softmax(logits, dim=1).cpu(), batch["label"].cpu(), loss.detach().cpu()))

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        probs = torch.cat([o[0] for o in self._val_outputs]).numpy()
        labels = torch.cat([o[1] for o in self._val_outputs]).numpy()
        loss = float(sum(o[2] for o in self._val_outputs)) / len(labels)
        figures = {f"val/{name}": value for name, value in classification_figures(labels, probs, self.class_names).items()}
        figures["val/loss"] = loss
        figures["train/loss"] = self.train_loss()
        self.last_validation = figures
        self._val_outputs = []
        for name, value in figures.items():
            # NaN (an undefined figure, e.g. PPV with no positive prediction) is logged as is; the
            # callbacks watching a figure treat it as the worst value.
            self.log(name, float(value), prog_bar=name in ("val/loss", "val/accuracy"), sync_dist=False)

    # ---- optimisation --------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        rates = self.stage_rates()
        from lungscreen.training.optim import discriminative_rates

        values = discriminative_rates(rates, len(self.plan.trained))
        groups = []
        for group in self.plan.param_groups:
            position = self.plan.trained.index(group["group"]) if group["group"] in self.plan.trained else 0
            groups.append({**group, "lr": values[position]})
        optimizer = build_optimizer(self.stage.optimizer, groups)
        schedule = build_schedule(self.stage.schedule, optimizer, total_steps=int(self.trainer.estimated_stepping_batches),
                                  monitor_mode="min" if self.stage.schedule.monitor.endswith("loss") else self.monitor_mode)
        if schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": schedule}
