"""README.md's Python example runs as written: it is read out of the README here, so the README cannot rot."""

from __future__ import annotations

import shutil
from pathlib import Path

from pacs_fixtures import train_tiny
from training_fixtures import make_manifest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    """The first ```python block of the README's "From Python" section."""
    section = README.read_text(encoding="utf-8").split("## From Python", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The folders the example names, as `lungscreen demo` leaves them: a run, and films of its kind."""
    demo = tmp_path / "lungscreen-demo" / "clean"
    train_tiny(make_manifest(tmp_path / "train", per_class=8), demo / "run")
    films = make_manifest(tmp_path / "films", per_class=2, seed=5).parent
    (demo / "data" / "images").mkdir(parents=True)
    for film in sorted(films.glob("*.png")):
        shutil.copy(film, demo / "data" / "images" / film.name)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(python_example(), str(README), "exec"), namespace)  # noqa: S102 - the README's own example
    printed = capsys.readouterr().out
    assert "prediction" in printed and len(namespace["table"]) == 4
    assert "COVID-19" in printed and ("flagged" in printed or "most probable" in printed)
    assert namespace["overlay"].shape[2] == 3
