"""File helpers shared by every writer and reader: atomic writes, content hashes, folder scans."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from lungscreen.errors import LungscreenError
from lungscreen.io.images import IMAGE_SUFFIXES


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    A crash or an exception never leaves a half-written output: either the old file or the new one. An
    error of the file system (a read-only folder, a full disk) names ``target``, never the temporary file.

    Example:
        >>> with atomic_path("out.csv") as tmp:        # doctest: +SKIP
        ...     frame.to_csv(tmp)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise _about(error, target) from None
    os.close(handle)
    temporary = Path(name)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield temporary
        os.replace(temporary, target)
    except OSError as error:
        if str(temporary) not in (error.filename, error.filename2):
            raise
        raise _about(error, target) from None
    finally:
        temporary.unlink(missing_ok=True)


def _about(error: OSError, target: Path) -> OSError:
    """The same error about ``target``: the hidden temporary file beside it is ours, not the user's."""
    return type(error)(error.errno, error.strerror or str(error), str(target))


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_atomic(target: str | Path, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``target`` atomically."""
    with atomic_path(target) as temporary:
        writer(temporary)
    return Path(target)


def write_png(target: str | Path, pixels: np.ndarray) -> Path:
    """Encode a uint8 array (grey or BGR) as PNG and write it atomically."""
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise LungscreenError(f"{target}: PNG encoding failed")
    with atomic_path(target) as temporary:
        temporary.write_bytes(encoded.tobytes())
    return Path(target)


def iter_image_files(*inputs: str | Path) -> Iterator[Path]:
    """Image files named directly or found recursively under folders, sorted per folder."""
    for item in map(Path, inputs):
        if item.is_dir():
            yield from sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield item


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) so repeated calls cost one ``stat``."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
