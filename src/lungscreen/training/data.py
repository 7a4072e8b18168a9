"""Feeding images to training: an in-memory store of preprocessed images and a Dataset over the manifest.

Samples are dicts, as in torchxrayvision: ``image`` (float32 ``(C, S, S)``, the model's input), the
task's targets, ``patient``, ``source``, ``path`` and ``index``. The targets by kind of task:

* multi-class: ``label`` (class index); multi-label: ``label`` (float multi-hot, one per label);
* segmentation: ``mask`` and ``known`` (float ``(channels, S, S)``) and ``labelled`` (bool per channel),
  from :meth:`~lungscreen.data.labels.Task.segmentation_targets`;
* detection: nothing of its own; every sample carries ``target_boxes`` ((n, 4) xyxy in input pixels);
* multi-task: one dict of those per head, each with ``present`` (False where the image has no label
  for that head: it then adds nothing to that head's loss).

Images go through the one input path (:mod:`lungscreen.preprocessing.model_input`): decoded and
preprocessed once (through the preprocessing cache when one is set), kept as the 8-bit picture at every
size the run's stages use, then scaled, augmented and normalised per item. Masks and boxes travel in the
same :class:`~lungscreen.preprocessing.transforms.Sample` through crops, resizing and augmentation.

Each item's random draws come from the seed its :class:`~lungscreen.training.sampling.SampleKey` carries,
so an epoch's augmentations are a function of the run seed alone: a resumed run replays them exactly,
however many loader workers there are.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from lungscreen.data.labels import Task
from lungscreen.data.manifest import LUNG_BOX_LABELS
from lungscreen.errors import LungscreenError
from lungscreen.models.inference_spec import InputSpec
from lungscreen.preprocessing import Pipeline, Sample, preprocess_file, read_sample
from lungscreen.preprocessing.model_input import fit, normalize, scale
from lungscreen.preprocessing.transforms import IGNORE, REFERENCE, PreprocessingError, to_uint8
from lungscreen.training.sampling import SampleKey

#: Name of the only head of a single-task model (as in its inference spec).
SINGLE_HEAD = "output"


# ---------------------------------------------------------------------------------------------------------
# Image store
# ---------------------------------------------------------------------------------------------------------

def preprocessed_row(row: Mapping[str, Any], pipeline: Pipeline, *, cache_dir: str | None = None,
                     already_applied: bool = False, with_masks: bool = False) -> Sample:
    """A manifest row's image (with its reference mask and boxes) through the run's preprocessing.

    ``already_applied``: the manifest points at pictures ``lungscreen preprocess`` made with this pipeline;
    they are read as they are (the 8-bit picture the pipeline produced). ``with_masks``: the mask is a
    training target, so an empty one is refused (a row that teaches nothing but "no lungs here").

    Raises:
        LungscreenError: unreadable image or mask, a mask of another picture, a blank image, an empty mask.
    """
    mask_path = str(row.get("mask_path", "") or "") or None
    if already_applied:
        sample = read_sample(str(row["image_path"]), mask_path, dict(row))
        sample = sample.replace(image=to_uint8(sample.image)).framed()
    else:
        sample = preprocess_file(pipeline, str(row["image_path"]), mask_path, dict(row), cache_dir=cache_dir)
    if with_masks and REFERENCE in sample.masks and not sample.masks[REFERENCE].any():
        raise PreprocessingError(f"{mask_path}: empty lung mask (no lung pixel); a mask target needs drawn lungs")
    return sample


class ImageStore:
    """Every image of a frame, preprocessed once and kept in memory at each size the run needs.

    Rows whose image cannot be used (unreadable, blank, a mask of another picture...) are left out after
    :meth:`load_all`, each with its reason in :attr:`failures`: a run reports them and goes on with the rest.

    The store holds images, not answers: stages that read the same images with other targets (a
    self-supervised stage, then the supervised one) share the pictures through :meth:`with_rows`, each
    with its own rows.

    Args:
        frame: the rows.
        pipeline: the run's preprocessing.
        sizes: the square sides the stages use (each image is kept at each of them).
        cache_dir: the preprocessing disk cache (worth it for lung segmentation).
        already_applied: the manifest holds pictures ``lungscreen preprocess`` already made.
        with_masks: keep the reference masks and boxes (segmentation and detection targets).
    """

    def __init__(self, frame: pd.DataFrame, pipeline: Pipeline, sizes: Iterable[int], *,
                 cache_dir: str | None = None, already_applied: bool = False, with_masks: bool = False) -> None:
        self.frame = frame.reset_index(drop=True)
        self.pipeline, self.sizes = pipeline, sorted(set(sizes))
        self.cache_dir, self.already_applied, self.with_masks = cache_dir, already_applied, with_masks
        self._samples: list[dict[int, Sample]] = []
        self._paths = self.frame["image_path"].astype(str).tolist()  # the images asked for, in order
        self._kept = np.arange(len(self.frame))  # their positions that loaded
        self.failures: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.frame)

    def load_all(self, progress: Callable[[int], None] | None = None) -> None:
        """Read and preprocess every image now (one pass, so epochs never touch the disk); the rows that
        fail leave :attr:`frame` and are listed in :attr:`failures`."""
        kept = []
        for i, row in enumerate(self.frame.to_dict("records")):
            try:
                self._samples.append(self._load(row))
                kept.append(i)
            except LungscreenError as error:
                self.failures.append((str(row["image_path"]), str(error)))
            if progress is not None:
                progress(i)
        self._kept = np.asarray(kept, dtype=np.int64)
        self.frame = self.frame.iloc[kept].reset_index(drop=True)

    def with_rows(self, frame: pd.DataFrame) -> ImageStore:
        """These images under another stage's rows: the same image paths in the same order, with that
        stage's own columns (its targets above all); rows that failed to load stay out.

        Raises:
            ValueError: ``frame`` lists other images than the store was loaded from.
        """
        frame = frame.reset_index(drop=True)
        if frame["image_path"].astype(str).tolist() != self._paths:
            raise ValueError("with_rows: the frame lists other images than this store was loaded from")
        view = copy.copy(self)
        view.frame = frame.iloc[self._kept].reset_index(drop=True)
        return view

    def _load(self, row: Mapping[str, Any]) -> dict[int, Sample]:
        sample = preprocessed_row(row, self.pipeline, cache_dir=self.cache_dir, already_applied=self.already_applied,
                                  with_masks=self.with_masks)
        if not self.with_masks:
            sample = sample.replace(masks={}, boxes=np.zeros((0, 4), np.float32), box_labels=[])
        return {size: fit(sample, size) for size in self.sizes}

    def sample(self, i: int, size: int) -> Sample:
        """Image ``i`` (of :attr:`frame`) as the 8-bit picture at ``size`` x ``size``, with its masks and boxes."""
        return self._samples[i][size]


# ---------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------

class ManifestDataset(Dataset):
    """Samples of a loaded store's rows (from ``for_task``: with ``target``, or ``target/<head>`` per head).

    Args:
        store: the rows and their images (shared between the stages of a run).
        image_size: side of the served images.
        spec: the model's input spec (scaling and channels after augmentation).
        task: the task, or head name -> task for a multi-task model.
        augment: a v2 transform applied to the image (and masks and boxes), or None.
    """

    def __init__(self, store: ImageStore, image_size: int, spec: InputSpec, task: Task | Mapping[str, Task],
                 augment: v2.Transform | None = None) -> None:
        self.frame = store.frame
        self.store, self.image_size, self.spec, self.augment = store, image_size, spec, augment
        self.heads = dict(task) if isinstance(task, Mapping) else None
        self.task = None if self.heads else task
        self.detection = next((t for t in (self.heads or {"": task}).values() if t.kind == "detection"), None)
        self.targets = self.frame["target"].to_numpy(dtype=np.int64)  # what class balancing counts

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        index, seed = (key.index, key.seed) if isinstance(key, SampleKey) else (int(key), None)
        sample = self.store.sample(index, self.image_size)
        image, masks, boxes = self._augmented(sample, seed)
        row = self.frame.iloc[index]
        item: dict[str, Any] = {"image": normalize(image, self.spec), "patient": str(row["patient_id"]),
                                "source": str(row["source"]), "path": str(row["image_path"]), "index": index,
                                "target_boxes": detection_boxes(self.detection, boxes, sample.box_labels, masks)}
        if self.heads is None:
            item.update(targets(self.task, int(row["target"]), masks, self.image_size))
        else:
            for name, task in self.heads.items():
                value = int(row[f"target/{name}"])
                item[name] = {**targets(task, max(value, 0), masks, self.image_size, fill=value < 0),
                              "present": value >= 0}
        return item

    def _augmented(self, sample: Sample, seed: int | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(image (1, S, S) in [0, 1], masks (2, S, S) reference + unknown or None, boxes (N, 4))."""
        size = self.image_size
        image = tv_tensors.Image(scale(sample.image))
        masks = None
        if REFERENCE in sample.masks:
            unknown = sample.masks.get(IGNORE, np.zeros_like(sample.masks[REFERENCE]))
            masks = tv_tensors.Mask(torch.from_numpy(np.stack([sample.masks[REFERENCE], unknown]).astype(np.uint8)))
        boxes = tv_tensors.BoundingBoxes(torch.as_tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4),
                                         format="XYXY", canvas_size=(size, size))
        if self.augment is not None and seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out = self.augment({"image": image, "masks": masks, "boxes": boxes})
            image, masks, boxes = out["image"].clamp(0.0, 1.0), out["masks"], v2.ClampBoundingBoxes()(out["boxes"])
        return image.as_subclass(torch.Tensor), masks, boxes.as_subclass(torch.Tensor)


