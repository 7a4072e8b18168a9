"""Trees of synthetic phantoms, written in the real public layouts our source adapters read.

:func:`synthesize` draws phantoms (:mod:`~lungscreen.data.phantoms`) and writes them into a multi-source
tree in the layouts of real public downloads, so the demo and the tests run the exact code paths of real
data:

* ``COVID-19_Radiography_Dataset/{COVID,Normal,Viral Pneumonia,Lung_Opacity}/{images,masks}/<Class>-<n>.png``
  (the 2021+ COVID-19 Radiography Database; masks 0/255 at 256 px like the real ones, ``<Class>.metadata.xlsx``);
* ``NIH-ChestX-ray14/`` with ``Data_Entry_2017.csv`` (NIH's columns), ``BBox_List_2017.csv`` (boxes in the
  1024 px frame even though the phantoms are smaller, as in the real downscaled copies) and
  ``images/PPPPPPPP_FFF.png`` with several follow-ups per patient (follow-ups share the patient's anatomy);
* optionally ``chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/`` (Kermany: ``person12_bacteria_47.jpeg``).

Only the radiography database holds COVID-19 cases and NIH only negatives, as in the real world. An
optional *planted shortcut* (a burnt-in corner marker or a global intensity shift, tied to a label or to a
source) lets the bias audit be checked against ground truth, which ``synth.json`` records.

Every image depends only on the seed, its index and its patient, so any number of worker processes writes
identical files; the tree is built beside ``out`` and renamed into place when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from lungscreen.data.labels import BACTERIAL, COVID, NORMAL, PNEUMONIA, VIRAL
from lungscreen.data.phantoms import MARKER_CORNER, MARKER_TEXT, PHANTOM_LABELS, Box, Shortcut, render_phantom
from lungscreen.errors import ConfigError
from lungscreen.interrupts import worker_pool
from lungscreen.io.files import atomic_path

MANIFEST_NAME = "synth.json"
FORMAT_VERSION = 1

__all__ = ["DEFAULT_LAYOUTS", "LAYOUTS", "Layout", "SynthResult", "synthesize"]


# --------------------------------------------------------------------------------------------------
# Public layouts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Class:
    """One class of a layout: its own name (folder or finding), the label drawn, its share of the layout."""

    name: str
    label: str
    share: float


@dataclass(frozen=True)
class Layout:
    """A public dataset layout the generator writes.

    Attributes:
        name: source id (recorded in ``synth.json``; ``--shortcut-by source`` targets it).
        folder: the top folder, named as the real download names it.
        share: the layout's share of the images when several are written.
        classes: its classes with their real-world shares.
        description: one line for ``--help`` and listings.
    """

    name: str
    folder: str
    share: float
    classes: tuple[_Class, ...]
    description: str


LAYOUTS: dict[str, Layout] = {
    "radiography": Layout(
        "radiography", "COVID-19_Radiography_Dataset", 0.6,
        # Shares of the 2021 release: 3616 COVID, 10192 Normal, 6012 Lung_Opacity, 1345 Viral Pneumonia.
        (_Class("COVID", COVID, 0.171), _Class("Normal", NORMAL, 0.482), _Class("Lung_Opacity", PNEUMONIA, 0.284),
         _Class("Viral Pneumonia", VIRAL, 0.064)),
        "COVID-19 Radiography Database (2021+): <Class>/{images,masks}/<Class>-<n>.png, holds every COVID-19 case",
    ),
    "nih": Layout(
        "nih", "NIH-ChestX-ray14", 0.4,
        # The real set is 54 % "No Finding" and 1.3 % pneumonia; a usable share of positives is kept here.
        (_Class("No Finding", NORMAL, 0.7), _Class("Pneumonia", PNEUMONIA, 0.3)),
        "NIH ChestX-ray14: Data_Entry_2017.csv, BBox_List_2017.csv (1024 px frame), images/PPPPPPPP_FFF.png",
    ),
    "kermany": Layout(
        "kermany", "chest_xray", 0.25,
        # Shares of Kermany et al. (5856 images): 1583 normal, 2780 bacterial, 1493 viral.
        (_Class("NORMAL", NORMAL, 0.27), _Class("bacteria", BACTERIAL, 0.475), _Class("virus", VIRAL, 0.255)),
        "Kermany pediatric: chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/person<k>_{bacteria,virus}_<n>.jpeg",
    ),
}
DEFAULT_LAYOUTS = ("radiography", "nih")
#: Side of the masks in the real radiography database, whatever the image size.
RADIOGRAPHY_MASK_SIZE = 256
#: Where the radiography database's metadata says each class came from.
_RADIOGRAPHY_URLS = {
    "COVID": "https://bimcv.cipf.es/bimcv-projects/bimcv-covid19/#1590858128006-9e640421-6711",
    "Normal": "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data",
    "Lung_Opacity": "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data",
    "Viral Pneumonia": "https://www.kaggle.com/paultimothymooney/chest-xray-pneumonia",
}
_NIH_FINDINGS = ("Pneumonia", "Pneumonia", "Infiltration|Pneumonia", "Consolidation|Pneumonia", "Effusion|Pneumonia")
_NIH_ORIGINAL_SIZES = ((2500, 2048), (2992, 2991), (3056, 2544), (2048, 2500), (2021, 2021), (2544, 3056))
_NIH_FRAME = 1024
_NIH_PATIENTS = 30805


@dataclass
class _Item:
    """One image to write: where, which label, whose anatomy, and whether it carries the shortcut."""

    index: int
    source: str
    class_name: str
    label: str
    image: str
    mask: str = ""
    patient: int | None = None
    shortcut: bool = False
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SynthResult:
    """What :func:`synthesize` wrote (or found already written).

    Attributes:
        root: the tree's root folder.
        images: number of images.
        counts: source -> label -> images.
        shortcut_files: relative paths of the images that carry the planted shortcut.
        cached: True when an identical tree was already there and nothing was written.
    """

    root: Path
    images: int
    counts: dict[str, dict[str, int]]
    shortcut_files: list[str]
    cached: bool = False


def synthesize(out: str | Path, n: int = 1000, *, size: int = 256, seed: int = 0,
               classes: Sequence[str] | None = None, layouts: Sequence[str] = DEFAULT_LAYOUTS,
               shortcut: Shortcut | None = None, workers: int = 1, overwrite: bool = False,
               progress: Callable[[int], None] | None = None) -> SynthResult:
    """Write ``n`` phantoms as a multi-source tree in real public layouts, plus ``synth.json``.

    The tree is built in a hidden folder beside ``out`` and renamed into place at the end, so ``out`` is
    either absent, the previous tree, or the complete new one. When ``out`` already holds a tree made
    with the same parameters, nothing is written (a cache for benchmarks and the demo).

    Args:
        out: root folder to create.
        n: number of images over all sources.
        size: image side in pixels.
        seed: makes everything reproducible (files are identical whatever ``workers``).
        classes: labels to draw (subset of :data:`PHANTOM_LABELS`); None keeps every class the layouts hold.
        layouts: names in :data:`LAYOUTS`.
        shortcut: plant this shortcut; None for none.
        workers: processes rendering in parallel.
        overwrite: replace ``out`` if it is a phantom tree made with other parameters.
        progress: called with the number of images finished since the last call.

    Raises:
        ConfigError: bad parameters, or ``out`` exists with other content.
    """
    out = Path(out)
    parameters = _parameters(n, size, seed, classes, layouts, shortcut, workers)
    cached = _cached(out, parameters, overwrite)
    if cached is not None:
        return cached
    planted = Shortcut(**parameters["shortcut"]) if parameters["shortcut"] else None  # with its target resolved
    items = _plan(parameters)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        boxes = _render_all(staging, items, size, seed, planted, workers, progress)
        _write_metadata(staging, items, boxes, size)
        summary = _summary(parameters, items, boxes, planted)
        with atomic_path(staging / MANIFEST_NAME) as temporary:
            temporary.write_text(json.dumps(summary, indent=1), encoding="utf-8")
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _result(out, summary, cached=False)


def _parameters(n: int, size: int, seed: int, classes: Sequence[str] | None, layouts: Sequence[str],
                shortcut: Shortcut | None, workers: int) -> dict:
    """Validate the arguments and return them as the JSON-able record kept in ``synth.json``."""
    if n < 1:
        raise ConfigError(f"number of images must be >= 1, got {n}")
    if not 32 <= size <= 2048:
        raise ConfigError(f"image size must be between 32 and 2048 px, got {size}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    layouts = list(dict.fromkeys(layouts))
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown or not layouts:
        raise ConfigError(f"unknown layout(s) {unknown or layouts}; choose from {', '.join(LAYOUTS)}")
    held = {c.label for name in layouts for c in LAYOUTS[name].classes}
    wanted = sorted(held, key=PHANTOM_LABELS.index) if classes is None else list(dict.fromkeys(classes))
    bad = [label for label in wanted if label not in PHANTOM_LABELS]
    if bad:
        raise ConfigError(f"unknown class(es) {bad}; choose from {', '.join(PHANTOM_LABELS)}")
    missing = [label for label in wanted if label not in held]
    if missing or not wanted:
        raise ConfigError(f"no layout among {', '.join(layouts)} holds class(es) {missing or wanted} "
                          f"(kermany holds bacterial; radiography holds COVID-19)")
    record = {"n": n, "size": size, "seed": seed, "classes": wanted, "layouts": layouts, "shortcut": None}
    if shortcut is not None:
        target = shortcut.target or _default_target(shortcut.by, layouts)
        allowed = wanted if shortcut.by == "label" else layouts
        if target not in allowed:
            raise ConfigError(f"shortcut target {target!r} is not a {shortcut.by} of this tree; "
                              f"choose from {', '.join(allowed)}")
        record["shortcut"] = {"kind": shortcut.kind, "by": shortcut.by, "target": target,
                              "strength": float(shortcut.strength)}
    return record


def _default_target(by: str, layouts: Sequence[str]) -> str:
    if by == "label":
        return COVID
    return next((name for name in layouts if any(c.label == COVID for c in LAYOUTS[name].classes)), layouts[0])


def _cached(out: Path, parameters: dict, overwrite: bool) -> SynthResult | None:
    """The existing tree when it was made with the same parameters; refuse to clobber anything else."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    record = out / MANIFEST_NAME
    if record.is_file():
        summary = json.loads(record.read_text(encoding="utf-8"))
        if summary.get("format_version") == FORMAT_VERSION and summary.get("parameters") == parameters:
            return _result(out, summary, cached=True)
        if overwrite:
            return None
        raise ConfigError(f"{out} holds phantoms made with other parameters; pass overwrite (--force) to replace them")
    if any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty (and holds no {MANIFEST_NAME}); choose a new folder")
    return None


