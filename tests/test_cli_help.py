"""`--help` explains with examples: the main commands end with Examples a user can copy, and a flag never shows
a value type (Typer printed `--quick <bool>` as if the flag took a value)."""

from __future__ import annotations

import pytest

#: The commands a new user meets first: each must show how it is called.
MAIN_COMMANDS = [("demo",), ("train",), ("tune",), ("predict",), ("evaluate",), ("audit",), ("explain",), ("export",),
                 ("serve",), ("preprocess",), ("data", "build"), ("data", "validate"), ("data", "import"),
                 ("lungs", "train")]


def every_command() -> list[tuple[str, ...]]:
    """The path of every command and group of `lungscreen`, walked from the real command tree."""
    import typer

    from lungscreen.cli import _register, app

    _register()
    paths: list[tuple[str, ...]] = [()]

    def walk(group, prefix: tuple[str, ...]) -> None:
        for name, command in getattr(group, "commands", {}).items():
            paths.append((*prefix, name))
            walk(command, (*prefix, name))

    walk(typer.main.get_command(app), ())
    return paths


@pytest.mark.parametrize("path", every_command(), ids=lambda path: " ".join(path) or "lungscreen")
def test_no_flag_shows_a_value_type(cli, path):
    code, out, err = cli(*path, "--help")
    assert code == 0, err
    assert "<bool>" not in out and "Usage" in out


@pytest.mark.parametrize("path", MAIN_COMMANDS, ids=" ".join)
def test_main_commands_end_with_examples(cli, path):
    _, out, _ = cli(*path, "--help")
    examples = out[out.index("Examples"):] if "Examples" in out else ""
    lines = [line.strip() for line in examples.splitlines() if line.strip().startswith("lungscreen ")]
    assert any(line.startswith("lungscreen " + " ".join(path)) for line in lines), out
