"""Build one manifest from data folders: detect sources, read, join, verify images, dedup, split, guard.

Steps, each its own function so tests and later issues can reuse them:

1. :func:`read_sources` (or :func:`collect_rows`) - find every known layout under the folders and read it
   with its adapter; annotation-only sources (v7labs masks) are joined onto the rows of the source they
   annotate (:class:`Join` says onto how many). Folders are made absolute first, so every path in the
   rows is absolute and nothing downstream depends on the working folder.
2. :func:`inspect_images` - decode every image once (in parallel): unreadable files become reported
   skips, readable ones get their size and a near-duplicate fingerprint.
3. :func:`lungscreen.data.dedup.find_duplicates` - near-duplicate groups within and across sources.
4. :func:`lungscreen.data.splits.assign_splits` + :func:`~lungscreen.data.splits.check_leakage`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lungscreen.data.dedup import THUMBNAIL, DuplicatePair, detail_image, duplicate_groups, find_duplicates, fingerprint
from lungscreen.data.manifest import absolute_paths, validate
from lungscreen.data.sources import Skips, detect_sources, get_source
from lungscreen.data.splits import assign_splits, check_leakage
from lungscreen.errors import LungscreenError, SourceError
from lungscreen.interrupts import worker_pool
from lungscreen.io.images import read_image
from lungscreen.progress import track


@dataclass(frozen=True)
class Join:
    """What an annotation source (no images of its own) added to the rows of the source it annotates."""

    target: str  # the annotated source, e.g. "cohen"
    rows: int  # target rows it was joined onto
    masks: int  # of those, rows it gave a lung mask

    def describe(self) -> str:
        """Why the source has no row of its own in the composition table, for the build's found-list."""
        return f"annotations, not images: joined onto {self.rows} {self.target} rows, {self.masks} with a lung mask"


@dataclass
class BuildResult:
    """A built manifest and what was learnt on the way."""

    manifest: pd.DataFrame
    skips: Skips
    sources: list[tuple[str, Path]]
    duplicates: list[DuplicatePair] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per step
    joins: dict[tuple[str, Path], Join] = field(default_factory=dict)  # annotation (source, root) -> its join


@dataclass
class Collected:
    """Rows read from the folders, the (source, root) layouts found, and each annotation source's join."""

    frame: pd.DataFrame
    found: list[tuple[str, Path]]
    joins: dict[tuple[str, Path], Join]


def collect_rows(folders: Sequence[str | Path], skips: Skips) -> tuple[pd.DataFrame, list[tuple[str, Path]]]:
    """Rows and found layouts of :func:`read_sources` (for callers that need no join counts)."""
    collected = read_sources(folders, skips)
    return collected.frame, collected.found


def read_sources(folders: Sequence[str | Path], skips: Skips) -> Collected:
    """Detect and read every source layout under ``folders``; join annotation sources onto their images.

    Folders are made absolute first, so every path in the rows is (the manifest's in-memory rule).
    """
    found: list[tuple[str, Path]] = []
    for folder in (Path(os.path.abspath(f)) for f in folders):
        if not folder.is_dir():
            raise SourceError(f"{folder}: not a folder")
        found.extend(detect_sources(folder))
    if not found:
        raise SourceError(f"no known dataset layout found in {', '.join(map(str, folders))} "
                          "(see `lungscreen data sources` for the layouts lungscreen reads)")
    rows: list[dict] = []
    annotations: list[tuple[tuple[str, Path], str, list[dict]]] = []
    for name, root in found:
        adapter = get_source(name)
        read = adapter.read(root, skips)
        target = getattr(adapter, "joins", None)
        if target:
            annotations.append(((name, root), target, read))
        else:
            rows.extend(read)
    frame = pd.DataFrame(rows)
    if frame.empty:
        raise SourceError("the folders hold no usable images")
    joins: dict[tuple[str, Path], Join] = {}
    for key, target, annotation_rows in annotations:
        frame, joins[key] = join_annotations(frame, target, annotation_rows, skips)
    return Collected(absolute_paths(frame), found, joins)


def join_annotations(frame: pd.DataFrame, target: str, annotations: list[dict],
                     skips: Skips) -> tuple[pd.DataFrame, Join]:
    """Fill fields (mask_path, ...) of ``target``-source rows from annotation rows matched by file name.

    Returns:
        The filled rows and the :class:`Join` (how many target rows were annotated, how many got a mask).
    """
    names = frame["image_path"].map(lambda path: Path(path).name)
    lookup = {name: index for index, name in names[frame["source"] == target].items()}
    frame = frame.copy()
    joined, masked = set(), set()
    for annotation in annotations:
        name = annotation["join_name"]
        if name not in lookup:
            skips.add(annotation.get("mask_path") or name, f"annotation for {name}: image not found in source {target!r}")
            continue
        joined.add(lookup[name])
        if annotation.get("mask_path"):
            masked.add(lookup[name])
        for key, value in annotation.items():
            if key == "join_name" or value in ("", None):
                continue
            if key not in frame.columns:
                frame[key] = ""
            frame.at[lookup[name], key] = value
    return frame, Join(target, len(joined), len(masked))


