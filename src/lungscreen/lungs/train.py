"""Training the lung U-Net on the mask sets of a manifest (``lungscreen lungs train``).

* **Data**: every row with a ``mask_path``; its image and mask are read once, checked (aspect ratio,
  empty mask, blank image: reported and left out) and kept in memory at 256 px, equalized as the
  segmenter will see them.
* **Split**: the manifest's own patient-level ``split`` (so the lung model never trains on a patient the
  classifiers test on); rows without one get a patient-level split stratified by source. Training uses
  ``train``, model selection ``val``; ``test`` is left for ``lungscreen lungs evaluate``.
* **Augmentation**: MONAI dictionary transforms move image, mask and ignore map together (the same random
  affine for all three, nearest-neighbour for the masks): rotation +-10 deg, scale +-12 %, shift +-8 %,
  plus gamma and Gaussian noise on the image. No flips: the heart is on the left, and the heart-excluded
  masks depend on it.
* **Loss**: Dice + BCE (MONAI ``DiceCELoss`` with a sigmoid) on the output channel of the row's own
  convention, with the "Ignore" pixels neutralised; plus a BCE that uses the containment between the
  conventions (see :mod:`lungscreen.lungs`): pixels of heart-excluded lungs are lung in the other channel,
  and pixels outside behind-heart-included lungs are background in the other channel.
* **Selection**: the epoch with the best mean validation Dice is saved (our checkpoint format; the list of
  training patients rides along, so ``evaluate`` refuses to score a model on its own training patients).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungscreen.errors import ConfigError, LungscreenError
from lungscreen.lungs.data import CONVENTIONS, Pair, load_pair, mask_rows, with_splits
from lungscreen.lungs.evaluate import dice_iou, progress_or_quiet
from lungscreen.lungs.postprocess import clean_mask
from lungscreen.lungs.segmenter import MODEL_NAME, prepare_input


@dataclass
class LungTrainConfig:
    """Hyper-parameters of ``lungscreen lungs train`` (the defaults train on 2 CPU cores in minutes).

    Attributes:
        size: working side in pixels (multiple of 16).
        epochs: passes over the training pairs.
        batch_size: pairs per step.
        lr: peak learning rate of the one-cycle schedule (AdamW).
        weight_decay: AdamW weight decay.
        channels: U-Net widths per level.
        num_res_units: residual units per U-Net block.
        containment_weight: weight of the cross-convention BCE (0 trains each channel on its own rows only).
        seed: seeds the initialisation, the augmentation and the batch order.
        threads: torch CPU threads.
        max_pairs: use at most this many training pairs (smoke tests); None uses all.
    """

    size: int = 256
    epochs: int = 12
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-4
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    num_res_units: int = 0
    containment_weight: float = 0.5
    seed: int = 0
    threads: int = 2
    max_pairs: int | None = None

    def __post_init__(self) -> None:
        if self.size % 16 or self.size < 32:
            raise ConfigError(f"size must be a multiple of 16 and >= 32, got {self.size}")
        for key in ("epochs", "batch_size", "threads"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        self.channels = tuple(int(c) for c in self.channels)


@dataclass
class TrainReport:
    """What a training run produced."""

    path: Path
    best_epoch: int
    val_dice: float
    history: list[dict[str, float]]
    pairs: dict[str, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def load_pairs(rows: pd.DataFrame, size: int, progress: bool = True, description: str = "reading pairs"
               ) -> tuple[list[Pair], list[tuple[str, str]]]:
    """Read every (image, mask) pair of ``rows``; unreadable or unusable ones go to the skipped list."""
    pairs, skipped = [], []
    records = rows.to_dict("records")
    with progress_or_quiet(progress) as bar:
        task = bar.add_task(description, total=len(records))
        for row in records:
            try:
                pairs.append(load_pair(row["image_path"], row["mask_path"], row["mask_convention"], size,
                                       row.get("source", ""), row.get("patient_id", "")))
            except LungscreenError as error:
                skipped.append((row["image_path"], str(error)))
            bar.advance(task)
    return pairs, skipped


def augmentation(seed: int, size: int):
    """Geometric augmentation shared by image, lung mask and ignore map; intensity on the image only."""
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
    )

    keys = ["image", "lung", "ignore"]
    shift = 0.08 * size  # MONAI shifts in pixels
    transform = Compose([
        RandAffined(keys=keys, prob=0.9, rotate_range=(np.pi / 18,), scale_range=(0.12, 0.12),
                    translate_range=(shift, shift), mode=("bilinear", "nearest", "nearest"), padding_mode="zeros"),
        RandAdjustContrastd(keys=["image"], prob=0.3, gamma=(0.7, 1.5)),
        RandGaussianNoised(keys=["image"], prob=0.3, std=0.02),
    ])
    transform.set_random_state(seed=seed)
    return transform


class PairDataset:
    """Pairs as dicts of tensors (``image``, ``lung``, ``ignore`` (1, S, S); ``convention`` int)."""

    def __init__(self, pairs: list[Pair], augment=None) -> None:
        import torch

        self.pairs, self.augment = pairs, augment
        self.images = [torch.from_numpy(prepare_input(p.image, p.image.shape[0]))[None] for p in pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        pair = self.pairs[index]
        item = {"image": self.images[index],
                "lung": torch.from_numpy(pair.lung.astype(np.float32))[None],
                "ignore": torch.from_numpy(pair.ignore.astype(np.float32))[None]}
        if self.augment is not None:
            item = self.augment(item)
            item = {key: torch.as_tensor(np.asarray(value), dtype=torch.float32) for key, value in item.items()}
        item["lung"] = (item["lung"] > 0.5).float()
        item["ignore"] = (item["ignore"] > 0.5).float()
        item["convention"] = pair.convention
        return item


class ConventionLoss:
    """Dice + BCE on each row's own convention channel, plus the containment BCE on the other channel."""

    def __init__(self, containment_weight: float = 0.5) -> None:
        from monai.losses import DiceCELoss

        self.dice_ce = DiceCELoss(sigmoid=True, squared_pred=False, smooth_nr=1e-5, smooth_dr=1e-5)
        self.containment_weight = containment_weight

    def __call__(self, logits, lung, ignore, convention):
        import torch
        import torch.nn.functional as F

        index = convention.view(-1, 1, 1, 1).expand(-1, 1, *logits.shape[-2:])
        own = logits.gather(1, index)
        valid = ignore < 0.5
        # Unknown pixels become "certain background, and background": no loss, no gradient.
        own = torch.where(valid, own, torch.full_like(own, -30.0))
        loss = self.dice_ce(own, lung * valid)
        if self.containment_weight > 0 and logits.shape[1] == 2:
            other = logits.gather(1, 1 - index)
            heart_excluded = (convention == CONVENTIONS.index("heart-excluded")).view(-1, 1, 1, 1)
            # heart-excluded lung => lung when the heart is included; outside the whole lungs => outside.
            target = torch.where(heart_excluded, torch.ones_like(lung), torch.zeros_like(lung))
            known = torch.where(heart_excluded, lung > 0.5, lung < 0.5) & valid
            if known.any():
                loss = loss + self.containment_weight * F.binary_cross_entropy_with_logits(other[known], target[known])
        return loss


