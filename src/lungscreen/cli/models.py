"""`lungscreen models ...`: what the model zoo holds, with the size and cost of each network."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from lungscreen.cli.output import stdout_console

app = typer.Typer(help="The model zoo: every network of the five papers, by name.", no_args_is_help=True)
out = stdout_console()
_PAPER_WIDTH = 16  # "002 Polsinelli (SqueezeNet)" -> "002 Polsinelli …": the number names the paper


@app.callback()
def models() -> None:
    """The model zoo: every network of the five papers, by name (`lungscreen.models.create(name)`)."""


@app.command("list")
def list_command(
    pattern: str = typer.Argument("*", help="Shell-style filter on model names, e.g. 'squeeze*'."),
    macs: bool = typer.Option(False, "--macs", help="Also count parameters and MACs (builds every model: "
                              "seconds, not instant)."),
    wide: bool = typer.Option(False, "--wide", help="Show whole descriptions (wrapped) instead of one line each."),
    num_classes: int = typer.Option(3, min=1, help="Outputs the counts assume."),
    in_channels: int = typer.Option(1, min=1, help="Input channels the counts assume (1 = grayscale)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON with every field, counts included (for scripts)."),
) -> None:
    """List the registered models: paper, task, input sizes and a one-line description.

    `--macs` adds parameters and multiply-accumulates of one forward pass on one image at the paper's
    input size, counted by PyTorch's FlopCounterMode on shapes only. They are counted afresh on request
    rather than cached, so they always match the code and options in use (`--json` always includes them).
    Use the name with `lungscreen train` configs or `lungscreen.models.create(name)`.
    """
    from lungscreen.errors import ConfigError

    rows = [row for row in _catalog() if fnmatch.fnmatchcase(row["name"], pattern)]
    if not rows:
        raise ConfigError(f"no model matches {pattern!r}; run `lungscreen models list` to see them all")
    if macs or as_json:
        with out.status("counting parameters and MACs", spinner="dots"):
            for row in rows:
                row.update(_count(row["name"], num_classes, in_channels))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    out.print(_table(rows, counted=macs, wide=wide, num_classes=num_classes, in_channels=in_channels))


def _catalog() -> list[dict[str, Any]]:
    """Every registered model as plain data, read from a cache when the zoo's source has not changed.

    Building the list needs ``lungscreen.models``, and importing it (torch, torchvision, MONAI) costs
    seconds; the list itself costs nothing. The cache file is named by a digest of every source file of
    the zoo and of lungscreen's version, so a new model, option or description writes a new file and a
    stale list is never read. Without a writable cache folder the list is simply built each time.
    """
    import hashlib

    from lungscreen import __version__

    package = Path(__file__).resolve().parents[1] / "models"
    digest = hashlib.sha256(__version__.encode())
    for source in sorted(package.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    cache = _cache_dir() / f"zoo-{digest.hexdigest()[:20]}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    from lungscreen.models import list_models

    rows = [_describe(name) for name in list_models()]
    try:
        from lungscreen.io.files import write_atomic

        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, lambda tmp: tmp.write_text(json.dumps(rows)))
    except OSError:
        pass  # a read-only home: list without a cache
    return rows


def _cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lungscreen`` (``~/.cache/lungscreen``)."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lungscreen"


def _describe(name: str) -> dict[str, Any]:
    """What the registry says of a model, without building it (instant)."""
    from lungscreen.models import model_info

    info = model_info(name)
    return {"name": name, "paper": info.paper, "task": info.task, "input_size": info.input_size,
            "min_input_size": info.min_input_size, "description": info.description}


def _count(name: str, num_classes: int, in_channels: int) -> dict[str, int]:
    """Parameters and MACs at the paper's input size (builds the model on the meta device)."""
    from lungscreen.models import complexity

    cost = complexity(name, num_classes=num_classes, in_channels=in_channels)
    return {"parameters": cost.parameters, "macs": cost.macs}


def _table(rows: list[dict[str, Any]], *, counted: bool, wide: bool, num_classes: int, in_channels: int) -> Table:
    """The zoo as a table that fits 100 columns: short fixed columns that never wrap, and the description
    in the width left, cut to one line with an ellipsis (``wide``: wrapped in full). With the counts the
    paper column gives way to them (``--json`` and the plain list keep it)."""
    caption = "px: the paper's input side (the smallest accepted)"
    if counted:
        caption += f"; MACs at the paper's side, batch 1, {num_classes} classes, {in_channels} channel(s)"
    table = Table(title="lungscreen model zoo", caption=caption, box=box.SIMPLE_HEAD, show_edge=False,
                  padding=(0, 1, 0, 0), pad_edge=False, expand=False)
    fixed = [("name", "left"), ("task", "left"), ("params", "right"), ("MACs", "right")] if counted else [
        ("name", "left"), ("paper", "left"), ("task", "left")]
    for header, justify in [*fixed, ("px", "right")]:
        table.add_column(header, justify=justify, no_wrap=True, overflow="ellipsis",
                         max_width=_PAPER_WIDTH if header == "paper" else None)
    table.add_column("description", overflow="fold" if wide else "ellipsis", min_width=20)
    for row in rows:
        cells = ([row["name"], row["task"], _human(row["parameters"]), _human(row["macs"])] if counted
                 else [row["name"], row["paper"], row["task"]])
        cells.append(f"{row['input_size']} ({row['min_input_size']})")
        description = Text(row["description"], no_wrap=not wide, overflow="fold" if wide else "ellipsis")
        table.add_row(*cells, description)
    return table


def _human(count: int) -> str:
    """Three significant digits: 117394163 -> '117 M', 1271427 -> '1.27 M', 34659654 -> '34.7 M'
    (999600 -> '1 M': the unit is chosen after rounding)."""
    for divisor, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= divisor * 0.9995:
            return f"{count / divisor:.3g} {unit}"
    return str(count)


@app.command("convert")
def convert_command(
    source: Path = typer.Argument(..., help="A version-1 lungscreen checkpoint (.pt) to convert."),
    target: Path = typer.Argument(..., help="Where to write the version-2 checkpoint (never over SOURCE)."),
    modality: str = typer.Option("CXR", help="What the model was trained on (version 1 did not record it): CXR or CT."),
) -> None:
    """Rewrite a version-1 checkpoint with the inference spec version 2 requires.

    Version 1 kept the input size and the preprocessing in free-form fields that readers filled with
    defaults; version 2 stores them as one checked inference spec, which predict, evaluate and serve
    read. The converted spec is printed: check that it says what the model was trained on.
    """
    from lungscreen.errors import ConfigError
    from lungscreen.models import convert_v1

    if modality not in ("CXR", "CT"):
        raise ConfigError(f"--modality must be CXR or CT, got {modality!r}")
    if source.resolve() == target.resolve():
        raise ConfigError("TARGET: give a new file; the original is kept as it is")
    spec = convert_v1(source, target, modality=modality)
    typer.echo(json.dumps(spec.model_dump(mode="json"), indent=2))
    out.print(f"[green]converted[/] {source} -> {target}")
