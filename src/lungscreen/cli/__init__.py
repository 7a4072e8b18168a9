"""The ``lungscreen`` command line.

Each command group lives in its own module and registers on :data:`app`. :func:`main` runs the app inside
the one error boundary (:mod:`lungscreen.cli.boundary`): bad input is one red line with exit code 2, an
interrupt one line with 130 / 143, a bug one line saying so (``LUNGSCREEN_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import typer
from rich.console import Console


app = typer.Typer(
    name="lungscreen",
    help="Screen chest X-ray and CT images for COVID-19 and pneumonia: build datasets from public sources, "
    "remove their biases, train the papers' models and measure them honestly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs re-flow to the terminal width
)
console = Console(stderr=True)


_registered = False


def _flags_show_no_value() -> None:
    """Typer's help prints a flag's Python type (``--quick <bool>``, ``--help <bool>``) as if the flag took a
    value; a flag takes none, so its help shows none (the options that take values keep theirs)."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "flags_show_no_value", False):
        return

    def display_type_rich(self: TyperOption, ctx):  # noqa: ANN001, ANN202 - Typer's own signature
        return None if self.is_flag or self.count else shown(self, ctx)

    display_type_rich.flags_show_no_value = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


def _register() -> None:
    """Attach every command group (imported here so each module stays independent); once per process."""
    global _registered
    if _registered:
        return
    _registered = True
    _flags_show_no_value()
    from lungscreen.cli import data, demo, models  # noqa: F401

    app.add_typer(data.app, name="data")
    app.add_typer(models.app, name="models")
    app.command("demo")(demo.demo)
    from lungscreen.cli import predict as predict_cli, train as train_cli  # noqa: E402

    app.command("train")(train_cli.train)
    app.command("tune")(train_cli.tune)
    app.command("predict")(predict_cli.predict)
    from lungscreen.cli import export as export_cli  # noqa: E402

    app.command("export")(export_cli.export)
    from lungscreen.cli import adapt as adapt_cli  # noqa: E402

    app.command("adapt")(adapt_cli.adapt)
    from lungscreen.cli import explain as explain_cli  # noqa: E402

    app.command("explain")(explain_cli.explain)
    from lungscreen.cli import evaluate as evaluate_cli  # noqa: E402

    app.command("evaluate")(evaluate_cli.evaluate)
    app.command("audit")(evaluate_cli.audit)
    from lungscreen.cli import lungs as lungs_cli, preprocess as preprocess_cli  # noqa: E402

    app.add_typer(lungs_cli.app, name="lungs")
    app.command("preprocess")(preprocess_cli.preprocess)
    from lungscreen.cli import serve as serve_cli  # noqa: E402

    app.command("serve")(serve_cli.serve)
    from lungscreen.cli import pacs as pacs_cli  # noqa: E402

    app.add_typer(pacs_cli.app, name="pacs")


def main() -> None:
    """Entry point of the console script."""
    from lungscreen.cli.boundary import run

    _register()
    run(app)
