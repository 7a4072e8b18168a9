"""Public chest X-ray sets published for lung segmentation: OpenIST, Montgomery and Shenzhen.

Each row carries its ``mask_path`` and the ``mask_convention`` of the set (all three trace the visible lung
fields and leave the heart out: :data:`~lungscreen.data.sources.common.HEART_EXCLUDED`). An image whose
mask is missing keeps its row without a mask (it is still a labelled image); a mask without its image is
reported in the skips.

Layouts::

    OpenIST      Datasets/Chest_x-ray/<name>.jpg + <name>@.png               normal adults
    Montgomery   MontgomerySet/CXR_png/MCUCXR_0001_0.png                     _0 normal, _1 tuberculosis
                 MontgomerySet/ManualMask/{leftMask,rightMask}/MCUCXR_0001_0.png
                 MontgomerySet/ClinicalReadings/MCUCXR_0001_0.txt (optional: sex, age, reading)
    Shenzhen     ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png                 _0 normal, _1 tuberculosis
                 ChinaSet_AllFiles/mask/CHNCXR_0001_0_mask.png (the public masks; ``masks/`` and
                 ``<name>.png`` accepted too)   ChinaSet_AllFiles/ClinicalReadings/*.txt (optional)

Montgomery draws each lung in its own file. The mask reader takes one file per image, so the adapter
writes the union of the two once into a cache folder (``mask_cache``, default
``$LUNGSCREEN_CACHE/masks`` or ``~/.cache/lungscreen/masks``) and points ``mask_path`` there; the public
files are never modified, and a cached mask older than either half is written again.
"""

from __future__ import annotations

import hashlib
import os
from abc import abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from lungscreen.data.labels import NORMAL, OTHER
from lungscreen.data.manifest import new_row
from lungscreen.data.sources.base import Skips, SourceAdapter, register_source
from lungscreen.data.sources.common import ADULT, HEART_EXCLUDED, age_group, image_files
from lungscreen.errors import ImageReadError
from lungscreen.io.files import atomic_path
from lungscreen.io.images import read_mask

OPENIST_IMAGES = Path("Datasets") / "Chest_x-ray"
OPENIST_MASK_SUFFIX = "@.png"


def default_cache_dir() -> Path:
    """Where derived files (combined masks) go: ``$LUNGSCREEN_CACHE`` or ``~/.cache/lungscreen``."""
    return Path(os.environ.get("LUNGSCREEN_CACHE", Path.home() / ".cache" / "lungscreen"))


@register_source
class OpenIST(SourceAdapter):
    name = "openist"
    description = "OpenIST chest X-rays with lung masks: Datasets/Chest_x-ray/<name>.jpg + <name>@.png"

    @classmethod
    def matches(cls, folder: Path) -> bool:
        return next((folder / OPENIST_IMAGES).glob(f"*{OPENIST_MASK_SUFFIX}"), None) is not None

    def read(self, folder: Path, skips: Skips) -> list[dict]:
        files = image_files(folder / OPENIST_IMAGES)
        masks = {p.name[: -len(OPENIST_MASK_SUFFIX)]: p for p in files if p.name.endswith(OPENIST_MASK_SUFFIX)}
        images = [p for p in files if not p.name.endswith(OPENIST_MASK_SUFFIX)]
        for stem in sorted(set(masks) - {p.stem for p in images}):
            skips.add(masks[stem], "mask without its image")
        rows = []
        for path in images:
            mask = masks.get(path.stem)
            rows.append(new_row(path, NORMAL, self.patient(path.stem), self.name, fine_label="normal",
                                mask_path=str(mask) if mask else "",
                                mask_convention=HEART_EXCLUDED if mask else "", age_group=ADULT))
        return rows


