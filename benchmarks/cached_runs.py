"""What the benchmarks that train share: a run folder per named run, reused when finished, resumed when cut."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent


def run(name: str, raw: dict[str, Any], cache: Path) -> tuple[Path, float | None]:
    """Train the recipe ``raw`` into ``cache/name`` (resuming an interrupted run); the wall seconds, None when
    the finished run was reused."""
    from lungscreen.training.config import from_dict
    from lungscreen.training.engine import train

    folder = cache / name
    if (folder / "summary.json").exists():
        return folder, None
    started = time.perf_counter()
    resume = folder if (folder / "config.yaml").exists() else None
    train(None if resume else from_dict(raw), out=None if resume else folder, resume=resume)  # type: ignore[arg-type]
    return folder, round(time.perf_counter() - started, 1)


def shown(path: str | Path) -> str:
    """A path as written in a results JSON, never a machine's absolute one: relative to the repository when
    inside it, ``~/...`` under the home folder, else its name and where it lay (a temporary folder)."""
    path = Path(path).resolve()
    if path.is_relative_to(REPOSITORY):
        return str(path.relative_to(REPOSITORY))
    if path.is_relative_to(Path.home()):
        return str(Path("~") / path.relative_to(Path.home()))
    return f"{path.name} (outside the repository)"
