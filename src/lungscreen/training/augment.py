"""Named augmentation sets (``data.augment``), from ``torchvision.transforms.v2``.

Each set is a v2 transform applied to a dict holding a ``tv_tensors.Image`` and, when the task needs them,
a ``tv_tensors.Mask`` (the reference mask and its unknown pixels) and ``tv_tensors.BoundingBoxes``:
torchvision moves masks (nearest neighbour) and boxes with every geometric draw and leaves them alone
in the intensity ones, so a segmentation or detection target always covers the pixels it did before.
"""

from __future__ import annotations

from collections.abc import Callable

from torchvision.transforms import v2

from lungscreen.errors import ConfigError


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


def lungs_augment() -> v2.Transform:
    """The lung U-Net's set: rotation +-10 deg, scale +-12 %, shift +-8 %, then (each with probability 0.3)
    contrast +-30 % and Gaussian noise (sigma 0.02). No flips: the heart is on the left, and the
    heart-excluded masks depend on it."""
    return v2.Compose([
        v2.RandomApply([v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.88, 1.12))], p=0.9),
        v2.RandomApply([v2.ColorJitter(contrast=0.3)], p=0.3),
        v2.RandomApply([v2.GaussianNoise(sigma=0.02, clip=True)], p=0.3),
    ])


#: Named augmentation sets a config can ask for (``data.augment``).
AUGMENTATIONS: dict[str, Callable[[], v2.Transform]] = {
    "covidnet": covidnet_augment,
    "covid_resnet": covid_resnet_augment,
    "ct_polsinelli": ct_polsinelli_augment,
    "light": light_augment,
    "lungs": lungs_augment,
}


def build_augment(name: str | None, key: str = "data.augment") -> v2.Transform | None:
    """The named set, or None for no augmentation."""
    if name in (None, "", "none"):
        return None
    if name not in AUGMENTATIONS:
        raise ConfigError(f"{key}: unknown augmentation {name!r}; choose one of none, {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]()