def validation_dice(model, pairs: list[Pair], batch_size: int = 16) -> list[float]:
    """Dice per pair at the working size, on the pair's own convention channel, after post-processing."""
    import torch

    scores = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = torch.from_numpy(np.stack([prepare_input(p.image, p.image.shape[0]) for p in chunk])[:, None])
            probabilities = torch.sigmoid(model(batch)).numpy()
            for pair, probability in zip(chunk, probabilities, strict=True):
                predicted = clean_mask(probability[pair.convention] >= 0.5)
                scores.append(dice_iou(predicted, pair.lung, pair.ignore)[0])
    return scores


def train_lung_model(frame: pd.DataFrame, out: str | Path, config: LungTrainConfig | None = None, *,
                     default_convention: str | None = None, progress: bool = True,
                     log: Callable[[str], None] = print) -> TrainReport:
    """Train the lung U-Net on the mask rows of a manifest and write the best epoch to ``out``.

    Args:
        frame: a manifest (rows without ``mask_path`` are ignored).
        out: checkpoint file to write (atomically).
        config: hyper-parameters; defaults to :class:`LungTrainConfig`.
        default_convention: mask convention of rows that do not state one (see :func:`mask_rows`).
        progress: show progress bars.
        log: where one-line messages go.

    Raises:
        ManifestError: no mask rows, unknown conventions.
        ConfigError: no usable training or validation pair.
    """
    import torch

    from lungscreen.models import create, save_checkpoint

    config = config or LungTrainConfig()
    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rows = with_splits(mask_rows(frame, default_convention), seed=config.seed)
    train_rows, val_rows = rows[rows["split"] == "train"], rows[rows["split"] == "val"]
    if config.max_pairs is not None:
        train_rows = train_rows.sample(min(config.max_pairs, len(train_rows)), random_state=config.seed)
        val_rows = val_rows.sample(min(max(2, config.max_pairs // 4), len(val_rows)), random_state=config.seed)
    train_pairs, skipped = load_pairs(train_rows, config.size, progress, "reading training pairs")
    val_pairs, val_skipped = load_pairs(val_rows, config.size, progress, "reading validation pairs")
    skipped += val_skipped
    if not train_pairs or not val_pairs:
        raise ConfigError(f"lung training needs usable pairs in both the train and val splits "
                          f"(got {len(train_pairs)} and {len(val_pairs)}; {len(skipped)} skipped)")
    counts = {f"{split}:{c}": int(n) for (split, c), n in
              rows[rows["split"].isin(["train", "val"])].groupby(["split", "mask_convention"]).size().items()}
    log(f"lung U-Net: {len(train_pairs)} training and {len(val_pairs)} validation pairs at {config.size} px "
        f"({', '.join(f'{k} {v}' for k, v in counts.items())}); {len(skipped)} skipped")

    model = create(MODEL_NAME, num_classes=len(CONVENTIONS), in_channels=1, channels=list(config.channels),
                   num_res_units=config.num_res_units)
    dataset = PairDataset(train_pairs, augmentation(config.seed, config.size))
    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                         generator=generator, num_workers=0)
    if len(loader) == 0:
        raise ConfigError(f"batch_size {config.batch_size} is larger than the {len(dataset)} training pairs")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.epochs * len(loader),
                                                   pct_start=0.15)
    criterion = ConventionLoss(config.containment_weight)
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict] = (-1.0, -1, {})
    with progress_or_quiet(progress) as bar:
        task = bar.add_task("training lung U-Net", total=config.epochs * len(loader))
        for epoch in range(config.epochs):
            model.train()
            losses = []
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(batch["image"]), batch["lung"], batch["ignore"], batch["convention"])
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
                bar.advance(task)
            scores = validation_dice(model, val_pairs)
            record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_dice": float(np.mean(scores))}
            history.append(record)
            log(f"epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f}, val Dice {record['val_dice']:.4f}")
            if record["val_dice"] > best[0]:
                best = (record["val_dice"], epoch + 1, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    extra = {
        "config": asdict(config),
        "history": history,
        "best_epoch": best[1],
        "val_dice": best[0],
        "train_patients": sorted(set(train_rows["patient_id"].astype(str))),
        "pairs": {"train": len(train_pairs), "val": len(val_pairs), "skipped": len(skipped)},
        "conventions": list(CONVENTIONS),
    }
    path = save_checkpoint(out, model, class_names=list(CONVENTIONS),
                           preprocessing={"input_size": config.size, "equalize": True}, extra=extra)
    return TrainReport(Path(path), best[1], best[0], history, extra["pairs"], skipped, time.perf_counter() - started)
