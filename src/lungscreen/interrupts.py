"""Ctrl-C and SIGTERM end a long command with one line and the conventional exit code, never a traceback.

The command line installs handlers (:func:`install`) that turn SIGINT and SIGTERM into :class:`Interrupted`,
a ``BaseException`` (as ``KeyboardInterrupt`` is), so no ``except Exception`` swallows it on the way up.
Work that must not stop half way (a training step writing its checkpoint) runs inside :func:`deferred`:
there a signal is only recorded, and the loop calls :func:`check` at a safe point (the end of a batch)
to stop cleanly. Worker processes call :func:`ignore_in_worker` so that a signal sent to the whole
process group (a terminal's Ctrl-C) is handled once, by the parent, which then shuts the workers down.

Example:
    >>> with deferred():                     # doctest: +SKIP
    ...     for batch in loader:
    ...         step(batch)
    ...         check()                      # raises Interrupted here, between batches
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from types import FrameType

#: The signals a long command stops on.
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_pending: int | None = None
_deferring = 0


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, an event rather than an error
    """A command was asked to stop by a signal.

    Attributes:
        signum: the signal received.
        where: what was under way ("at epoch 3 of stage all"), for the one-line message.
        hint: how to continue ("resume with lungscreen train --resume RUN").
    """

    def __init__(self, signum: int, where: str = "", hint: str = "") -> None:
        super().__init__(signum)
        self.signum, self.where, self.hint = int(signum), where, hint

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as shells report it: 130 for Ctrl-C, 143 for SIGTERM."""
        return 128 + self.signum

    def message(self) -> str:
        text = f"interrupted ({signal.Signals(self.signum).name})"
        if self.where:
            text += f" {self.where}"
        return text + (f"; {self.hint}" if self.hint else "")


def _handle(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _deferring:
        _pending = signum  # stop at the next safe point
        return
    raise Interrupted(signum)


def install() -> None:
    """Make SIGINT and SIGTERM raise :class:`Interrupted` in this (main) process."""
    for signum in SIGNALS:
        signal.signal(signum, _handle)


def ignore_in_worker() -> None:
    """In a worker process: leave SIGINT and SIGTERM to the parent, which stops and reaps its workers."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block, a signal is recorded instead of raised; :func:`check` raises it at a safe point."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _pending is not None:
        signum, _pending = _pending, None
        raise Interrupted(signum)


def pending() -> int | None:
    """The signal received while deferring, if any."""
    return _pending


def check() -> None:
    """Raise :class:`Interrupted` if a signal arrived while deferring (call it between units of work)."""
    global _pending
    if _pending is not None:
        signum, _pending = _pending, None
        raise Interrupted(signum)


def _start_worker(initializer: Callable[..., object] | None, *args: object) -> None:
    ignore_in_worker()
    if initializer is not None:
        initializer(*args)


@contextlib.contextmanager
def worker_pool(workers: int, initializer: Callable[..., object] | None = None,
                initargs: tuple = ()) -> Iterator[ProcessPoolExecutor]:
    """A process pool (spawned, not forked: a fork of a process running torch threads can deadlock) whose
    workers leave signals to this process; on an interrupt, queued work is cancelled and only the chunks
    already running are waited for, so the command stops within seconds and leaves no orphan."""
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_start_worker,
                               initargs=(initializer, *initargs))
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
