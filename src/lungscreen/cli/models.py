"""`lungscreen models ...`: what the model zoo holds, with the size and cost of each network."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from lungscreen.cli.output import stdout_console

app = typer.Typer(help="The model zoo: every network of the five papers, by name.", no_args_is_help=True)
out = stdout_console()


@app.callback()
def models() -> None:
    """The model zoo: every network of the five papers, by name (`lungscreen.models.create(name)`)."""


@app.command("list")
def list_command(
    pattern: str = typer.Argument("*", help="Shell-style filter on model names, e.g. 'squeeze*'."),
    num_classes: int = typer.Option(3, min=1, help="Outputs the counts assume."),
    in_channels: int = typer.Option(1, min=1, help="Input channels the counts assume (1 = grayscale)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table (for scripts)."),
) -> None:
    """List the registered models with parameters and MACs at each paper's input size.

    MACs are multiply-accumulates of one forward pass on one image, counted by PyTorch's FlopCounterMode
    on shapes only (no weights are allocated, so this is quick even for the 117 M-parameter COVID-Net).
    Use the name with `lungscreen train` configs or `lungscreen.models.create(name)`.
    """
    from lungscreen.errors import ConfigError
    from lungscreen.models import complexity, list_models, model_info

    names = list_models(pattern)
    if not names:
        raise ConfigError(f"no model matches {pattern!r}; run `lungscreen models list` to see them all")
    rows = []
    with out.status("counting parameters and MACs", spinner="dots"):
        for name in names:
            info = model_info(name)
            cost = complexity(name, num_classes=num_classes, in_channels=in_channels)
            rows.append({"name": name, "paper": info.paper, "task": info.task, "parameters": cost.parameters,
                         "macs": cost.macs, "input_size": info.input_size, "min_input_size": info.min_input_size,
                         "description": info.description})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="lungscreen model zoo",
                  caption=f"counted with num_classes={num_classes}, in_channels={in_channels}; "
                          "MACs at the paper's input size, batch 1")
    for column, justify in [("name", "left"), ("paper", "left"), ("task", "left"), ("parameters", "right"),
                            ("MACs", "right"), ("paper input", "right"), ("min input", "right"),
                            ("description", "left")]:
        table.add_column(column, justify=justify, overflow="fold")
    for row in rows:
        table.add_row(row["name"], row["paper"], row["task"], _human(row["parameters"]), _human(row["macs"]),
                      f"{row['input_size']} px", f"{row['min_input_size']} px", row["description"])
    out.print(table)


def _human(count: int) -> str:
    """117394163 -> '117.39 M', 35182080 -> '35.18 M', 2264..e9 -> '2.26 G', 100323 -> '100.32 k'."""
    for divisor, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= divisor:
            return f"{count / divisor:,.2f} {unit}"
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