def _replace(staging: Path, out: Path) -> None:
    """Move the finished tree onto ``out`` (absent, empty, or an older phantom tree)."""
    if out.exists():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
            return
        out.rmdir()
    os.replace(staging, out)


def _result(root: Path, summary: dict, cached: bool) -> SynthResult:
    counts = {name: dict(source["labels"]) for name, source in summary["sources"].items()}
    shortcut = summary.get("shortcut") or {}
    return SynthResult(root, summary["images"], counts, list(shortcut.get("files", [])), cached)


# --- planning: which image goes where ------------------------------------------------------------------


def _apportion(total: int, shares: Sequence[float]) -> list[int]:
    """Split ``total`` by ``shares`` (largest remainders), giving every share at least one when possible."""
    shares = np.asarray(shares, float) / float(sum(shares))
    floor = min(1, total // len(shares))
    counts = np.full(len(shares), floor)
    exact = shares * (total - counts.sum())
    counts += np.floor(exact).astype(int)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts.tolist()


def _plan(parameters: dict) -> list[_Item]:
    """Every image of the tree, deterministic by seed: source, class, file names, patients, shortcut."""
    rng = np.random.default_rng([parameters["seed"], 7])
    layouts = [LAYOUTS[name] for name in parameters["layouts"]
               if any(c.label in parameters["classes"] for c in LAYOUTS[name].classes)]
    per_layout = _apportion(parameters["n"], [layout.share for layout in layouts])
    items: list[_Item] = []
    for layout, count in zip(layouts, per_layout):
        kept = [c for c in layout.classes if c.label in parameters["classes"]]
        if count == 0:
            continue
        names = [c for c, k in zip(kept, _apportion(count, [c.share for c in kept])) for _ in range(k)]
        planner = {"radiography": _plan_radiography, "nih": _plan_nih, "kermany": _plan_kermany}[layout.name]
        items.extend(planner(layout, [names[i] for i in rng.permutation(len(names))], len(items), rng))
    chosen = parameters["shortcut"]
    if chosen is not None:
        targeted = [item for item in items if getattr(item, chosen["by"]) == chosen["target"]]
        carriers = rng.permutation(len(targeted))[: round(chosen["strength"] * len(targeted))]
        for position in carriers:
            targeted[position].shortcut = True
    return items


def _plan_radiography(layout: Layout, classes: list[_Class], start: int, rng: np.random.Generator) -> list[_Item]:
    """Radiography database: ``<Class>-<n>.png`` numbered per class, image and mask of the same name."""
    counter: Counter[str] = Counter()
    items = []
    for offset, klass in enumerate(classes):
        counter[klass.name] += 1
        name = f"{klass.name}-{counter[klass.name]}.png"
        folder = f"{layout.folder}/{klass.name}"
        items.append(_Item(start + offset, layout.name, klass.name, klass.label, f"{folder}/images/{name}",
                           mask=f"{folder}/masks/{name}"))
    return items


def _plan_nih(layout: Layout, classes: list[_Class], start: int, rng: np.random.Generator) -> list[_Item]:
    """NIH: patients with 1-6 follow-ups (same anatomy), ids drawn from NIH's id range, age/sex per patient."""
    patients = rng.permutation(max(_NIH_PATIENTS, 2 * len(classes)))[: len(classes)] + 1
    items, position, patient_number = [], 0, 0
    while position < len(classes):
        patient = int(patients[patient_number])
        follow_ups = min(int(rng.geometric(0.55)), 6, len(classes) - position)
        age, sex = int(rng.integers(18, 90)), str(rng.choice(["M", "F"]))
        for follow_up in range(follow_ups):
            klass = classes[position]
            finding = "No Finding" if klass.label == NORMAL else str(rng.choice(_NIH_FINDINGS))
            width, height = _NIH_ORIGINAL_SIZES[int(rng.integers(len(_NIH_ORIGINAL_SIZES)))]
            name = f"{patient:08d}_{follow_up:03d}.png"
            items.append(_Item(start + position, layout.name, klass.name, klass.label, f"{layout.folder}/images/{name}",
                               patient=patient, info={
                                   "Image Index": name, "Finding Labels": finding, "Follow-up #": follow_up,
                                   "Patient ID": patient, "Patient Age": min(age + follow_up // 3, 95),
                                   "Patient Gender": sex,
                                   "View Position": "PA" if rng.random() < 0.6 else "AP", "width": width, "height": height,
                                   "spacing": float(rng.choice([0.143, 0.139, 0.168]))}))
            position += 1
        patient_number += 1
    return items


def _plan_kermany(layout: Layout, classes: list[_Class], start: int, rng: np.random.Generator) -> list[_Item]:
    """Kermany: patients with 1-3 images of one class, whole patients per split (train 89 %, test 10.7 %, val)."""
    labels = {klass.name: klass.label for klass in classes}
    items: list[_Item] = []
    person = image_number = 0
    for name, remaining in Counter(klass.name for klass in classes).items():
        while remaining:
            person += 1
            count = min(int(rng.integers(1, 4)), remaining)
            split = str(rng.choice(["train", "test", "val"], p=[0.888, 0.109, 0.003]))
            prefix = "NORMAL2-" if rng.random() < 0.4 else ""  # part of the patient id: one per patient
            for image in range(count):
                image_number += 1
                if name == "NORMAL":
                    path = f"{layout.folder}/{split}/NORMAL/{prefix}IM-{person:04d}-{image + 1:04d}.jpeg"
                else:
                    path = f"{layout.folder}/{split}/PNEUMONIA/person{person}_{name}_{image_number}.jpeg"
                items.append(_Item(start + len(items), layout.name, name, labels[name], path, patient=1_000_000 + person))
            remaining -= count
    return items


# --- rendering, in worker processes -----------------------------------------------------------------------


def _render_all(root: Path, items: list[_Item], size: int, seed: int, shortcut: Shortcut | None, workers: int,
                progress: Callable[[int], None] | None) -> dict[int, list[Box]]:
    """Render and write every image; return the lesion boxes by item index."""
    for folder in sorted({str(Path(p).parent) for item in items for p in (item.image, item.mask) if p}):
        (root / folder).mkdir(parents=True, exist_ok=True)
    tasks = [(item.index, item.label, item.patient, item.shortcut, item.image, item.mask) for item in items]
    step = max(1, min(128, math.ceil(len(tasks) / (4 * workers))))  # small chunks still spread over workers
    chunks = [tasks[i: i + step] for i in range(0, len(tasks), step)]
    boxes: dict[int, list[Box]] = {}
    if workers == 1 or len(chunks) == 1:
        for chunk in chunks:
            boxes.update(_render_chunk(str(root), chunk, size, seed, shortcut))
            if progress:
                progress(len(chunk))
        return boxes
    # Spawned, not forked: a child forked after OpenCV started its thread pool (cv2.connectedComponents does)
    # hangs in its first OpenCV call. Spawned children import the caller's main module, hence the hint below.
    try:
        with worker_pool(workers, cv2.setNumThreads, (1,)) as pool:
            futures = {pool.submit(_render_chunk, str(root), chunk, size, seed, shortcut): len(chunk) for chunk in chunks}
            for future in as_completed(futures):
                boxes.update(future.result())
                if progress:
                    progress(futures[future])
    except BrokenProcessPool:
        raise ConfigError("a phantom worker process died; from a script, call synthesize(..., workers>1) under "
                          "`if __name__ == \"__main__\":` (worker processes import the main module), "
                          "or use workers=1") from None
    return boxes


def _render_chunk(root: str, tasks: list[tuple], size: int, seed: int, shortcut: Shortcut | None) -> dict[int, list[Box]]:
    boxes = {}
    for index, label, patient, carries, image_path, mask_path in tasks:
        phantom = render_phantom(label, size=size, seed=seed, index=index, patient=patient,
                                 shortcut=shortcut if carries else None)
        _write_image(Path(root) / image_path, phantom.image)
        if mask_path:
            mask = phantom.mask.astype(np.uint8) * 255
            if size != RADIOGRAPHY_MASK_SIZE:
                mask = cv2.resize(mask, (RADIOGRAPHY_MASK_SIZE,) * 2, interpolation=cv2.INTER_NEAREST)
            _write_image(Path(root) / mask_path, mask, mask=True)
        boxes[index] = phantom.boxes
    return boxes


#: Encoder options: JPEG like Kermany's files; for grey PNG films the "up" filter with Huffman-only coding is
#: 20 % faster than OpenCV's default and 5 % smaller (measured on 256 px phantoms); binary masks keep the default.
_ENCODING = {".jpeg": [cv2.IMWRITE_JPEG_QUALITY, 95], ".jpg": [cv2.IMWRITE_JPEG_QUALITY, 95],
             ".png": [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP,
                      cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]}


def _write_image(path: Path, pixels: np.ndarray, mask: bool = False) -> None:
    """Encode by the file's suffix and write it (inside the staging tree, so no temporary file is needed)."""
    suffix = path.suffix.lower()
    ok, encoded = cv2.imencode(suffix, pixels, [] if mask else _ENCODING.get(suffix, []))
    if not ok:
        raise ConfigError(f"{path}: OpenCV could not encode a {suffix} image")
    path.write_bytes(encoded.tobytes())


# --- metadata files of the layouts, and synth.json ------------------------------------------------------


def _write_metadata(root: Path, items: list[_Item], boxes: dict[int, list[Box]], size: int) -> None:
    nih = [item for item in items if item.source == "nih"]
    if nih:
        _write_nih_tables(root / LAYOUTS["nih"].folder, nih, boxes, size)
    radiography = [item for item in items if item.source == "radiography"]
    if radiography:
        _write_radiography_metadata(root / LAYOUTS["radiography"].folder, radiography, size)


def _write_nih_tables(folder: Path, items: list[_Item], boxes: dict[int, list[Box]], size: int) -> None:
    """``Data_Entry_2017.csv`` with NIH's header (trailing comma included) and ``BBox_List_2017.csv``."""
    entry = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
             "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"]
    box_rows = ["Image Index,Finding Label,Bbox [x,y,w,h]"]
    scale = _NIH_FRAME / size
    for item in sorted(items, key=lambda i: i.info["Image Index"]):
        info = item.info
        entry.append(f"{info['Image Index']},{info['Finding Labels']},{info['Follow-up #']},{info['Patient ID']},"
                     f"{info['Patient Age']},{info['Patient Gender']},{info['View Position']},{info['width']},"
                     f"{info['height']},{info['spacing']},{info['spacing']},")
        if item.label != NORMAL:
            for x0, y0, x1, y1 in boxes.get(item.index, []):
                box_rows.append(f"{info['Image Index']},Pneumonia,{x0 * scale:.7f},{y0 * scale:.7f},"
                                f"{(x1 - x0) * scale:.7f},{(y1 - y0) * scale:.7f}")
    for name, rows, newline in (("Data_Entry_2017.csv", entry, "\n"), ("BBox_List_2017.csv", box_rows, "\r\n")):
        with atomic_path(folder / name) as temporary:
            temporary.write_text(newline.join(rows) + newline, encoding="utf-8")


def _write_radiography_metadata(folder: Path, items: list[_Item], size: int) -> None:
    """``<Class>.metadata.xlsx`` (FILE NAME, FORMAT, SIZE, URL), as the database ships them."""
    import pandas as pd

    by_class: dict[str, list[str]] = {}
    for item in items:
        by_class.setdefault(item.class_name, []).append(Path(item.image).stem)
    for name, stems in by_class.items():
        stems.sort(key=lambda stem: int(stem.rsplit("-", 1)[1]))
        table = pd.DataFrame({"FILE NAME": stems, "FORMAT": "PNG", "SIZE": f"{size}*{size}", "URL": _RADIOGRAPHY_URLS[name]})
        with atomic_path(folder / f"{name}.metadata.xlsx") as temporary:
            table.to_excel(temporary, index=False, engine="openpyxl")


def _summary(parameters: dict, items: list[_Item], boxes: dict[int, list[Box]], shortcut: Shortcut | None) -> dict:
    """The ground truth recorded in ``synth.json``: parameters, counts, shortcut carriers, lesion boxes."""
    sources = {}
    for name in parameters["layouts"]:
        members = [item for item in items if item.source == name]
        if members:
            sources[name] = {"folder": LAYOUTS[name].folder, "layout": LAYOUTS[name].description, "images": len(members),
                             "labels": dict(Counter(item.label for item in members)),
                             "classes": dict(Counter(item.class_name for item in members))}
    summary = {
        "generator": "lungscreen.data.synth", "format_version": FORMAT_VERSION, "parameters": parameters,
        "images": len(items), "labels": dict(Counter(item.label for item in items)), "sources": sources,
        "shortcut": None,
        "boxes": {"frame": "pixels of each image (x0, y0, x1, y1; x1, y1 exclusive)",
                  "by_image": {item.image: [list(box) for box in boxes[item.index]]
                               for item in items if boxes.get(item.index)}},
    }
    if shortcut is not None:
        chosen = parameters["shortcut"]
        carriers = sorted(item.image for item in items if item.shortcut)
        targeted = sum(1 for item in items if getattr(item, chosen["by"]) == chosen["target"])
        summary["shortcut"] = {
            **chosen, "targeted_images": targeted, "carriers": len(carriers),
            "what": (f"the letter {MARKER_TEXT!r} burnt into the {MARKER_CORNER} corner, "
                     f"opacity {0.35 + 0.65 * shortcut.strength:.2f}" if shortcut.kind == "marker" else
                     f"tone curve x{1 - 0.35 * shortcut.strength:.2f} + {0.28 * shortcut.strength:.2f} (brighter, flatter)"),
            "files": carriers,
        }
    return summary
