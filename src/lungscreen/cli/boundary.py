"""The one error boundary of the command line: what reaches the user is one line and an honest exit code.

==========================================  ==================================================  =========
what happened                               what the user sees                                  exit code
==========================================  ==================================================  =========
bad input (:class:`LungscreenError`, or an   ``error: <file or key>: <reason>``                  2
expected library error: YAML, pydantic,
unpickling, Arrow, a file system error;
a usage error of the command line)
Ctrl-C / SIGTERM                             ``interrupted (SIGINT) at epoch 3; resume with...``  130 / 143
anything else (a bug)                        ``error: internal error (...)``, and where the      1
                                             traceback is (``LUNGSCREEN_DEBUG=1``)
==========================================  ==================================================  =========

Warnings, ours and the libraries', are shown once each as one ``warning:`` line, without the source line
Python would print. ``LUNGSCREEN_DEBUG=1`` lets every exception through with its traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import NoReturn

from rich.console import Console

from lungscreen import interrupts
from lungscreen.errors import LungscreenError

EXIT_BUG = 1
EXIT_BAD_INPUT = 2
console = Console(stderr=True, highlight=False, soft_wrap=True)


def debugging() -> bool:
    return bool(os.environ.get("LUNGSCREEN_DEBUG"))


def expected_error(error: BaseException) -> str | None:
    """One line for a library error caused by bad input (None: not one of those, so a bug)."""
    import pickle

    import pydantic
    import yaml

    if isinstance(error, LungscreenError):
        return str(error)
    if isinstance(error, OSError) and error.filename:
        reason = (error.strerror or str(error)).lower()
        return f"{error.filename}: {reason}"
    if isinstance(error, (yaml.YAMLError, pydantic.ValidationError, pickle.UnpicklingError)):
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    try:
        import pyarrow

        if isinstance(error, pyarrow.ArrowException):
            return f"not a readable table ({str(error).splitlines()[0]})"
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        pass
    return None


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: object = None, line: str | None = None) -> None:
    """Print each distinct warning once, as one line in our words (no file name, no source line)."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    if text in _shown:
        return
    _shown.add(text)
    console.print(f"[yellow]warning:[/] {text}", markup=True)


_shown: set[str] = set()


def run(app: Callable[..., object]) -> NoReturn:
    """Run the (Typer) command line inside the boundary and exit with its code."""
    interrupts.install()
    previous = warnings.showwarning
    warnings.showwarning = show_warning
    try:
        code = app(standalone_mode=False)  # we report errors ourselves, as one line
    except interrupts.Interrupted as stop:
        console.print(f"[bold yellow]{stop.message()}[/]")
        sys.exit(stop.exit_code)
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - the boundary: everything becomes one line
        if _is_usage_error(error):
            _report_usage(error)
        if debugging():
            raise
        known = expected_error(error)
        if known is not None:
            console.print(f"[bold red]error:[/] {_escape(known)}")
            sys.exit(EXIT_BAD_INPUT)
        if isinstance(error, KeyboardInterrupt):  # a signal that arrived before our handlers were installed
            console.print("[bold yellow]interrupted (SIGINT)[/]")
            sys.exit(130)
        summary = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        console.print(f"[bold red]error:[/] internal error ({_escape(summary)}). This is a bug in lungscreen: rerun "
                      "with LUNGSCREEN_DEBUG=1 to see the traceback, and please report it.")
        sys.exit(EXIT_BUG)
    finally:
        warnings.showwarning = previous
    sys.exit(code if isinstance(code, int) else 0)


def _is_usage_error(error: BaseException) -> bool:
    """A command-line usage error of Click (or the copy of Click that Typer vendors): both carry these."""
    return hasattr(error, "format_message") and hasattr(error, "exit_code") and hasattr(error, "show")


def _report_usage(error: BaseException) -> NoReturn:
    if type(error).__name__ == "NoArgsIsHelpError":  # a bare `lungscreen` or group: the help is the answer
        error.show()
        sys.exit(error.exit_code)
    context = getattr(error, "ctx", None)
    where = f" (see `{context.command_path} --help`)" if context is not None else ""
    console.print(f"[bold red]error:[/] {_escape(error.format_message())}{where}")
    sys.exit(EXIT_BAD_INPUT)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
