"""Self-supervised pre-training as a stage (``objective: simclr``): any zoo backbone learns from unlabelled images.

No ImageNet weights can be downloaded here, and 746 labelled CT slices are too few for a network from
scratch. SimCLR (Chen et al. 2020; the self-supervised half of Self-Trans, He et al. 2020, on the same
UCSD slices) needs no labels: two random views of the same image must land close together in a projection
space and away from the views of the other images of the batch. lightly provides the pieces - the two-view
transform, the projection head, the NT-Xent loss - and the engine provides the rest (resume, bf16, DDP,
seeded augmentation).

How it runs in the engine:

- rows: every image of the stage's modality (and views, sources) whatever its label, except the test
  split (never seen, not even without labels); validation: the val split, whose images are also among
  the training rows (its loss only shows convergence, no figure is chosen on it beyond the stage's best
  epoch by that loss);
- a sample's ``image`` is its two views stacked, ``(2, C, S, S)``: lightly's ``SimCLRTransform`` on the
  8-bit picture (grayscale: no hue or saturation jitter), drawn from the item's own seed;
- :class:`Pretrainer` (a :class:`~lungscreen.training.heads.TrainingHead`) wraps the stage's model: backbone ``features`` -> lightly's SimCLR projection head;
  the head is dropped afterwards, and the stage's checkpoints hold the backbone (with its own, untrained
  classifier), which any recipe starts from with ``model.init_from: RUN`` (the head is swapped when the
  classes differ).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lungscreen.data.labels import Task
from lungscreen.training.data import ManifestDataset
from lungscreen.training.heads import TrainingHead, embedding_width
from lungscreen.training.objectives import Objective
from lungscreen.training.sampling import SampleKey

OBJECTIVES = ("supervised", "simclr")


class Pretrainer(TrainingHead):
    """A backbone and a projection head: ``(N, 2, C, S, S)`` view pairs -> ``(N, 2, out_dim)`` projections.

    Args:
        backbone: a zoo classifier (``features`` gives its pooled embedding); trained in place.
        hidden_dim: width of the projection head's hidden layer.
        out_dim: dimension of the space the loss compares views in.
    """

    def __init__(self, backbone: nn.Module, *, hidden_dim: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        from lightly.models.modules import SimCLRProjectionHead

        if not hasattr(backbone, "features"):
            raise ValueError(f"{type(backbone).__name__} has no features(): it cannot be pre-trained contrastively")
        self.backbone = backbone
        self.projection = SimCLRProjectionHead(embedding_width(backbone), hidden_dim, out_dim)

    def forward(self, views: Tensor) -> Tensor:
        pairs = views.shape[0]
        flat = views.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        return self.projection(self.backbone.features(flat)).view(pairs, 2, -1)

    def layer_groups(self) -> list[nn.Module]:
        """The backbone's groups without its classifier, then the projection head."""
        return [*self.backbone.layer_groups()[:-1], self.projection]


class ContrastiveObjective(Objective):
    """NT-Xent (lightly) between the two views of every image, the other images of the batch as negatives."""

    kind = "contrastive"

    def __init__(self, task: Task, temperature: float = 0.1) -> None:
        super().__init__(task)
        from lightly.loss import NTXentLoss

        self.criterion = NTXentLoss(temperature=temperature)

    def loss(self, projections: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return self.criterion(projections[:, 0].float(), projections[:, 1].float())

    def keep(self, projections: Tensor, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {"row": np.arange(len(projections))}

    def figures(self, kept: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {}  # the validation loss (logged by the module) is the figure


class TwoViewDataset(ManifestDataset):
    """Each item's ``image`` is two random views of its picture, ``(2, C, S, S)`` (lightly's SimCLR views).

    Args:
        min_scale: smallest share of the picture a view's random crop keeps.
        rotation: largest rotation of a view in degrees (applied with probability 0.5).
        (the others as :class:`~lungscreen.training.data.ManifestDataset`, without ``augment``)
    """

    def __init__(self, *args: Any, min_scale: float = 0.3, rotation: float = 15.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from lightly.transforms import SimCLRTransform

        self.transform = SimCLRTransform(input_size=self.image_size, cj_prob=0.8, cj_strength=0.5, cj_bright=0.8,
                                         cj_contrast=0.8, cj_sat=0.0, cj_hue=0.0, min_scale=min_scale,
                                         random_gray_scale=0.0, gaussian_blur=0.5, hf_prob=0.5, rr_prob=0.5,
                                         rr_degrees=rotation, normalize=None)

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        from PIL import Image

        from lungscreen.preprocessing.model_input import normalize

        index, seed = (key.index, key.seed) if isinstance(key, SampleKey) else (int(key), index_seed(int(key)))
        picture = Image.fromarray(self.store.sample(index, self.image_size).image)
        with seeded(seed):
            views = torch.stack([view.float() for view in self.transform(picture)])  # (2, 1, S, S) in [0, 1]
        row = self.frame.iloc[index]
        return {"image": normalize(views, self.spec), "patient": str(row["patient_id"]), "source": str(row["source"]),
                "path": str(row["image_path"]), "index": index, "target_boxes": torch.zeros((0, 4))}


def index_seed(index: int) -> int:
    """A fixed seed for unseeded reads (validation): the same two views every epoch."""
    return int(np.random.SeedSequence([index, 7]).generate_state(1)[0])


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch, NumPy and Python random drawn from ``seed`` inside, their states restored after (lightly's
    blur draws from NumPy's global generator)."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


def unlabelled_rows(manifest: Any, data: Any, views: tuple[str, ...] | None) -> dict[str, Any]:
    """The rows of a contrastive stage per split: every image of the modality (labels unused) but the test
    split's for training; the val split for validation."""
    frame = manifest[manifest["modality"] == data.modality]
    if views is not None:
        frame = frame[frame["view"].isin(views)]
    if data.sources:
        frame = frame[frame["source"].isin(data.sources)]
    frame = frame.assign(target=0, target_name="")
    return {data.train_split: frame[frame["split"] != data.test_split].reset_index(drop=True),
            data.val_split: frame[frame["split"] == data.val_split].reset_index(drop=True),
            data.test_split: frame.iloc[0:0].reset_index(drop=True)}