class TuberculosisSet(SourceAdapter):
    """The two NLM tuberculosis sets: ``CXR_png/<prefix>_NNNN_<0|1>.png`` plus optional clinical readings.

    Subclasses set the file prefix and say which published mask files belong to an image.
    """

    prefix: ClassVar[str]
    view: ClassVar[str] = "unknown"

    @classmethod
    def matches(cls, folder: Path) -> bool:
        return next((folder / "CXR_png").glob(f"{cls.prefix}_*"), None) is not None

    def read(self, folder: Path, skips: Skips) -> list[dict]:
        rows, used_masks = [], set()
        for path in image_files(folder / "CXR_png"):
            suffix = path.stem.rsplit("_", 1)[-1]
            if suffix not in ("0", "1"):
                skips.add(path, "file name lacks the _0 (normal) / _1 (tuberculosis) label suffix")
                continue
            label, fine = (NORMAL, "normal") if suffix == "0" else (OTHER, "tuberculosis")
            mask = self.mask_for(folder, path, skips)
            used_masks.update(self.mask_sources(folder, path))
            rows.append(new_row(
                path, label, self.patient(path.stem.rsplit("_", 1)[0]), self.name, fine_label=fine, view=self.view,
                mask_path=str(mask) if mask else "", mask_convention=HEART_EXCLUDED if mask else "",
                age_group=age_group(_reading(folder, path.stem)),
            ))
        for mask in self.mask_files(folder):
            if mask not in used_masks:
                skips.add(mask, "mask without its image")
        return rows

    def mask_for(self, folder: Path, image: Path, skips: Skips) -> Path | None:
        """The lung mask file to use for ``image``: the first published one present, or None."""
        return next((candidate for candidate in self.mask_sources(folder, image) if candidate.is_file()), None)

    @abstractmethod
    def mask_sources(self, folder: Path, image: Path) -> list[Path]:
        """The published mask files that belong to ``image`` (present or not)."""

    @abstractmethod
    def mask_files(self, folder: Path) -> list[Path]:
        """Every published mask file of the set, to report those without an image."""


def _reading(folder: Path, stem: str) -> str:
    """The clinical-readings text of an image ('' when absent); its first lines give sex and age."""
    path = folder / "ClinicalReadings" / f"{stem}.txt"
    try:
        return path.read_text(encoding="latin-1")
    except OSError:
        return ""


@register_source
class Montgomery(TuberculosisSet):
    name = "montgomery"
    description = "Montgomery County TB set: CXR_png + ManualMask/{leftMask,rightMask} (masks combined in a cache)"
    prefix = "MCUCXR"
    view = "PA"

    def __init__(self, mask_cache: str | Path | None = None) -> None:
        self.mask_cache = Path(mask_cache) if mask_cache is not None else default_cache_dir() / "masks"

    SIDES: ClassVar[tuple[str, ...]] = ("leftMask", "rightMask")

    def mask_sources(self, folder: Path, image: Path) -> list[Path]:
        return [folder / "ManualMask" / side / image.name for side in self.SIDES]

    def mask_files(self, folder: Path) -> list[Path]:
        return [mask for side in self.SIDES for mask in image_files(folder / "ManualMask" / side)]

    def mask_for(self, folder: Path, image: Path, skips: Skips) -> Path | None:
        left, right = self.mask_sources(folder, image)
        if not left.is_file() and not right.is_file():
            return None
        if not (left.is_file() and right.is_file()):
            skips.add(left if left.is_file() else right, "only one lung's mask present; mask not used")
            return None
        digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
        combined = self.mask_cache / f"montgomery-{digest}" / image.name
        if combined.is_file() and combined.stat().st_mtime >= max(left.stat().st_mtime, right.stat().st_mtime):
            return combined
        try:
            _write_union(left, right, combined)
        except ImageReadError as error:
            skips.add(error.path, f"lung mask not usable: {error.reason}")
            return None
        return combined


def _write_union(left: Path, right: Path, target: Path) -> None:
    """Write the union of two lung masks as one 0/255 PNG (atomically)."""
    left_mask, right_mask = read_mask(left), read_mask(right)
    if left_mask.shape != right_mask.shape:
        raise ImageReadError(right, "left and right lung masks differ in size")
    with atomic_path(target) as temporary:
        Image.fromarray(((left_mask | right_mask) * 255).astype(np.uint8)).save(temporary, format="PNG")


@register_source
class Shenzhen(TuberculosisSet):
    name = "shenzhen"
    description = "Shenzhen TB set: ChinaSet_AllFiles/CXR_png + mask/<name>_mask.png"
    prefix = "CHNCXR"

    MASK_FOLDERS: ClassVar[tuple[str, ...]] = ("mask", "masks")

    def mask_sources(self, folder: Path, image: Path) -> list[Path]:
        return [folder / mask_folder / name for mask_folder in self.MASK_FOLDERS
                for name in (f"{image.stem}_mask.png", image.name)]

    def mask_files(self, folder: Path) -> list[Path]:
        return [mask for mask_folder in self.MASK_FOLDERS for mask in image_files(folder / mask_folder)]
