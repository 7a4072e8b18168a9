"""Named augmentation sets (``data.augment``), from ``torchvision.transforms.v2``.

Each set is a v2 transform applied to a dict holding a ``tv_tensors.Image`` and, when the task needs them,
a ``tv_tensors.Mask`` (the reference mask and its unknown pixels) and ``tv_tensors.BoundingBoxes``:
torchvision moves masks (nearest neighbour) and boxes with every geometric draw and leaves them alone
in the intensity ones, so a segmentation or detection target always covers the pixels it did before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision import tv_tensors
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


def log_uniform(bounds: tuple[float, float]) -> float:
    """A draw from ``bounds`` uniform on a log scale, from torch's generator (seeded per item by the data set)."""
    low, high = torch.log(torch.tensor(bounds, dtype=torch.float64))
    return float(torch.exp(low + (high - low) * torch.rand(()).double()))


class RandomGamma(v2.Transform):
    """Gamma ``x ** g`` with ``g`` drawn log-uniformly from ``gamma`` (a detector's and a monitor's response
    curve; torchvision has the kernel, not the random transform). Images only: masks and boxes pass."""

    def __init__(self, gamma: tuple[float, float] = (0.7, 1.5)) -> None:
        super().__init__()
        self.gamma = gamma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"gamma": log_uniform(self.gamma)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        return v2.functional.adjust_gamma(inpt, params["gamma"])


class PoissonNoise(v2.Transform):
    """Quantum (photon-count) noise of a detector: each pixel of a float image in [0, 1] redrawn as
    ``Poisson(x * photons) / photons``, ``photons`` drawn log-uniformly from ``photons`` (fewer: noisier).
    Images only."""

    def __init__(self, photons: tuple[float, float] = (30.0, 300.0)) -> None:
        super().__init__()
        self.photons = photons

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"photons": log_uniform(self.photons)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        photons = params["photons"]
        noisy = torch.poisson(inpt.clamp(0.0, 1.0) * photons) / photons
        return tv_tensors.wrap(noisy.clamp(0.0, 1.0).to(inpt.dtype), like=inpt)


class DownUpScale(v2.Transform):
    """Down-scale by a factor drawn from ``factor`` and back up (a smaller detector or a re-sampled archive
    copy): the image loses detail, keeps its size. Masks and boxes keep their place (only the image is
    re-sampled)."""

    def __init__(self, factor: tuple[float, float] = (0.4, 0.9)) -> None:
        super().__init__()
        self.factor = factor

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        low, high = self.factor
        return {"factor": low + (high - low) * float(torch.rand(()))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        height, width = inpt.shape[-2:]
        small = [max(8, round(height * params["factor"])), max(8, round(width * params["factor"]))]
        down = v2.functional.resize(inpt, small, antialias=True)
        return v2.functional.resize(down, [height, width], antialias=True)


class BorderCrop(v2.Transform):
    """Cut a random margin, up to ``fraction`` of the side, off each edge and scale back to the same size:
    markers, text and collimator edges at the border go, and the image, its masks (nearest neighbour) and
    its boxes move together."""

    def __init__(self, fraction: float = 0.12) -> None:
        super().__init__()
        self.fraction = fraction

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        top, bottom, left, right = (torch.rand(4) * self.fraction).tolist()
        y0, x0 = round(top * height), round(left * width)
        return {"top": y0, "left": x0, "height": max(1, height - y0 - round(bottom * height)),
                "width": max(1, width - x0 - round(right * width)), "size": [height, width]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.resized_crop, inpt, params["top"], params["left"], params["height"],
                                 params["width"], size=params["size"], antialias=True)


def acquisition_augment() -> v2.Transform:
    """Against device and hospital signatures (issue: site-robust training): each image gets a random
    acquisition - gamma and contrast, Gaussian or Poisson noise, blur or sharpening, JPEG re-encoding at a
    random quality, down- then up-scaling - and a random border crop that cuts away markers and text at the
    edges (image, mask and boxes alike), plus the mild geometry of ``light``. Noise injection shrank the
    seen/unseen-source gap of a COVID-19 chest X-ray classifier from 0.10-0.20 to 0.01-0.06 (Mai & Hall
    2025)."""
    return v2.Compose([
        BorderCrop(0.12),
        v2.RandomAffine(degrees=7, translate=(0.03, 0.03)),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([RandomGamma((0.6, 1.6))], p=0.6),
        v2.RandomApply([v2.ColorJitter(brightness=0.15, contrast=0.3)], p=0.6),
        v2.RandomChoice([v2.GaussianNoise(sigma=0.03), PoissonNoise((30.0, 300.0)), v2.Identity()]),
        v2.RandomChoice([v2.GaussianBlur(5, sigma=(0.3, 1.5)), v2.RandomAdjustSharpness(2.5, p=1.0), v2.Identity()]),
        v2.RandomApply([DownUpScale((0.35, 0.85))], p=0.4),
        v2.RandomApply([v2.Compose([v2.ToDtype(torch.uint8, scale=True), v2.JPEG((25, 90)),
                                    v2.ToDtype(torch.float32, scale=True)])], p=0.5),
    ])


#: Named augmentation sets a config can ask for (``data.augment``).
AUGMENTATIONS: dict[str, Callable[[], v2.Transform]] = {
    "acquisition": acquisition_augment,
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
