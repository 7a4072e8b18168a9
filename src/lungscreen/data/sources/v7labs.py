"""V7 Labs lung segmentations of Cohen's images (github.com/v7labs/covid-19-xray-dataset).

Layout::

    annotations/covid-only.zip                    Darwin JSON per image: <id>.json
    annotations/all-images-semantic-masks/<id>.png  0 background, 127 "Ignore" (devices, markup), 255 lung

This source has no images of its own: each Darwin JSON names the Cohen file it annotates in
``image.original_filename``, so the adapter returns *join rows* (``join_name`` = that file name, plus
``mask_path``, ``mask_convention`` and the pneumonia-type tag) that the build step merges onto the Cohen rows.
Every ``annotations/*.zip`` of Darwin JSON is read (``covid-only.zip`` and, in fuller checkouts, others);
COCO exports (``*-coco.zip``) are not Darwin JSON and are left alone.

V7's lungs include the region behind the heart (:data:`~lungscreen.data.sources.common.BEHIND_HEART`).
Lateral views and CT slices carry no lung polygon; their mask PNG is all background, which would teach a
model "no lung here", so those rows get no ``mask_path`` and the reason is reported.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

from lungscreen.data.sources.base import Skips, SourceAdapter, register_source
from lungscreen.data.sources.common import BEHIND_HEART
from lungscreen.errors import SourceError

ANNOTATIONS = Path("annotations")
MASKS = ANNOTATIONS / "all-images-semantic-masks"
NO_LUNG = "Darwin JSON has no lung polygon (lateral view or CT slice); its empty mask is not used"


@register_source
class V7LabsLungMasks(SourceAdapter):
    name = "v7labs"
    description = "V7 Labs lung masks on Cohen images (Darwin JSON zip + semantic mask PNGs), joined to cohen"
    joins = "cohen"

    @classmethod
    def matches(cls, folder: Path) -> bool:
        return (folder / MASKS).is_dir() and any(_darwin_zips(folder))

    def read(self, folder: Path, skips: Skips) -> list[dict]:
        rows: dict[str, dict] = {}
        for archive in _darwin_zips(folder):
            for member, darwin in _darwin_documents(archive, skips):
                mask_id = Path(member).stem
                if mask_id in rows:
                    continue  # the same image in covid-only.zip and a fuller export
                row = self._join_row(folder, mask_id, darwin, f"{archive}:{member}", skips)
                if row is not None:
                    rows[mask_id] = row
        return list(rows.values())

    def _join_row(self, folder: Path, mask_id: str, darwin: dict, where: str, skips: Skips) -> dict | None:
        image = darwin.get("image") or {}
        name = str(image.get("original_filename") or "").strip()
        if not name:
            skips.add(where, "Darwin JSON lacks image.original_filename (cannot join to a Cohen image)")
            return None
        mask = folder / MASKS / f"{mask_id}.png"
        if not mask.is_file():
            skips.add(mask, "mask PNG named by a Darwin JSON is absent")
            return None
        annotations = darwin.get("annotations") or []
        tags = [str(item.get("name", "")) for item in annotations if "tag" in item]
        has_lung = any(item.get("name") == "Lung" and "polygon" in item for item in annotations)
        if not has_lung:
            skips.add(mask, NO_LUNG)
        return {
            "join_name": name,
            "mask_path": str(mask) if has_lung else "",
            "mask_convention": BEHIND_HEART if has_lung else "",
            # The pneumonia-type tag ("Viral Pneumonia", "Bacterial Pneumonia", ...), a check on Cohen's finding.
            "v7labs_pneumonia": next((tag for tag in tags if "pneumonia" in tag.lower()), ""),
        }


def _darwin_zips(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / ANNOTATIONS).glob("*.zip") if not p.stem.endswith("-coco"))


def _darwin_documents(archive: Path, skips: Skips) -> Iterator[tuple[str, dict]]:
    """(member name, parsed JSON) for every Darwin document in a zip; unreadable members go to ``skips``."""
    try:
        bundle = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as error:
        raise SourceError(f"{archive}: not a readable zip archive ({error})") from None
    with bundle:
        for member in sorted(bundle.namelist()):
            if not member.endswith(".json") or Path(member).name.startswith("."):
                continue
            try:
                document = json.loads(bundle.read(member))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                skips.add(f"{archive}:{member}", f"not valid JSON ({error})")
                continue
            if isinstance(document, dict) and "image" in document:
                yield member, document
            else:
                skips.add(f"{archive}:{member}", "JSON without an 'image' record (not a Darwin annotation)")
