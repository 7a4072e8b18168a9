"""The LightningModule every recipe trains through, whatever its task.

One module serves every stage and every task: it holds a zoo model, the stage's optimizer settings and
the stage's :class:`~lungscreen.training.objectives.Objective`, which decides the loss (training and
validation alike) and the validation figures: per-class sensitivity, PPV and AUC for classifiers,
per-label AUC for multi-label heads, Dice for masks, each head's own for a multi-task network. They are
logged as ``val/<figure>`` (for example ``val/sensitivity/COVID-19`` or ``val/dice``) so any of them can
drive early stopping, the best checkpoint or a search.

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

from lungscreen.training.config import StageConfig
from lungscreen.training.heads import TrainingHead
from lungscreen.training.objectives import Objective
from lungscreen.training.optim import build_optimizer, build_schedule, discriminative_rates, plan_groups


def channels_last(images: Tensor) -> Tensor:
    """A 4-D image batch in the channels-last layout (other tensors as they are)."""
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


class TrainModule(L.LightningModule):
    """Trains a zoo model for one stage.

    Args:
        model: a zoo model.
        objective: the stage's loss and validation figures (chosen by the task).
        stage: the stage's settings (trainable groups, optimizer, schedule).
        lr: the stage's resolved learning rate (a rate or ``(first, last)``; ``find`` already replaced).
        seed: run seed (with ``stage_index``) for the per-step RNG.
        stage_index: index of the stage in the recipe.
        monitor_mode: ``max`` or ``min``, for the plateau schedule watching a figure.
    """

    def __init__(self, model: nn.Module, *, objective: Objective, stage: StageConfig,
                 lr: float | tuple[float, float], seed: int = 0, stage_index: int = 0, monitor_mode: str = "max") -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)
        self.objective = objective
        self.stage = stage
        self.lr = lr[1] if isinstance(lr, tuple) else lr  # the head's rate; what the LR finder moves
        self._spread = (lr[1] / lr[0]) if isinstance(lr, tuple) else 1.0
        self.seed = seed
        self.stage_index = stage_index
        self.monitor_mode = monitor_mode
        self.plan = plan_groups(model, stage.train, self.stage_rates(), train_bn=stage.train_bn,
                                key=f"stages.{stage_index}.train")
        self._train_loss = torch.zeros(2, dtype=torch.float64)
        self._val_loss = torch.zeros(2, dtype=torch.float64)
        self._val_kept: list[dict[str, np.ndarray]] = []
        self.last_validation: dict[str, float] = {}
        self.last_kept: dict[str, np.ndarray] = {}  # what the last validation's figures were computed from

    def stage_rates(self) -> float | tuple[float, float]:
        return (self.lr / self._spread, self.lr) if self._spread != 1.0 else self.lr

    # ---- modes ---------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> TrainModule:
        """Like nn.Module.train, but BatchNorm layers of frozen groups stay in eval mode (their running
        statistics belong to the weights being kept)."""
        super().train(mode)
        if mode:
            for norm in self.plan.frozen_norms(self.model):
                norm.eval()
        return self

    def forward(self, images: Tensor) -> Any:
        return self.model(channels_last(images))

    # ---- training ------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(int(np.random.SeedSequence([self.seed, self.stage_index, self.global_step,
                                                      self.global_rank]).generate_state(1)[0]))
        if isinstance(self.model, TrainingHead):  # a site adversary's reversal ramps with the stage's progress
            self.model.set_progress(self.global_step / max(1, int(self.trainer.estimated_stepping_batches) - 1))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.objective.loss(self(batch["image"]), batch)
        count = len(batch["image"])
        self._train_loss += torch.tensor([loss.detach().double().item() * count, count], dtype=torch.float64)
        return loss

    def on_train_epoch_start(self) -> None:
        self._train_loss.zero_()

    def train_loss(self) -> float:
        total, count = self._train_loss.tolist()
        return total / count if count else float("nan")

    # ---- validation ----------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        outputs = self(batch["image"])
        count = len(batch["image"])
        loss = self.objective.validation_loss(outputs, batch)
        self._val_loss += torch.tensor([loss.detach().double().item() * count, count], dtype=torch.float64)
        self._val_kept.append(self.objective.keep(outputs, batch))

    def on_validation_epoch_start(self) -> None:
        self._val_loss.zero_()
        self._val_kept = []

    def on_validation_epoch_end(self) -> None:
        if not self._val_kept:
            return
        kept = {key: np.concatenate([k[key] for k in self._val_kept if key in k])
                for key in {key for k in self._val_kept for key in k}}
        figures = {f"val/{name}": value for name, value in self.objective.figures(kept).items()}
        total, count = self._val_loss.tolist()
        figures["val/loss"] = total / count
        figures["train/loss"] = self.train_loss()
        self.last_validation, self.last_kept = figures, kept
        self._val_kept = []
        for name, value in figures.items():
            # NaN (an undefined figure, e.g. PPV with no positive prediction) is logged as is; the
            # callbacks watching a figure treat it as the worst value.
            self.log(name, float(value), prog_bar=name in ("val/loss", "val/accuracy", "val/dice"), sync_dist=False)

    # ---- optimisation --------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        rates = self.stage_rates()
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
