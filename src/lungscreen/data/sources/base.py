"""What every source adapter is: a layout detector and a reader of the original files, unchanged.

An adapter knows one public layout. :meth:`SourceAdapter.matches` says whether a folder *is* that
layout (by its signature files), :meth:`SourceAdapter.read` turns it into manifest rows. Problems with
single files (listed but absent, unknown label) are reported through :class:`Skips` and the read goes
on; a folder that is not the layout at all raises :class:`SourceError`.

New adapters register themselves with :func:`register_source`, as timm models do with
``@register_model``.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd

from lungscreen.errors import LungscreenError, ManifestError, SourceError

_REGISTRY: dict[str, type[SourceAdapter]] = {}


@dataclass
class Skips:
    """Files left out of a build, each with its reason, so the user sees them instead of losing them."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str | Path, reason: str) -> None:
        self.items.append((str(path), reason))

    def __len__(self) -> int:
        return len(self.items)

    def by_reason(self) -> dict[str, int]:
        """Counts per reason, for the summary line."""
        counts: dict[str, int] = {}
        for _, reason in self.items:
            counts[reason] = counts.get(reason, 0) + 1
        return counts


class SourceAdapter(ABC):
    """One public dataset layout.

    Class attributes:
        name: short id used in the manifest's ``source`` column and on the command line.
        description: one line for ``--help`` and listings.
        modality: "CXR" or "CT" (the modality of most rows; rows may still override it).
        joins: name of the source whose rows this one annotates (e.g. v7labs masks on "cohen" images), or
            None for a source with images of its own. A joining adapter returns rows with a ``join_name``
            key (the other source's image file name) plus only the fields it fills in.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    modality: ClassVar[str] = "CXR"
    joins: ClassVar[str | None] = None

    @classmethod
    @abstractmethod
    def matches(cls, folder: Path) -> bool:
        """True when ``folder`` is the root of this layout (signature files present)."""

    @abstractmethod
    def read(self, folder: Path, skips: Skips) -> list[dict]:
        """Manifest rows (see :func:`lungscreen.data.manifest.new_row`) for every usable image."""

    def patient(self, identifier: object) -> str:
        """Patient id namespaced by source, so 'cohen:12' never meets 'nih:12'."""
        return f"{self.name}:{identifier}"


def register_source(cls: type[SourceAdapter]) -> type[SourceAdapter]:
    """Class decorator adding an adapter to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"source {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def list_sources(pattern: str = "*") -> list[str]:
    """Registered source names matching a shell-style pattern."""
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def get_source(name: str) -> SourceAdapter:
    """An adapter instance by name, with the known names in the error."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise SourceError(f"unknown source {name!r}; known: {', '.join(list_sources())}") from None


def detect_sources(folder: str | Path, max_depth: int = 3) -> list[tuple[str, Path]]:
    """Every (source name, layout root) found in ``folder`` or below it, outermost match first.

    A folder claimed by one adapter is not searched further, so a source's own subfolders are never
    mistaken for another layout.
    """
    found: list[tuple[str, Path]] = []
    pending = [(Path(folder), 0)]
    while pending:
        current, depth = pending.pop(0)
        claimed = [name for name, cls in sorted(_REGISTRY.items()) if cls.matches(current)]
        if claimed:
            found.extend((name, current) for name in claimed)
            continue
        if depth < max_depth:
            children = sorted(p for p in current.iterdir() if p.is_dir() and not p.name.startswith("."))
            pending.extend((child, depth + 1) for child in children)
    return found


def read_table(path: Path, required: tuple[str, ...], **options) -> pd.DataFrame:
    """Read a metadata CSV whatever its encoding, and check the columns an adapter needs.

    Public metadata files are not always UTF-8 (Figure1's is Latin-1): we try UTF-8 first, then
    Latin-1 (which decodes any byte), so a file is never refused for its encoding alone.
    """
    if not path.exists():
        raise SourceError(f"{path}: metadata file missing")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", **options)
    except UnicodeDecodeError:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="latin-1", **options)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise SourceError(f"{path}: not a readable CSV table ({error})") from None
    return require_columns(table, required, path)


def require_columns(table: pd.DataFrame, required: tuple[str, ...], path: Path) -> pd.DataFrame:
    """Strip the column names and check that ``required`` are there; the error names file and columns."""
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(table.columns[:12])})")
    return table


__all__ = [
    "LungscreenError", "Skips", "SourceAdapter", "detect_sources", "get_source", "list_sources", "read_table",
    "register_source", "require_columns",
]