def _inspect(path: str) -> tuple[int, int, int, bytes] | str:
    """Worker: decode one image and fingerprint it, or return why it cannot be read."""
    try:
        image = read_image(path)
    except LungscreenError as error:
        return getattr(error, "reason", str(error))
    mark = fingerprint(image.pixels)
    return image.width, image.height, mark.phash, mark.thumbnail.astype(np.float16).tobytes()


def inspect_images(frame: pd.DataFrame, skips: Skips, workers: int = 2,
                   show_progress: bool = True) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Decode every image: drop unreadable ones (reported), add width/height/phash columns.

    Returns:
        The readable rows, their uint64 pHashes and their float32 thumbnails (for dedup).
    """
    paths = frame["image_path"].tolist()
    if workers > 1 and len(paths) > 64:
        # spawned workers (a forked child hangs in OpenCV when the parent has started OpenCV's thread pool)
        # that leave Ctrl-C to this process, which cancels the queued work
        with worker_pool(workers) as pool:
            results = list(track(pool.map(_inspect, paths, chunksize=32), "reading images", len(paths), show_progress))
    else:
        results = list(track(map(_inspect, paths), "reading images", len(paths), show_progress))
    readable = np.array([not isinstance(result, str) for result in results], dtype=bool)
    for path, result in zip(paths, results):
        if isinstance(result, str):
            skips.add(path, f"unreadable image: {result}")
    kept = [result for result in results if not isinstance(result, str)]
    frame = frame.loc[readable].reset_index(drop=True)
    frame["width"] = [r[0] for r in kept]
    frame["height"] = [r[1] for r in kept]
    hashes = np.array([r[2] for r in kept], dtype=np.uint64)
    frame["phash"] = [f"{h:016x}" for h in hashes]
    thumbnails = np.frombuffer(b"".join(r[3] for r in kept), dtype=np.float16).reshape(-1, THUMBNAIL * THUMBNAIL)
    return frame, hashes, thumbnails.astype(np.float32)


def detail_reader(paths: Sequence[str]) -> Callable[[int], np.ndarray]:
    """index -> high-pass detail image of that file, for the few pairs dedup cannot settle on thumbnails."""
    return lambda index: detail_image(read_image(paths[index]).pixels)


def mark_duplicates(frame: pd.DataFrame, hashes: np.ndarray, thumbnails: np.ndarray) -> tuple[pd.DataFrame, list[DuplicatePair]]:
    """Add a ``dup_group`` column ('' for images without a near-duplicate)."""
    pairs = find_duplicates(hashes, thumbnails, detail_reader(frame["image_path"].tolist()))
    groups = duplicate_groups(len(frame), pairs)
    frame = frame.copy()
    frame["dup_group"] = [f"dup{g}" if g >= 0 else "" for g in groups]
    return frame, pairs


def build_manifest(folders: Sequence[str | Path], *, ratios: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0,
                   workers: int = 2, show_progress: bool = True) -> BuildResult:
    """The whole build: rows from every source, readable images only, duplicates grouped, split, guarded."""
    skips, seconds = Skips(), {}
    with _timed(seconds, "read sources"):
        collected = read_sources(folders, skips)
        frame = validate(collected.frame)
    with _timed(seconds, "decode images"):
        frame, hashes, thumbnails = inspect_images(frame, skips, workers=workers, show_progress=show_progress)
    if frame.empty:
        raise SourceError("no readable image in the folders")
    with _timed(seconds, "near-duplicates"):
        frame, pairs = mark_duplicates(frame, hashes, thumbnails)
    with _timed(seconds, "split and guard"):
        frame["split"] = assign_splits(frame, ratios=ratios, seed=seed)
        check_leakage(frame)
        frame = validate(frame)
    return BuildResult(frame, skips, collected.found, pairs, seconds, collected.joins)


def data_folder(paths: Sequence[str], climb: int = 3) -> Path | None:
    """The folder to give ``lungscreen data build`` to read these images again, or None when none is known.

    That is their common folder when a known layout lies in it, else the nearest of its ``climb`` parents that
    is itself a layout's root (the images of one source sit in a subfolder of it, e.g. cohen's ``images/``).
    """
    listed = [p for p in paths if p]
    if not listed:
        return None
    common = Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in listed]))
    for depth, folder in enumerate([common, *list(common.parents)[:climb]]):
        if folder.parent == folder:
            return None  # never scan a whole file system
        try:
            if folder.is_dir() and detect_sources(folder, max_depth=2 if depth == 0 else 0):
                return folder
        except OSError:
            return None
    return None


@contextmanager
def _timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - start