def targets(task: Task, target: int, masks: torch.Tensor | None, size: int, *,
            fill: bool = False) -> dict[str, torch.Tensor]:
    """The training targets of one image for ``task`` (zeros of the right shape when ``fill``: no label)."""
    if task.kind == "multiclass":
        return {"label": torch.tensor(target, dtype=torch.int64)}
    if task.kind == "multilabel":
        hot = np.zeros(len(task.classes), np.float32) if fill else task.multi_hot(target)
        return {"label": torch.from_numpy(hot)}
    if task.kind == "detection":
        return {}  # the boxes travel beside the image (``boxes``), whatever the head
    if masks is None:
        if not fill:
            raise ValueError("a segmentation target needs the row's reference mask")
        masks = torch.zeros((2, size, size), dtype=torch.uint8)
    lung, unknown = masks[0].numpy() > 0, masks[1].numpy() > 0
    mask, known, labelled = task.segmentation_targets(target, lung, unknown)
    if fill:
        known[:], labelled[:] = 0.0, False
    return {"mask": torch.from_numpy(mask), "known": torch.from_numpy(known), "labelled": torch.from_numpy(labelled)}


def detection_boxes(task: Task | None, boxes: torch.Tensor, labels: Sequence[str],
                    masks: torch.Tensor | None) -> torch.Tensor:
    """The true boxes of an image for a detection task: the finding boxes (lung boxes left out), or for a
    task on the mask convention one box around each lung of the (augmented) reference mask."""
    if task is None:
        return boxes
    if task.column == "mask_convention":
        return mask_boxes(masks[0]) if masks is not None else torch.zeros((0, 4))
    keep = [label not in LUNG_BOX_LABELS for label in labels]
    return boxes[torch.tensor(keep, dtype=torch.bool)] if len(keep) else boxes.reshape(0, 4)


def mask_boxes(mask: torch.Tensor, min_fraction: float = 0.1) -> torch.Tensor:
    """(n, 4) xyxy boxes around the connected regions of a mask (right and left lung), largest first,
    leaving out specks smaller than ``min_fraction`` of the largest region (both in pixels)."""
    import cv2

    count, regions, stats, _ = cv2.connectedComponentsWithStats(mask.numpy().astype(np.uint8), connectivity=8)
    if count <= 1:
        return torch.zeros((0, 4))
    areas = stats[1:, cv2.CC_STAT_AREA]
    kept = [1 + i for i in np.argsort(-areas) if areas[i] >= min_fraction * areas.max()]
    from torchvision.ops import masks_to_boxes

    boxes = masks_to_boxes(torch.from_numpy(np.stack([regions == k for k in kept])))
    return boxes + torch.tensor([0.0, 0.0, 1.0, 1.0])  # pixel edges: a region's last column ends one pixel on


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors (nested per head), keep text as lists and boxes as a list (their number varies)."""
    boxes = [sample["target_boxes"] for sample in samples]
    batch = default_collate([{key: value for key, value in sample.items() if key != "target_boxes"} for sample in samples])
    batch["target_boxes"] = boxes
    return batch
