"""Feeding images to training: a Dataset over the manifest, an in-memory image store, augmentations.

Samples are dicts, as in torchxrayvision: ``image`` (float32 ``(1, S, S)`` in [0, 1]), ``label`` (class
index), ``patient``, ``source``, ``path`` and, when asked for, ``mask`` (bool ``(S, S)``) and ``boxes``
(``(N, 4)`` float, x0 y0 x1 y1 in the ``S x S`` frame).

Decoding a 512-px JPEG and preprocessing it costs far more than a small network's step on a CPU, so every
image is read and preprocessed once (through the preprocessing cache when the pipeline is expensive), kept
in memory as uint8 at the largest size the run needs, and resized from there per stage. An epoch then
costs only augmentation and the network.

Augmentations are named sets built from ``torchvision.transforms.v2`` (:data:`AUGMENTATIONS`). Each item's
random draws come from the seed its :class:`~lungscreen.training.sampling.SampleKey` carries, so an
epoch's augmentations are a function of the run seed alone: a resumed run replays them exactly, however
many loader workers there are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from lungscreen.data.manifest import boxes_for_size
from lungscreen.errors import ConfigError, LungscreenError
from lungscreen.io.images import read_image, read_mask
from lungscreen.training.sampling import SampleKey

# ---------------------------------------------------------------------------------------------------------
# Augmentation sets
# ---------------------------------------------------------------------------------------------------------

def covidnet_augment() -> v2.Transform:
    """COVID-Net (paper 004 and its public training script): translation +-10 %, rotation +-10 deg, zoom
    0.85-1.15, horizontal flip, intensity (brightness) x0.9-1.1."""
    return v2.Compose([
        v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.85, 1.15)),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.1),
    ])


def covid_resnet_augment() -> v2.Transform:
    """COVID-ResNet (paper 003, fastai ``get_transforms``): flips, rotation up to 15 deg, lighting
    (brightness and contrast +-20 %, fastai's ``max_lighting=0.2``)."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomRotation(15),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
    ])


def ct_polsinelli_augment() -> v2.Transform:
    """Paper 002 (CT): rotation by a random angle in 0-90 deg, scale 1.1-1.3, additive Gaussian noise.
    The paper gives no noise level; sigma 0.02 (2 % of the intensity range) is our assumption."""
    return v2.Compose([
        v2.RandomRotation((0, 90)),
        v2.RandomAffine(degrees=0, scale=(1.1, 1.3)),
        v2.GaussianNoise(sigma=0.02, clip=True),
    ])


def light_augment() -> v2.Transform:
    """A mild set for the small CPU recipes: small shifts and rotations, horizontal flip, brightness."""
    return v2.Compose([
        v2.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.95, 1.05)),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.1, contrast=0.1),
    ])


#: Named augmentation sets a config can ask for (``data.augment``).
AUGMENTATIONS: dict[str, Callable[[], v2.Transform]] = {
    "covidnet": covidnet_augment,
    "covid_resnet": covid_resnet_augment,
    "ct_polsinelli": ct_polsinelli_augment,
    "light": light_augment,
}


