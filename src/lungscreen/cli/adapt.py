"""`lungscreen adapt`: a run's BatchNorm statistics re-estimated on a new hospital's unlabelled images (AdaBN)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

out = Console(stderr=True, highlight=False)


def adapt(
    run: Path = typer.Argument(..., help="Run folder (with best.pt) or a checkpoint file."),
    images: list[Path] = typer.Argument(..., exists=True, help="The new site's images or folders (no labels)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder of the adapted run (best.pt, adapt.json)."),
    batch_size: int = typer.Option(32, min=2, help="Images per forward pass while estimating."),
    mkdir: bool = typer.Option(False, "--mkdir", help="Create the parent folder of --out if it does not exist."),
) -> None:
    """Adapt RUN to a new site without its labels: re-estimate every BatchNorm layer's mean and variance on
    IMAGES (AdaBN), nothing else.

    The images go through the run's own input path (its pipeline, lung segmentation included). The adapted
    run keeps the weights, classes and operating point of RUN, and takes the site's intensity reference, so
    its out-of-distribution check speaks for that site. Use at least a few hundred images with the site's
    usual case mix: statistics estimated on one class only shift that class's features.

    Examples:

        lungscreen adapt runs/covid-resnet-cpu site_b/ --out runs/covid-resnet-cpu-site-b

        lungscreen predict runs/covid-resnet-cpu-site-b site_b/ --out preds.csv
    """
    from lungscreen.cli.output import ensure_folder
    from lungscreen.inference.adapt import adapt_run
    from lungscreen.io.files import iter_image_files
    from lungscreen.progress import progress_bar

    ensure_folder(out_dir, mkdir)
    total = sum(1 for _ in iter_image_files(*images))
    with progress_bar() as bar:
        job = bar.add_task("reading the site's images", total=total)
        result = adapt_run(run, images, out_dir, batch_size=batch_size,
                           progress=lambda done: bar.update(job, completed=done))
    out.print(f"adapted {result.layers} BatchNorm layer(s) on {result.images} image(s) ({result.skipped} skipped) "
              f"-> {escape(str(out_dir))}")
