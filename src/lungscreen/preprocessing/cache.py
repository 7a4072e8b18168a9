"""Preprocess every image once: a disk cache keyed by the image file and the pipeline's parameters.

Layout under a cache root::

    ROOT/<pipeline name>-<pipeline key>/pipeline.json        the resolved pipeline (what made these files)
    ROOT/<pipeline name>-<pipeline key>/ab/<item key>.png    the preprocessed image (8-bit gray)
                                          <item key>.mask.png   the row's reference mask, moved with the image
                                                                (255 lung, 127 unknown as v7labs' "Ignore", 0)
                                          <item key>.lungs.png  the lung mask segment_lungs drew
                                          <item key>.json       size, boxes, geometry, lung method; or the error

* The **pipeline key** hashes the resolved pipeline: every step's parameters and, for ``segment_lungs``,
  the method used and the lung model's SHA-256. Change a parameter or retrain the lung model and the key
  changes, so nothing stale is ever read.
* The **item key** hashes the image file's absolute path, size and modification time (and the same for its
  reference mask, plus its boxes): an edited or replaced file gets a new key.
* The ``.json`` record is written last, atomically: its presence means the item is complete. Failures are
  recorded too (a blank image stays blank), so a second run does no work at all.

:func:`preprocess_manifest` runs this over a manifest in parallel processes and writes a new manifest
pointing at the cached files; :func:`preprocess_file` is the one-image entry the training engine uses.
Either way the image is :func:`~lungscreen.preprocessing.model_input.preprocess`'s 8-bit picture, so a
cached image and a freshly computed one are the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from lungscreen.data.manifest import boxes_for_size, decode_boxes, encode_boxes, save_manifest
from lungscreen.errors import ImageReadError, LungscreenError
from lungscreen.interrupts import worker_pool
from lungscreen.io.files import atomic_path, write_png
from lungscreen.io.images import read_image, read_mask_layers
from lungscreen.preprocessing.geometry import Geometry
from lungscreen.preprocessing.model_input import preprocess
from lungscreen.preprocessing.pipelines import Pipeline, load_pipeline
from lungscreen.preprocessing.transforms import IGNORE, LUNGS, REFERENCE, PreprocessingError, Sample, params_digest
from lungscreen.progress import progress_or_quiet

#: Mask key -> file suffix of the cached mask (the reference file also carries the unknown pixels, grey).
MASK_FILES = {REFERENCE: ".mask.png", LUNGS: ".lungs.png"}

#: Bump when the cache layout or the meaning of its files changes.
CACHE_VERSION = 2
#: Rows sent to a worker at a time (amortises inter-process traffic, keeps the progress bar moving).
CHUNK = 8


def file_identity(path: str | Path) -> str:
    """``absolute path|size|mtime_ns``: changes whenever the file is replaced or edited."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise ImageReadError(path, "no such file") from None
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


@dataclass(frozen=True)
class CachedItem:
    """The files of one cached image."""

    folder: Path
    key: str

    def path(self, suffix: str) -> Path:
        return self.folder / self.key[:2] / f"{self.key}{suffix}"

    @property
    def image(self) -> Path:
        return self.path(".png")

    @property
    def record(self) -> Path:
        return self.path(".json")


