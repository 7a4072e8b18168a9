"""The console commands print their tables to.

A terminal gets its own width; a pipe or a log file gets at least 120 columns, so tables such as the
composition table are never cut to Rich's default of 80.
"""

from __future__ import annotations

import shutil
import sys

from rich.console import Console


def stdout_console() -> Console:
    if sys.stdout.isatty():
        return Console()
    return Console(width=max(120, shutil.get_terminal_size().columns))
