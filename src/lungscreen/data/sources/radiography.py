"""COVID-19 Radiography Database (Chowdhury et al., Rahman et al.; Kaggle ``tawsifurrahman``).

One class per folder; the folder name is the label. Three published layouts, all read here::

    COVID-19 Radiography Database/{COVID-19,NORMAL,Viral Pneumonia}/*.png             (v1-v2)
    COVID-19_Radiography_Dataset/{COVID,Normal,Lung_Opacity,Viral Pneumonia}/*.png     (flat)
    COVID-19_Radiography_Dataset/{COVID,Normal,Lung_Opacity,Viral Pneumonia}/{images,masks}/*.png  (v4)

In v4 each image has a lung mask of the same file name in ``masks/`` (256 px for 299 px images; lungs with
the heart left out). The viral-pneumonia lung-mask set is that layout with one class folder, so it is read
by this adapter too; its images keep the Radiography Database's names and therefore the same patient ids.

There are no patient ids: each image is its own patient (near-duplicates are the dedup step's job).
``Lung_Opacity`` is the database's "non-COVID lung infection" class (RSNA lung opacities): ``pneumonia``.
All ``Viral Pneumonia`` images come from Kermany's pediatric set, so they are marked ``pediatric``;
``Normal`` mixes adults and children and stays unmarked.
"""

from __future__ import annotations

from pathlib import Path

from lungscreen.data.labels import COVID, NORMAL, PNEUMONIA, VIRAL
from lungscreen.data.manifest import new_row
from lungscreen.data.sources.base import Skips, SourceAdapter, register_source
from lungscreen.data.sources.common import HEART_EXCLUDED, PEDIATRIC, has_images, image_files

#: Class folder -> canonical label, for every spelling the published versions use.
CLASSES = {
    "COVID": COVID, "COVID-19": COVID,
    "Normal": NORMAL, "NORMAL": NORMAL,
    "Viral Pneumonia": VIRAL,
    "Lung_Opacity": PNEUMONIA,
}
#: Folder names only this database uses (``NORMAL`` alone would also match Kermany's folders).
SIGNATURE = ("COVID", "COVID-19", "Viral Pneumonia", "Lung_Opacity")
PEDIATRIC_CLASSES = ("Viral Pneumonia",)


def _images_folder(class_folder: Path) -> Path:
    images = class_folder / "images"
    return images if images.is_dir() else class_folder


@register_source
class RadiographyDatabase(SourceAdapter):
    name = "covid19-radiography"
    description = "COVID-19 Radiography Database: {COVID,Normal,Lung_Opacity,Viral Pneumonia}[/images,/masks]"

    @classmethod
    def matches(cls, folder: Path) -> bool:
        return any(has_images(_images_folder(folder / name)) for name in SIGNATURE)

    def read(self, folder: Path, skips: Skips) -> list[dict]:
        rows = []
        for class_folder in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            images = image_files(_images_folder(class_folder))
            if class_folder.name not in CLASSES:
                for path in images:
                    skips.add(path, "class folder not known to covid19-radiography")
                continue
            rows.extend(self._class_rows(class_folder, images, skips))
        return rows

    def _class_rows(self, class_folder: Path, images: list[Path], skips: Skips) -> list[dict]:
        label, fine = CLASSES[class_folder.name], class_folder.name
        masks = {p.name: p for p in image_files(class_folder / "masks")}
        for name in sorted(set(masks) - {p.name for p in images}):
            skips.add(masks[name], "mask without its image")
        rows = []
        for path in images:
            mask = masks.get(path.name)
            rows.append(new_row(
                path, label, self.patient(path.stem), self.name, fine_label=fine,
                mask_path=str(mask) if mask else "", mask_convention=HEART_EXCLUDED if mask else "",
                age_group=PEDIATRIC if fine in PEDIATRIC_CLASSES else "",
            ))
        return rows
