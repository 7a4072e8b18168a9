"""`lungscreen data download`: fetch the public chest-image sources into one data folder.

The lead registers :func:`download_command` on the ``data`` sub-app as ``lungscreen data download``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from lungscreen.cli.output import stdout_console
from lungscreen.errors import LungscreenError

out = stdout_console()

_STATUS_STYLE = {"downloaded": "green", "present": "cyan", "manual": "yellow", "failed": "bold red"}


def download_command(
    names: list[str] | None = typer.Argument(None, metavar="NAME...", help="Sources to fetch (see --list)."),
    to: Path = typer.Option(Path("data"), "--to", help="Data folder; each source goes into its own subfolder."),
    url: list[str] | None = typer.Option(None, "--url", metavar="NAME=URL",
                                         help="Clone URL instead of the catalogue's, e.g. a mirror or "
                                              "file:///srv/mirror/covid-chestxray-dataset (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Replace a source folder that is already there."),
    show_list: bool = typer.Option(False, "--list", help="Show the catalogue of sources and exit."),
) -> None:
    """Download public COVID-19 / pneumonia chest-image sources into --to DIR.

    GitHub-hosted sources (cohen, figure1, actualmed, v7labs, covid-ct, openist) are fetched with
    `git clone --depth 1`. Kaggle-hosted ones (rsna, radiography, kermany) use the `kaggle` command when it is
    installed and has an API token; otherwise, and for sources behind a click-through page (nih,
    montgomery, shenzhen), the exact steps to do by hand are printed, with the folder to put the files in.

    A download is written to a hidden folder beside its target and renamed into place only when complete,
    so a failure never leaves a half-written source. A folder that is already there is left alone unless
    --force. A source that cannot be fetched (no network) ends the command with one line and exit code 2.
    Then run `lungscreen data build DIR --out manifest`.

    Example: lungscreen data download cohen figure1 actualmed --to data
    """
    from lungscreen.data.download import download, parse_url_overrides

    if show_list:
        _print_catalogue()
        return
    if not names:
        raise typer.BadParameter("name at least one source, or use --list", param_hint="NAME...")
    overrides = parse_url_overrides(url or [])
    columns = (TextColumn("{task.fields[name]:<12}"), TextColumn("{task.description:<22}"), BarColumn(),
               TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn())
    with Progress(*columns, console=out, transient=True) as progress:
        tasks: dict[str, TaskID] = {}

        def report(name: str, phase: str, percent: float | None) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(phase, total=100, name=name)
            progress.update(tasks[name], description=phase, completed=percent or 0)

        results = download(names, to, urls=overrides, force=force, progress=report)
    for result in results:
        style = _STATUS_STYLE[result.status]
        out.print(f"[{style}]{result.status:<10}[/] {result.name:<12} {escape(str(result.path))}")
        if result.status == "manual":
            out.print(f"           {escape(result.message)}", soft_wrap=True)
    failed = [result for result in results if not result.ok]
    if failed:
        raise LungscreenError(f"{len(failed)} of {len(results)} source(s) not downloaded "
                            f"({', '.join(result.name for result in failed)}): {failed[0].message}; check the "
                            "network, or clone from a mirror with --url NAME=URL")



def _print_catalogue() -> None:
    from lungscreen.data.download import CATALOGUE

    table = Table(title="public sources (lungscreen data download NAME... --to DIR)")
    table.add_column("name", no_wrap=True)
    table.add_column("how", no_wrap=True)
    for column in ("folder", "what", "from"):
        table.add_column(column, overflow="fold")
    for source in CATALOGUE.values():
        table.add_row(source.name, source.method, source.folder, escape(source.title), source.page)
    out.print(table)
