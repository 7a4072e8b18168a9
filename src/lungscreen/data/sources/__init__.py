"""Source adapters: one per public dataset layout, each reading the original files unchanged.

Importing this package registers every adapter; :func:`detect_sources` then finds them in a folder.
"""

from lungscreen.data.sources import (  # noqa: F401  (each import registers its adapters)
    agchung,
    cohen,
    covid_ct,
    kermany,
    lung_masks,
    nih,
    radiography,
    rsna,
    v7labs,
)
from lungscreen.data.sources.base import (
    Skips,
    SourceAdapter,
    detect_sources,
    get_source,
    list_sources,
    read_table,
    register_source,
)

__all__ = ["Skips", "SourceAdapter", "detect_sources", "get_source", "list_sources", "read_table", "register_source"]
