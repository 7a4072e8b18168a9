"""The run folder's plumbing: its default name, its JSON files, the log every print is copied to.

Kept apart from the run so that preparation, callbacks and tracking can read and write the folder without
importing the training loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lungscreen.errors import ConfigError
from lungscreen.io.files import write_atomic

if TYPE_CHECKING:
    from lungscreen.training.config import TrainConfig
    from lungscreen.training.prepare import DistEnv


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


class _Tee:
    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.streams[0], "isatty", lambda: False)())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.streams[0], name)


@contextlib.contextmanager
def run_log(path: Path | None) -> Iterator[None]:
    """Copy everything printed (stdout, stderr, Lightning's log) to ``path``, appended."""
    if path is None:
        yield
        return
    import logging

    with path.open("a", encoding="utf-8", buffering=1) as handle:
        handler = logging.StreamHandler(handle)
        handler.setFormatter(logging.Formatter("%(message)s"))
        loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lungscreen")]
        for logger in loggers:
            logger.addHandler(handler)
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(stdout, handle), _Tee(stderr, handle)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = stdout, stderr
            for logger in loggers:
                logger.removeHandler(handler)


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