class PreprocessCache:
    """The cache of one pipeline under ``root`` (see the module docstring for the layout).

    Args:
        root: cache root folder.
        pipeline: a pipeline, its name or its dict; resolved here (lung model chosen and hashed).
    """

    def __init__(self, root: str | Path, pipeline: str | dict | Pipeline) -> None:
        self.pipeline = load_pipeline(pipeline).resolved()
        self.spec = self.pipeline.to_dict()
        self.key = params_digest({"cache_version": CACHE_VERSION, "pipeline": self.spec})[:16]
        self.folder = Path(root) / f"{self.pipeline.name}-{self.key}"
        spec_file = self.folder / "pipeline.json"
        if not spec_file.exists():
            with atomic_path(spec_file) as temporary:
                temporary.write_text(json.dumps(self.spec, indent=2, sort_keys=True))

    def item(self, image_path: str, mask_path: str | None = None, boxes: str = "") -> CachedItem:
        """The cache entry of an image (with its reference mask and boxes, when it has them)."""
        parts = [file_identity(image_path), file_identity(mask_path) if mask_path else "", boxes or ""]
        return CachedItem(self.folder, hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24])

    def record(self, item: CachedItem) -> dict[str, Any] | None:
        """The stored record of a complete item, or None when it has not been processed."""
        try:
            return json.loads(item.record.read_text())
        except (OSError, ValueError):
            return None

    def compute(self, item: CachedItem, image_path: str, mask_path: str | None = None,
                row: dict | None = None) -> dict[str, Any]:
        """Run the pipeline on one image, write its files, return its record (``ok`` False with the error)."""
        try:
            sample = run_file(self.pipeline, image_path, mask_path, row)
        except LungscreenError as error:
            record = {"ok": False, "error": str(error)}
        else:
            height, width = sample.image.shape
            write_png(item.image, sample.image)
            if REFERENCE in sample.masks:
                write_png(item.path(MASK_FILES[REFERENCE]), _three_level(sample.masks[REFERENCE], sample.masks.get(IGNORE)))
            if LUNGS in sample.masks:
                write_png(item.path(MASK_FILES[LUNGS]), sample.masks[LUNGS].astype(np.uint8) * 255)
            boxes = [(*map(float, box), label) for box, label in zip(sample.boxes, sample.box_labels, strict=True)]
            record = {"ok": True, "width": width, "height": height, "boxes": encode_boxes(boxes),
                      "lung_method": sample.info.get("lung_method", ""), "geometry": sample.geometry.as_dict(),
                      "masks": sorted(name for name in MASK_FILES if name in sample.masks)}
        with atomic_path(item.record) as temporary:
            temporary.write_text(json.dumps(record))
        return record

    def load(self, item: CachedItem, record: dict[str, Any]) -> Sample:
        """The cached sample of a complete item; :class:`PreprocessingError` for a recorded failure."""
        if not record["ok"]:
            raise PreprocessingError(record["error"])
        image = cv2.imread(str(item.image), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise PreprocessingError(f"{item.image}: cached image missing or unreadable; delete the cache folder")
        masks: dict[str, np.ndarray] = {}
        if REFERENCE in record["masks"]:
            layers = read_mask_layers(item.path(MASK_FILES[REFERENCE]))
            masks[REFERENCE] = layers.lung
            if layers.ignore.any():
                masks[IGNORE] = layers.ignore
        if LUNGS in record["masks"]:
            masks[LUNGS] = read_mask_layers(item.path(MASK_FILES[LUNGS])).lung
        boxes = decode_boxes(record["boxes"])
        geometry = record["geometry"]
        return Sample(image, masks, np.array([b[:4] for b in boxes], np.float32).reshape(-1, 4),
                      [str(b[4]) for b in boxes], {"lung_method": record["lung_method"]},
                      Geometry(geometry["width"], geometry["height"], tuple(geometry["box"])))

    def get(self, image_path: str, mask_path: str | None = None, row: dict | None = None) -> tuple[CachedItem, dict]:
        """The item and its record, computing it on a miss."""
        item = self.item(image_path, mask_path, _box_key(row))
        record = self.record(item)
        return item, record if record is not None else self.compute(item, image_path, mask_path, row)


def _box_key(row: dict | None) -> str:
    if not row or not row.get("boxes"):
        return ""
    return f"{row['boxes']}|{row.get('box_frame_width', 0)}|{row.get('box_frame_height', 0)}"


def _three_level(lung: np.ndarray, ignore: np.ndarray | None) -> np.ndarray:
    """A reference mask as one 8-bit picture: 255 lung, 127 unknown (v7labs' convention), 0 background."""
    picture = lung.astype(np.uint8) * 255
    if ignore is not None:
        picture[ignore & ~lung] = 127
    return picture


def read_sample(image_path: str, mask_path: str | None = None, row: dict | None = None) -> Sample:
    """Decode an image with its reference mask (lung and unknown pixels) and its boxes, in the image's frame."""
    image = read_image(image_path).pixels
    height, width = image.shape
    masks: dict[str, np.ndarray] = {}
    if mask_path:
        layers = read_mask_layers(mask_path, image.shape)
        masks[REFERENCE] = layers.lung
        if layers.ignore.any():
            masks[IGNORE] = layers.ignore
    boxes = boxes_for_size(row, width, height) if row and row.get("boxes") else []
    return Sample(image, masks, np.array([b[:4] for b in boxes], np.float32).reshape(-1, 4),
                  [str(b[4]) for b in boxes])


def run_file(pipeline: Pipeline, image_path: str, mask_path: str | None = None, row: dict | None = None) -> Sample:
    """Read an image (and its reference mask and boxes) and :func:`preprocess` it; errors name the file."""
    sample = read_sample(image_path, mask_path, row)
    try:
        return preprocess(sample, pipeline)
    except PreprocessingError as error:
        raise PreprocessingError(f"{image_path}: {error}") from None


_CACHES: dict[tuple[str, Pipeline], PreprocessCache] = {}


def preprocess_file(pipeline: str | dict | Pipeline, path: str, mask_path: str | None = None,
                    row: dict | None = None, cache_dir: str | Path | None = None) -> Sample:
    """One image (with its reference mask and boxes) preprocessed; through the disk cache when ``cache_dir`` is set.

    The picture never depends on ``mask_path``: the row's reference mask only rides along (moved by the
    crops) as a training target; the lung step draws its own mask on every image, whatever its source.

    Raises:
        ImageReadError / PreprocessingError: the file cannot be read or preprocessed (cached failures too).
    """
    pipeline = load_pipeline(pipeline)
    if cache_dir is None:
        return run_file(pipeline, path, mask_path, row)
    cache = _CACHES.get((str(cache_dir), pipeline))
    if cache is None:
        cache = _CACHES[(str(cache_dir), pipeline)] = PreprocessCache(cache_dir, pipeline)
    item, record = cache.get(path, mask_path, row)
    return cache.load(item, record)


# ---------------------------------------------------------------------------------------------------------
# A whole manifest, in parallel
# ---------------------------------------------------------------------------------------------------------

@dataclass
class PreprocessResult:
    """What :func:`preprocess_manifest` did."""

    manifest: pd.DataFrame
    manifest_path: Path
    pipeline: dict[str, Any]
    computed: int
    cached: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


_WORKER_CACHE: PreprocessCache | None = None


def _init_worker(root: str, pipeline: Pipeline, threads: int) -> None:
    """Runs in each spawned worker; the pipeline arrives pickled (its steps' modules import themselves)."""
    global _WORKER_CACHE
    import torch

    torch.set_num_threads(threads)
    _WORKER_CACHE = PreprocessCache(root, pipeline)


def _work(jobs: list[tuple[int, str, str | None, dict]]) -> list[tuple[int, dict]]:
    assert _WORKER_CACHE is not None
    out = []
    for index, image_path, mask_path, row in jobs:
        item = _WORKER_CACHE.item(image_path, mask_path, _box_key(row))
        out.append((index, _WORKER_CACHE.compute(item, image_path, mask_path, row)))
    return out


def preprocess_manifest(frame: pd.DataFrame, pipeline: str | dict | Pipeline, out_dir: str | Path, *,
                        workers: int = 2, progress: bool = True) -> PreprocessResult:
    """Apply a pipeline to every row once and write ``OUT_DIR/<pipeline>.parquet`` (+ ``.csv``).

    The new manifest keeps every column, points ``image_path`` at the cached PNG (the original in
    ``original_image_path``), ``mask_path`` at the reference mask moved with the image, ``lung_mask_path``
    at the mask the pipeline drew, and boxes in the cached image's frame. Rows that fail are left out and
    listed in ``OUT_DIR/<pipeline>.failures.csv`` with their reason.

    Args:
        frame: a manifest.
        pipeline: name, dict or :class:`Pipeline`.
        out_dir: output folder (the cache lives in ``OUT_DIR/cache``).
        workers: processes (each runs torch on one thread); 1 runs in this process.
        progress: show a progress bar.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    cache = PreprocessCache(out_dir / "cache", pipeline)
    records = frame.to_dict("records")
    results: dict[int, tuple[CachedItem, dict]] = {}
    failures: list[tuple[str, str]] = []
    pending: list[tuple[int, str, str | None, dict]] = []
    for index, row in enumerate(records):
        mask_path = str(row.get("mask_path") or "") or None
        try:
            item = cache.item(row["image_path"], mask_path, _box_key(row))
        except LungscreenError as error:
            failures.append((row["image_path"], str(error)))
            continue
        record = cache.record(item)
        if record is None:
            pending.append((index, row["image_path"], mask_path, _box_fields(row)))
        else:
            results[index] = (item, record)
    cached = len(results)
    with progress_or_quiet(progress and bool(pending)) as bar:
        task = bar.add_task(f"preprocessing ({cache.pipeline.name})", total=len(pending))
        jobs = {job[0]: job for job in pending}
        for index, record in _run(cache, pending, workers):
            _, image_path, mask_path, row = jobs[index]
            results[index] = (cache.item(image_path, mask_path, _box_key(row)), record)
            bar.advance(task)
    rows = []
    for index in sorted(results):
        item, record = results[index]
        row = dict(records[index])
        if not record["ok"]:
            failures.append((row["image_path"], record["error"]))
            continue
        rows.append(_output_row(row, item, record, cache))
    manifest = pd.DataFrame(rows, columns=list(frame.columns) + [c for c in _NEW_COLUMNS if c not in frame.columns])
    manifest_path = out_dir / f"{cache.pipeline.name}.parquet"
    if not manifest.empty:
        save_manifest(manifest, manifest_path)
    with atomic_path(out_dir / f"{cache.pipeline.name}.failures.csv") as temporary:
        pd.DataFrame(failures, columns=["image_path", "reason"]).to_csv(temporary, index=False)
    with atomic_path(out_dir / f"{cache.pipeline.name}.pipeline.json") as temporary:
        temporary.write_text(json.dumps(cache.spec, indent=2, sort_keys=True))
    return PreprocessResult(manifest, manifest_path, cache.spec, len(results) - cached, cached, failures,
                            time.perf_counter() - started)


_NEW_COLUMNS = ("original_image_path", "original_mask_path", "lung_mask_path", "pipeline", "pipeline_key")


def _box_fields(row: dict) -> dict:
    return {key: row.get(key, "") for key in ("boxes", "box_frame_width", "box_frame_height")} if row.get("boxes") else {}


def _run(cache: PreprocessCache, pending: list, workers: int):
    """Compute the pending items here (few, or one worker) or in ``workers`` spawned processes."""
    if workers <= 1 or len(pending) <= 2 * CHUNK:
        for index, image_path, mask_path, row in pending:
            item = cache.item(image_path, mask_path, _box_key(row))
            yield index, cache.compute(item, image_path, mask_path, row)
        return
    chunks = [pending[i:i + CHUNK] for i in range(0, len(pending), CHUNK)]
    with worker_pool(workers, _init_worker, (str(cache.folder.parent), cache.pipeline, 1)) as pool:
        for future in as_completed([pool.submit(_work, chunk) for chunk in chunks]):
            yield from future.result()


def _output_row(row: dict, item: CachedItem, record: dict, cache: PreprocessCache) -> dict:
    row["original_image_path"] = row.get("original_image_path") or row["image_path"]
    row["original_mask_path"] = row.get("mask_path", "")
    row["image_path"] = str(item.image)
    row["mask_path"] = str(item.path(MASK_FILES[REFERENCE])) if REFERENCE in record["masks"] else ""
    row["lung_mask_path"] = str(item.path(MASK_FILES[LUNGS])) if LUNGS in record["masks"] else ""
    row["pipeline"] = cache.pipeline.name
    row["pipeline_key"] = cache.key
    if row.get("boxes"):
        row["boxes"] = record["boxes"]
        row["box_frame_width"], row["box_frame_height"] = (record["width"], record["height"]) if record["boxes"] else (0, 0)
    if "width" in row:
        row["width"], row["height"] = record["width"], record["height"]
    return row


__all__ = ["CACHE_VERSION", "PreprocessCache", "PreprocessResult", "file_identity", "preprocess_file",
           "preprocess_manifest", "read_sample", "run_file"]
