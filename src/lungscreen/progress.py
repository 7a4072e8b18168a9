"""Progress bars for long work, one look everywhere (Rich, on stderr so stdout stays parseable)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
_console = Console(stderr=True)


def progress_bar() -> Progress:
    """A Rich progress display: description, bar, done/total, elapsed and remaining time.

    Shown on a terminal only: in a pipe or a log file a bar is noise (and its last frame would stand in
    front of an error message).
    """
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=_console, transient=False,
        disable=not _console.is_terminal,
    )


def progress_or_quiet(enabled: bool) -> Progress:
    """The shared progress display, or a disabled one (tests, worker processes)."""
    return progress_bar() if enabled else Progress(disable=True)


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate with a progress bar (or silently when ``enabled`` is False, e.g. inside tests or workers)."""
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar() as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
