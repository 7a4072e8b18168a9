"""Class balancing for training batches, the same in one process and under DDP.

COVID-19 images are a small minority of every public chest X-ray set, so each paper balances: COVID-Net
gives a share of every batch's slots to COVID-19 images (``covid_percent``), Tartaglione et al. balance the
training set (undersampling the larger class where they cannot add data), and weighted sampling draws each
class equally often.

:class:`EpochSampler` draws one epoch's *global* order of images from ``(seed, epoch)`` alone, cut into
global batches; each process then takes its own contiguous part of every global batch. So the global batch
of step ``t`` - the set of images whose gradients DDP averages - is the same whatever the number of
processes, the balancing of every update is kept exactly, and a resumed run replays the same order. Every
item also carries its own augmentation seed (:class:`SampleKey`), so an image drawn twice in an epoch gets
two different augmentations, and the data loader's workers need no random state of their own.

Source-balanced sampling (``source_label``) is the lever against the field's best-known shortcut: in the
public COVID-19 sets the label is largely predictable from the hospital, and a network learns the hospital
first. It draws each (source, class) cell equally often among the sources that hold every class, so within
a batch the label carries no information about the source; sources missing a class (NIH's or OpenIST's
negatives) are left out or given a small fixed share (``partial_share``), so they cannot carry the label on
their own.

MultiCheXNet's alternating training (paper 001, Algorithm 1) is one more method: ``alternate`` reads the
targets as the *data set* of each image (its group; -1 leaves it out) and makes every batch from one group,
the groups taking turns; a group with fewer batches starts again on a fresh order, so an epoch ends when the
largest group has been seen once.

Example:
    >>> sampler = EpochSampler([0, 0, 0, 0, 0, 0, 1], method="covid_percent", batch_size=4, positive=1)
    >>> [int(k.index == 6) for k in list(sampler)[:4]].count(1)   # 2 of 4 slots hold the positive image
    2
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
from torch.utils.data import Sampler

METHODS = ("none", "covid_percent", "weighted", "undersample", "alternate", "source_label")


class SampleKey(NamedTuple):
    """What the data set reads for one item of a batch: which image, and the seed of its augmentation."""

    index: int
    seed: int


def balanced_class_weights(targets: Sequence[int], num_classes: int) -> np.ndarray:
    """Inverse class frequency ``n / (k * count_c)`` (scikit-learn's "balanced"); absent classes get 0."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


class EpochSampler(Sampler[SampleKey]):
    """One process's share of a balanced, seeded epoch order.

    Args:
        targets: class index of every training image.
        method: ``none`` (shuffle), ``covid_percent``, ``weighted``, ``undersample`` or ``alternate``
            (``targets`` are then group numbers, -1 for images of no group).
        batch_size: the *global* batch size (all processes together); must divide by ``world_size``.
        seed: run seed; the order of an epoch depends on ``(seed, epoch)`` only.
        positive: class index given the ``covid_percent`` share of slots.
        covid_percent: share of each batch's slots drawn from the positive class (COVID-Net: 0.5 by default).
        rank: this process's rank.
        world_size: number of processes.
        sources: the source of every training image (``source_label`` balancing).
        partial_sources: ``weight`` (sources missing a class get ``partial_share`` of the draws) or
            ``exclude`` (they are left out).
        partial_share: share of draws given to the sources missing a class, when weighted.
        source_weights: ``size`` or ``equal`` (see :func:`source_label_weights`).
    """

    def __init__(self, targets: Sequence[int], *, method: str = "none", batch_size: int = 32, seed: int = 0,
                 positive: int | None = None, covid_percent: float = 0.5, rank: int = 0, world_size: int = 1,
                 sources: Sequence[str] | None = None, partial_sources: str = "weight",
                 partial_share: float = 0.1, source_weights: str = "size") -> None:
        if method not in METHODS:
            raise ValueError(f"unknown balancing method {method!r}; choose one of {', '.join(METHODS)}")
        if batch_size % world_size:
            raise ValueError(f"the global batch size {batch_size} does not divide by {world_size} processes")
        self.targets = np.asarray(targets, dtype=np.int64)
        if len(self.targets) == 0:
            raise ValueError("no training images")
        self.method = method
        self.batch_size = batch_size
        self.seed = seed
        self.positive = positive
        self.covid_percent = covid_percent
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        if method == "covid_percent":
            if positive is None or not (self.targets == positive).any():
                raise ValueError("covid_percent balancing needs positive images in the training set")
            if (self.targets != positive).sum() == 0:
                raise ValueError("covid_percent balancing needs negative images in the training set")
        if method == "alternate" and not (self.targets >= 0).any():
            raise ValueError("alternate batches need images in at least one group")
        self.draw_weights = source_label_weights(self.targets, sources, partial_sources, partial_share,
                                                 source_weights) if method == "source_label" else None

    @property
    def per_rank_batch(self) -> int:
        return self.batch_size // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch (also after a resume, with the epoch it resumes)."""
        self.epoch = epoch

    def global_order(self, epoch: int | None = None) -> np.ndarray:
        """Image indices of one epoch for all processes, a whole number of global batches long."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        order = getattr(self, f"_order_{self.method}")(rng)
        full = len(order) // self.batch_size * self.batch_size
        if full == 0:  # fewer images than one batch: repeat them to fill one
            order = np.resize(order, self.batch_size)
            full = self.batch_size
        return order[:full]

    def __iter__(self) -> Iterator[SampleKey]:
        order = self.global_order()
        batches = order.reshape(-1, self.batch_size)
        seeds = np.random.default_rng([self.seed, self.epoch, 1]).integers(0, 2**31 - 1, size=batches.shape)
        part = slice(self.rank * self.per_rank_batch, (self.rank + 1) * self.per_rank_batch)
        for indices, draws in zip(batches[:, part], seeds[:, part]):
            for index, draw in zip(indices, draws):
                yield SampleKey(int(index), int(draw))

    def __len__(self) -> int:
        return len(self.global_order()) // self.world_size

    # ---- the methods -------------------------------------------------------------------------------
    def _order_none(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(len(self.targets))

    def _order_weighted(self, rng: np.random.Generator) -> np.ndarray:
        counts = np.bincount(self.targets)
        weights = 1.0 / counts[self.targets]
        return rng.choice(len(self.targets), size=len(self.targets), replace=True, p=weights / weights.sum())

    def _order_source_label(self, rng: np.random.Generator) -> np.ndarray:
        """As many draws as images, with replacement, by :func:`source_label_weights`."""
        eligible = int(np.count_nonzero(self.draw_weights))
        return rng.choice(len(self.targets), size=eligible, replace=True, p=self.draw_weights)

    def _order_undersample(self, rng: np.random.Generator) -> np.ndarray:
        classes = np.unique(self.targets)
        smallest = min(int((self.targets == c).sum()) for c in classes)
        chosen = [rng.choice(np.flatnonzero(self.targets == c), size=smallest, replace=False) for c in classes]
        return rng.permutation(np.concatenate(chosen))

    def _order_alternate(self, rng: np.random.Generator) -> np.ndarray:
        """Whole batches of one group at a time, the groups in turn (module docstring)."""
        groups = [np.flatnonzero(self.targets == g) for g in np.unique(self.targets[self.targets >= 0])]
        rounds = max(max(1, len(members) // self.batch_size) for members in groups)
        batches = []
        for members in groups:
            repeats = -(-rounds * self.batch_size // len(members))  # fresh orders until the rounds are filled
            order = np.concatenate([rng.permutation(members) for _ in range(repeats)])
            batches.append(order[:rounds * self.batch_size].reshape(rounds, self.batch_size))
        return np.stack(batches, axis=1).reshape(-1)

    def _order_covid_percent(self, rng: np.random.Generator) -> np.ndarray:
        """COVID-Net's scheme: walk the negatives in batches; in each, hand ``covid_percent`` of the slots
        (at least one) to positives drawn at random, without repeats inside a batch where possible."""
        negatives = rng.permutation(np.flatnonzero(self.targets != self.positive))
        positives = np.flatnonzero(self.targets == self.positive)
        batches = max(1, len(negatives) // self.batch_size)
        order = np.resize(negatives, batches * self.batch_size).reshape(batches, self.batch_size)
        share = max(int(self.batch_size * self.covid_percent), 1)
        for row in order:
            slots = rng.choice(self.batch_size, size=share, replace=False)
            row[slots] = rng.choice(positives, size=share, replace=len(positives) < share)
        return order.reshape(-1)


def source_label_weights(targets: Sequence[int], sources: Sequence[str] | None, partial_sources: str = "weight",
                         partial_share: float = 0.1, source_weights: str = "size") -> np.ndarray:
    """Per image, the probability of being drawn so that the class is independent of the source.

    Within each source holding every class present, every class gets the same share of that source's draws;
    the sources themselves weigh by their number of images (``size``) or alike (``equal``: then every (source,
    class) cell weighs the same, but a small source's few images are drawn over and over - Figure 1's five
    negatives would fill a sixth of a binary run's draws). The sources missing a class share
    ``partial_share`` of the draws (their cells alike within each) or none (``partial_sources="exclude"``).

    Raises:
        ValueError: no sources given, or no source holds every class (the label cannot be made independent
            of the source).

    Example:
        >>> w = source_label_weights([1, 0, 0, 0, 1, 0], ["a", "a", "a", "b", "b", "c"], "exclude", source_weights="equal")
        >>> [round(float(x), 3) for x in w]      # a's one positive weighs what its two negatives weigh
        [0.25, 0.125, 0.125, 0.25, 0.25, 0.0]
    """
    if sources is None or len(sources) != len(targets):
        raise ValueError("source_label balancing needs the source of every training image")
    if partial_sources not in ("weight", "exclude"):
        raise ValueError(f"partial_sources must be weight or exclude, got {partial_sources!r}")
    targets, sources = np.asarray(targets, dtype=np.int64), np.asarray(sources, dtype=object)
    classes = set(np.unique(targets).tolist())
    complete = [s for s in sorted(set(sources)) if set(targets[sources == s].tolist()) == classes]
    partial = [s for s in sorted(set(sources)) if s not in complete]
    if not complete or len(classes) < 2:
        raise ValueError("source_label balancing needs a source holding every class of the training images "
                         f"(classes {sorted(classes)}; no source holds them all)")
    if source_weights not in ("size", "equal"):
        raise ValueError(f"source_weights must be size or equal, got {source_weights!r}")
    share = partial_share if partial and partial_sources == "weight" else 0.0
    weights = np.zeros(len(targets))
    for group, total in ((complete, 1.0 - share), (partial, share)):
        sizes = np.array([np.sum(sources == source) for source in group], dtype=np.float64)
        of_group = sizes / sizes.sum() if source_weights == "size" else np.full(len(group), 1.0 / max(len(group), 1))
        for source, source_share in zip(group, of_group, strict=True):
            cells = np.unique(targets[sources == source])
            for cell in cells:
                members = (sources == source) & (targets == cell)
                weights[members] = total * source_share / len(cells) / members.sum()
    return weights / weights.sum()
