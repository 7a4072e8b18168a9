"""The console commands print their tables to.

A terminal gets its own width; a pipe or a log file gets at least 120 columns, so tables such as the
composition table are never cut to Rich's default of 80.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from rich.console import Console


def stdout_console() -> Console:
    if sys.stdout.isatty():
        return Console()
    return Console(width=max(120, shutil.get_terminal_size().columns))


def ensure_folder(target: Path, mkdir: bool, option: str = "--out") -> None:
    """The folder ``target`` goes into must exist, or be asked for: a typo never becomes a new folder tree."""
    from lungscreen.errors import ConfigError

    folder = target.parent
    if folder.is_dir():
        return
    if not mkdir:
        raise ConfigError(f"{option}: the folder {folder} does not exist (create it, or pass --mkdir)")
    folder.mkdir(parents=True)
