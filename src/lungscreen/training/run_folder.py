"""The run folder's plumbing: its default name, its JSON files, the log every print is copied to.

Kept apart from the run so that preparation, callbacks and tracking can read and write the folder without
importing the training loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from lungscreen.errors import ConfigError
from lungscreen.io.files import write_atomic

if TYPE_CHECKING:
    from lungscreen.training.config import TrainConfig
    from lungscreen.training.distributed import DistEnv


def default_run_dir(config: TrainConfig, env: DistEnv) -> Path:
    if env.distributed:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if run_id in ("", "none"):
            raise ConfigError("--out: under torchrun give the run folder explicitly (every process must agree)")
        return Path("runs") / f"{config.name}-{run_id}"
    return Path("runs") / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"


def write_json(path: Path, content: Any) -> None:
    text = json.dumps(content, indent=2, default=_plain)
    write_atomic(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


#: A terminal control sequence (colours, cursor moves, erasing): meaningless in a file.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


class _LogLines:
    """The log's side of the tee: whole lines of plain text.

    Progress bars draw on the terminal itself (:func:`terminal_stream`), never through the tee, so what
    arrives here is the run's own lines; of a line redrawn in place (``\r``) only the final text is kept,
    colours and other control codes are dropped, and blank lines are skipped. Each line reaches the file
    as soon as its newline arrives, so ``tail -f log.txt`` follows the run.
    """

    def __init__(self, handle: TextIO) -> None:
        self.handle, self.pending = handle, ""
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.pending += text
            *lines, self.pending = self.pending.split("\n")
            for line in lines:
                self._emit(line)
        return len(text)

    def _emit(self, line: str) -> None:
        line = _CONTROL.sub("", line).rsplit("\r", 1)[-1].rstrip()
        if line.strip():
            self.handle.write(line + "\n")
            self.handle.flush()

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        """Write the unfinished last line too."""
        with self.lock:
            self._emit(self.pending)
            self.pending = ""


class _Tee:
    """stdout or stderr during a run: every write goes to the terminal as is and to the log as lines.

    Terminal writes go out a line at a time (partial lines on flush), each drawn above any tqdm progress
    bar on ``bars`` (cleared, written, redrawn, as ``tqdm.write`` does), so printing never breaks a bar.
    """

    def __init__(self, terminal: TextIO, log: _LogLines, bars: TextIO) -> None:
        self.terminal, self.log, self.bars = terminal, log, bars
        self.pending = ""
        self.lock = threading.RLock()

    def write(self, text: str) -> int:
        self.log.write(text)
        with self.lock:
            self.pending += text
            cut = self.pending.rfind("\n") + 1
            if cut:
                lines, self.pending = self.pending[:cut], self.pending[cut:]
                with _above_progress_bars(self.bars):
                    self.terminal.write(lines)
                    self.terminal.flush()
        return len(text)

    def flush(self) -> None:
        with self.lock:
            if self.pending:
                self.terminal.write(self.pending)
                self.pending = ""
            self.terminal.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.terminal, "isatty", lambda: False)())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.terminal, name)


def _above_progress_bars(bars: TextIO) -> contextlib.AbstractContextManager:
    """tqdm's own way to print past its bars on ``bars`` (only when tqdm is in use at all)."""
    tqdm = sys.modules.get("tqdm.std")
    if tqdm is None or not getattr(tqdm.tqdm, "_instances", None):  # no bar alive: nothing to clear
        return contextlib.nullcontext()
    return tqdm.tqdm.external_write_mode(file=bars)


def terminal_stream() -> TextIO:
    """stderr as the terminal gets it, past the run log: where progress bars draw, so that their redraws
    stay on the terminal and out of log.txt."""
    return _terminal_of(sys.stderr)


def _terminal_of(stream: TextIO) -> TextIO:
    while isinstance(stream, _Tee):  # a run inside a run (a search's trials) logs twice, draws once
        stream = stream.terminal
    return stream


@contextlib.contextmanager
def run_log(path: Path | None) -> Iterator[None]:
    """Copy everything printed (stdout, stderr, Lightning's log) to ``path``, appended, as plain text lines:
    no colour codes, no carriage-return redraws (see :class:`_LogLines`)."""
    if path is None:
        yield
        return
    import logging

    with path.open("a", encoding="utf-8") as handle:
        log = _LogLines(handle)
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(message)s"))
        loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lungscreen")]
        for logger in loggers:
            logger.addHandler(handler)
        stdout, stderr = sys.stdout, sys.stderr
        bars = _terminal_of(stderr)
        sys.stdout, sys.stderr = _Tee(stdout, log, bars), _Tee(stderr, log, bars)
        try:
            yield
        finally:
            for tee in (sys.stdout, sys.stderr):
                if isinstance(tee, _Tee):
                    tee.flush()
            sys.stdout, sys.stderr = stdout, stderr
            for logger in loggers:
                logger.removeHandler(handler)
            log.close()


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's banners and the warnings that do not apply here (we choose 0 loader workers
    on purpose: images are in memory; the run folder is reused on resume)."""
    import logging
    import warnings

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for pattern in (".*does not have many workers.*", ".*LeafSpec.*", ".*exists and is not empty.*",
                        ".*is smaller than the logging interval.*", ".*ModelCheckpoint.*monitor.*",
                        ".*module\\(s\\) in eval mode.*", ".*but have no `val_dataloader`.*"):
            warnings.filterwarnings("ignore", message=pattern)
        try:
            yield
        finally:
            logger.setLevel(level)


def say(text: str) -> None:
    print(text, flush=True)


def log_only(text: str) -> None:
    """A line for the run log alone: what the command line's error boundary shows on the terminal anyway
    (an interrupt's one line), so a terminal never shows it twice."""
    if isinstance(sys.stdout, _Tee):
        sys.stdout.log.write(text + "\n")
