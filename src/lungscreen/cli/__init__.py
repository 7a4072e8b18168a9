"""The ``lungscreen`` command line.

Each command group lives in its own module and registers on :data:`app`. Bad input raises a
:class:`~lungscreen.errors.LungscreenError`, which :func:`main` prints as one red line (no traceback) with
exit code 2; ``LUNGSCREEN_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from lungscreen.errors import LungscreenError

app = typer.Typer(
    name="lungscreen",
    help="Screen chest X-ray and CT images for COVID-19 and pneumonia: build datasets from public sources, "
    "remove their biases, train the papers' models and measure them honestly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _register() -> None:
    """Attach every command group (imported here so each module stays independent)."""
    from lungscreen.cli import data, demo  # noqa: F401

    app.add_typer(data.app, name="data")
    app.command("demo")(demo.demo)


def main() -> None:
    """Entry point of the console script."""
    _register()
    try:
        app()
    except LungscreenError as error:
        if os.environ.get("LUNGSCREEN_DEBUG"):
            raise
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