def build_augment(name: str | None, key: str = "data.augment") -> v2.Transform | None:
    """The named set, or None for no augmentation."""
    if name in (None, "", "none"):
        return None
    if name not in AUGMENTATIONS:
        raise ConfigError(f"{key}: unknown augmentation {name!r}; choose one of none, {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]()


# ---------------------------------------------------------------------------------------------------------
# Preprocessing and resizing, shared with predict
# ---------------------------------------------------------------------------------------------------------

def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D image to ``size x size`` (area averaging when shrinking, bilinear when growing)."""
    if pixels.shape == (size, size):
        return pixels
    shrinking = size < min(pixels.shape)
    return cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


class Preprocessor:
    """Turns an image file into the run's base array: preprocessing pipeline, then resize, as uint8.

    Args:
        pipeline: a pipeline name or its dict (see :mod:`lungscreen.preprocessing`).
        base_size: side of the stored square image (the largest stage size of the run).
        cache_dir: the preprocessing disk cache (worth it for lung segmentation).
        already_applied: the manifest points at images ``lungscreen preprocess`` already produced with
            this pipeline: read them as they are (the checkpoint still records the pipeline, so ``predict``
            applies it to new images).
    """

    def __init__(self, pipeline: Any = "none", base_size: int = 224, cache_dir: str | None = None, *,
                 already_applied: bool = False) -> None:
        self.pipeline = load_pipeline(pipeline)
        self.base_size = base_size
        self.cache_dir = cache_dir
        self.already_applied = already_applied

    def describe(self) -> dict[str, Any]:
        """The dict stored in checkpoints so ``predict`` applies the same preprocessing."""
        return {"pipeline": self.pipeline.to_dict(), "base_size": self.base_size}

    def __call__(self, path: str, mask_path: str | None = None) -> np.ndarray:
        """uint8 ``(base_size, base_size)``; raises :class:`LungscreenError` subclasses for bad files."""
        from lungscreen.preprocessing import process_file

        if self.already_applied:
            pixels = read_image(path).pixels
        else:
            pixels = process_file(self.pipeline, path, mask_path=mask_path or None, cache_dir=self.cache_dir)
        return to_uint8(resize_square(np.asarray(pixels, dtype=np.float32), self.base_size))


def load_pipeline(spec: Any, key: str = "data.pipeline"):  # noqa: ANN201 - lungscreen.preprocessing.Pipeline
    """The preprocessing pipeline named or described by ``spec`` (None means ``none``)."""
    from lungscreen import preprocessing

    try:
        return preprocessing.load_pipeline("none" if spec is None else spec)
    except LungscreenError as error:
        raise ConfigError(f"{key}: {error}") from None


# ---------------------------------------------------------------------------------------------------------
# Image store and Dataset
# ---------------------------------------------------------------------------------------------------------

class ImageStore:
    """Every image of a frame, preprocessed once and kept in memory at the base size (uint8)."""

    def __init__(self, frame: pd.DataFrame, preprocessor: Preprocessor) -> None:
        self.paths = frame["image_path"].astype(str).tolist()
        self.masks = frame["mask_path"].astype(str).tolist() if "mask_path" in frame else [""] * len(frame)
        self.preprocessor = preprocessor
        self._base: list[np.ndarray | None] = [None] * len(self.paths)
        self._sized: dict[int, list[np.ndarray | None]] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def load_all(self, progress: Callable[[int], None] | None = None) -> None:
        """Read and preprocess every image now (one pass, so epochs never touch the disk)."""
        for i in range(len(self)):
            self.base(i)
            if progress is not None:
                progress(i)

    def base(self, i: int) -> np.ndarray:
        if self._base[i] is None:
            self._base[i] = self.preprocessor(self.paths[i], self.masks[i])
        return self._base[i]

    def get(self, i: int, size: int) -> np.ndarray:
        """The image ``i`` as uint8 ``(size, size)``; sizes other than the base are derived and kept."""
        if size == self.preprocessor.base_size:
            return self.base(i)
        sized = self._sized.setdefault(size, [None] * len(self))
        if sized[i] is None:
            sized[i] = resize_square(self.base(i), size)
        return sized[i]

    def keep_only(self, size: int) -> None:
        """Free the derived copies of other sizes (a stage changed size)."""
        for other in [s for s in self._sized if s != size]:
            del self._sized[other]


class ManifestDataset(Dataset):
    """Samples of a manifest frame (rows from ``for_task``: with ``target`` and ``target_name``).

    Args:
        frame: the rows to serve.
        store: their images (shared between the stages of a run).
        image_size: side of the served images.
        augment: a transform applied to the ``(1, S, S)`` float image, or None.
        with_extras: also serve ``mask`` and ``boxes`` (slower; for multi-task training and audits).
    """

    def __init__(self, frame: pd.DataFrame, store: ImageStore, image_size: int, augment: v2.Transform | None = None,
                 *, with_extras: bool = False) -> None:
        self.frame = frame.reset_index(drop=True)
        self.store = store
        self.image_size = image_size
        self.augment = augment
        self.with_extras = with_extras
        self.targets = self.frame["target"].to_numpy(dtype=np.int64)

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        index, seed = (key.index, key.seed) if isinstance(key, SampleKey) else (int(key), None)
        pixels = self.store.get(index, self.image_size)
        image = torch.from_numpy(pixels).to(torch.float32).div_(255.0).unsqueeze(0)
        if self.augment is not None and seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = self.augment(image).clamp_(0.0, 1.0)
        row = self.frame.iloc[index]
        sample = {"image": image, "label": int(self.targets[index]), "patient": str(row["patient_id"]),
                  "source": str(row["source"]), "path": str(row["image_path"])}
        if self.with_extras:
            sample["mask"] = self._mask(row)
            boxes = boxes_for_size(row, self.image_size, self.image_size)
            sample["boxes"] = torch.tensor([b[:4] for b in boxes], dtype=torch.float32).reshape(-1, 4)
        return sample

    def _mask(self, row: pd.Series) -> torch.Tensor | None:
        path = str(row.get("mask_path", "") or "")
        if not path:
            return None
        return torch.from_numpy(read_mask(path, (self.image_size, self.image_size)))


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and labels; keep per-item text, masks and boxes as lists (boxes vary in number)."""
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
    }
    for name in samples[0]:
        if name not in batch:
            batch[name] = [s[name] for s in samples]
    return batch
