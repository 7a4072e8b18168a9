"""`lungscreen data synth`: write synthetic chest phantoms in real public layouts.

The lead registers :func:`synth_command` on the ``data`` sub-app as ``lungscreen data synth``.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lungscreen.cli.output import stdout_console

if TYPE_CHECKING:
    from lungscreen.data.synth import SynthResult

out = stdout_console()


class ShortcutKind(str, Enum):
    none = "none"
    marker = "marker"
    intensity = "intensity"


class ShortcutBy(str, Enum):
    label = "label"
    source = "source"


def synth_command(
    out_dir: Path = typer.Argument(..., metavar="OUT",
                                   help="Folder to create (must be new, empty, or an earlier phantom tree)."),
    n: int = typer.Option(1000, "--n", "-n", min=1, help="Number of images over all sources."),
    size: int = typer.Option(256, "--size", min=32, max=2048, help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed and options give byte-identical files."),
    shortcut: ShortcutKind = typer.Option(ShortcutKind.none, "--shortcut", case_sensitive=False,
                                          help="Plant a shortcut: 'marker' burns a letter into a corner (like a "
                                               "hospital's), 'intensity' shifts brightness/contrast (like another "
                                               "detector)."),
    shortcut_by: ShortcutBy = typer.Option(ShortcutBy.label, "--shortcut-by", case_sensitive=False,
                                           help="Tie the shortcut to a label or to a source."),
    shortcut_target: str | None = typer.Option(None, "--shortcut-target",
                                               help="Which label/source carries it (default: COVID-19, or the source "
                                                    "holding the COVID-19 cases)."),
    strength: float = typer.Option(1.0, "--strength", min=0.0, max=1.0,
                                   help="Fraction of the targeted images that carry the shortcut, and how visible it is."),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="Processes rendering in parallel."),
    layouts: list[str] | None = typer.Option(None, "--layout",
                                             help="Layout to write (repeatable): radiography, nih, kermany. "
                                                  "Default: radiography and nih."),
    classes: list[str] | None = typer.Option(None, "--class",
                                             help="Label to draw (repeatable): normal, bacterial, pneumonia, viral, "
                                                  "COVID-19. Default: every label the layouts hold."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it holds phantoms made with other options."),
) -> None:
    """Write synthetic chest X-ray phantoms, with lung masks and lesion boxes, in real public layouts.

    Each phantom has a body, two lungs of random shape, heart, spine, clavicles, ribs and vessels, then pose,
    exposure and noise variation. Opacities follow the label: none (normal); one or two dense lobar
    consolidations (bacterial, pneumonia); bilateral perihilar streaky haze (viral); bilateral peripheral
    lower-zone ground glass (COVID-19).

    The tree mimics real downloads so that `lungscreen data build OUT` reads it with the same adapters:
    COVID-19_Radiography_Dataset/{COVID,Normal,Lung_Opacity,Viral Pneumonia}/{images,masks}/ (all COVID-19
    cases), NIH-ChestX-ray14/ (Data_Entry_2017.csv, BBox_List_2017.csv in the 1024 px frame, images/ with
    follow-ups per patient) and, with --layout kermany, chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/.

    OUT/synth.json records the options, the counts, the lesion boxes and which files carry the planted
    shortcut, so a bias audit can be checked against ground truth. Running the same command again finds the
    tree and writes nothing.

    Example: lungscreen data synth phantoms --n 2000 --shortcut marker --strength 0.8 --workers 2
    """
    from lungscreen.data.phantoms import Shortcut
    from lungscreen.data.synth import DEFAULT_LAYOUTS, synthesize

    planted = None
    if shortcut is not ShortcutKind.none:
        planted = Shortcut(shortcut.value, shortcut_by.value, shortcut_target, strength)
    options = {"classes": classes or None, "layouts": layouts or DEFAULT_LAYOUTS}
    columns = (TextColumn("phantoms"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=out, transient=True) as progress:
        task = progress.add_task("phantoms", total=n)
        result = synthesize(out_dir, n, size=size, seed=seed, shortcut=planted, workers=workers, overwrite=force,
                            progress=lambda done: progress.advance(task, done), **options)
    _print_summary(result)


def _print_summary(result: SynthResult) -> None:
    note = " (already there, nothing written)" if result.cached else ""
    table = Table(title=f"{result.images} phantoms in {result.root}{note}")
    table.add_column("source")
    labels = sorted({label for counts in result.counts.values() for label in counts})
    for label in labels:
        table.add_column(label, justify="right")
    table.add_column("total", justify="right")
    for source, counts in result.counts.items():
        table.add_row(source, *(str(counts.get(label, 0)) for label in labels), str(sum(counts.values())))
    out.print(table)
    if result.shortcut_files:
        out.print(f"shortcut planted in {len(result.shortcut_files)} images (listed in {result.root / 'synth.json'})")
