"""Shared fixtures: the real public images in ../shared/data, skipped with a reason where absent."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Two cores: keep torch from oversubscribing when pytest runs beside other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(os.environ.get("LUNGSCREEN_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (or $LUNGSCREEN_SHARED_DATA); skip where it is absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real public images not found at {SHARED_DATA} (set LUNGSCREEN_SHARED_DATA to use them)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def isolated_user_files(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never read or write the user's lung model, caches or data folders (results must not depend
    on what this machine's user trained before)."""
    home = tmp_path_factory.mktemp("user-files")
    os.environ["LUNGSCREEN_LUNG_MODEL"] = str(home / "no-lung-model.pt")
    os.environ["LUNGSCREEN_CACHE"] = str(home / "cache")
    os.environ["XDG_DATA_HOME"] = str(home / "data")
    os.environ["XDG_CACHE_HOME"] = str(home / "cache-home")


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Run:
    """``cli(*arguments)`` -> (exit code, stdout, stderr) of ``lungscreen ARGUMENTS`` run in this process
    through its real entry point (the error boundary); the process's signal handlers are restored after."""
    from lungscreen.cli import main

    def run(*arguments: object) -> tuple[int, str, str]:
        handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        monkeypatch.setattr(sys, "argv", ["lungscreen", *map(str, arguments)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
