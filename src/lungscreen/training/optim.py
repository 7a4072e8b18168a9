"""Stages' building blocks: trainable layer groups, discriminative learning rates, optimizers and
schedules (losses: :mod:`~lungscreen.training.losses`).

Layer groups come from the model (``model.layer_groups()``: input side first, head last). A stage trains
some of them; its ``lr`` is one rate, or ``[first, last]`` spread geometrically over the trained groups
(fastai's ``slice(1e-6, 1e-4)``: the input-side group gets 1e-6, the head 1e-4, the groups between
equidistant on a log scale).

Example:
    >>> discriminative_rates((1e-6, 1e-4), 3)
    [1e-06, 1e-05, 0.0001]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lungscreen.errors import ConfigError
from lungscreen.training.config import OptimizerConfig, ScheduleConfig
from lungscreen.training.recipe_checks import parse_train_spec

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def layer_groups(model: nn.Module) -> list[nn.Module]:
    """The model's layer groups (input side first, head last); the whole model is one group when it
    defines none (segmentation models may not)."""
    return list(model.layer_groups()) if hasattr(model, "layer_groups") else [model]


def discriminative_rates(lr: float | tuple[float, float], count: int) -> list[float]:
    """One rate per trained group: constant, or geometric from ``first`` to ``last``."""
    if isinstance(lr, (int, float)):
        return [float(lr)] * count
    first, last = lr
    if count == 1:
        return [float(last)]
    return [float(v) for v in np.geomspace(first, last, count)]


def selected_groups(spec: Any, group_count: int, key: str) -> list[int]:
    """Indices of the layer groups a stage trains; refuses a stage that would train nothing."""
    parsed = parse_train_spec(spec, key)
    if parsed == "all":
        chosen = list(range(group_count))
    elif parsed == "head":
        chosen = [group_count - 1]
    elif isinstance(parsed, slice):
        chosen = list(range(group_count))[parsed]
    else:
        bad = [i for i in parsed if not -group_count <= i < group_count]
        if bad:
            raise ConfigError(f"{key}: group index {bad[0]} out of range (the model has {group_count} layer groups)")
        chosen = sorted({i % group_count for i in parsed})
    if not chosen:
        raise ConfigError(f"{key}: {spec!r} selects no layer group: the stage would freeze everything "
                          f"(the model has {group_count} groups, 0 = input side, {group_count - 1} = head)")
    return chosen


@dataclass
class GroupPlan:
    """What a stage trains: the parameter groups handed to the optimizer, and the groups whose BatchNorm
    layers stay in eval mode (frozen, ``train_bn`` off)."""

    param_groups: list[dict[str, Any]]
    frozen_norm_groups: list[int]
    trained: list[int]

    def frozen_norms(self, model: nn.Module) -> list[nn.Module]:
        """Looked up on demand: DDP's SyncBatchNorm conversion replaces the layer objects."""
        groups = layer_groups(model)
        return [m for i in self.frozen_norm_groups for m in groups[i].modules() if isinstance(m, BN_TYPES)]


def plan_groups(model: nn.Module, spec: Any, lr: float | tuple[float, float], *, train_bn: bool, key: str) -> GroupPlan:
    """Freeze the groups a stage does not train and build its optimizer parameter groups.

    Parameters outside every layer group (a zoo model should have none) train with the head.
    """
    groups = layer_groups(model)
    trained = selected_groups(spec, len(groups), key)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    grouped = {id(p) for g in groups for p in g.parameters()}
    rates = discriminative_rates(lr, len(trained))
    param_groups, frozen_norm_groups = [], []
    for position, index in enumerate(trained):
        params = list(groups[index].parameters())
        if index == len(groups) - 1:
            params += [p for p in model.parameters() if id(p) not in grouped]
        for p in params:
            p.requires_grad_(True)
        param_groups.append({"params": params, "lr": rates[position], "group": index})
    for index, group in enumerate(groups):
        if index in trained:
            continue
        norms = [m for m in group.modules() if isinstance(m, BN_TYPES)]
        if train_bn:
            params = [p for m in norms for p in m.parameters()]
            for p in params:
                p.requires_grad_(True)
            if params:
                param_groups.append({"params": params, "lr": rates[0], "group": index})
        elif norms:
            frozen_norm_groups.append(index)
    return GroupPlan(param_groups, frozen_norm_groups, trained)


def build_optimizer(config: OptimizerConfig, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """Adam / AdamW (``momentum`` is beta1) or SGD with momentum; ``weight_decay`` is the L2 term."""
    groups = [{k: v for k, v in g.items() if k != "group"} for g in param_groups]
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=config.nesterov and config.momentum > 0)
    kind = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    return kind(groups, lr=groups[0]["lr"], betas=(config.momentum, config.beta2), weight_decay=config.weight_decay)


def build_schedule(config: ScheduleConfig, optimizer: torch.optim.Optimizer, *, total_steps: int,
                   monitor_mode: str) -> dict[str, Any] | None:
    """The Lightning ``lr_scheduler`` dict of a stage, or None for a constant rate."""
    if config.name == "constant":
        return None
    if config.name == "one_cycle":
        if total_steps < 3:  # too short to warm up and anneal: keep the peak rate
            return None
        peaks = [g["lr"] for g in optimizer.param_groups]
        # each phase needs at least one step (torch divides by the phase length)
        pct_start = min(max(config.pct_start, 1.5 / total_steps), 1.0 - 1.5 / total_steps)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=peaks, total_steps=total_steps, pct_start=pct_start,
            div_factor=config.div_factor, final_div_factor=config.final_div_factor)
        return {"scheduler": scheduler, "interval": "step"}
    if config.name == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=monitor_mode, factor=config.factor,
                                                               patience=config.patience)
        return {"scheduler": scheduler, "interval": "epoch", "monitor": config.monitor, "strict": True}
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_epochs, gamma=config.factor)
    return {"scheduler": scheduler, "interval": "epoch"}
