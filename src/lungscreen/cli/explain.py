"""`lungscreen explain`: class-activation maps of a trained run, drawn on the original images."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from lungscreen.progress import progress_bar

out = Console(stderr=True, highlight=False)


def explain(
    run: Path = typer.Argument(..., help="Run folder (with best.pt) or a checkpoint file of a classifier."),
    inputs: list[Path] = typer.Argument(..., help="Image files and folders (searched recursively), DICOM included.",
                                        exists=True),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the PNGs and explanations.csv."),
    methods: list[str] | None = typer.Option(None, "--method", "-m", help="gradcam (default), gradcam++, scorecam "
                                             "or eigencam; repeat for several."),
    target: str | None = typer.Option(None, "--target", help="Class to explain on every image (default: each "
                                      "image's predicted class, by the run's operating point when it has one)."),
    mkdir: bool = typer.Option(False, "--mkdir", help="Create the parent folder of --out if it does not exist."),
    faithfulness: bool = typer.Option(True, "--faithfulness/--no-faithfulness",
                                      help="Score each map with ROAD (slower: pixel imputation per map)."),
    maps: bool = typer.Option(False, "--maps", help="Also write each raw map on the original image (.npy)."),
) -> None:
    """Draw where the model looked: a heat-map per image and method on the original image, with the lungs.

    Each PNG shows the explained class and its probability, the raw map (not rescaled per image) mapped
    back through the run's preprocessing, and the lung contour. `explanations.csv` adds, per map, the
    lung attention ratio (1 = no preference for the lungs, above 1 = on the lungs) and the ROAD
    faithfulness (above 0 = the map's pixels carry the answer, about 0 = it explains nothing). An image
    that cannot be read gets its reason in `error` and the rest go on.

    **Examples**

    ```
    lungscreen explain runs/covid-resnet-cpu chest.png --out heatmaps
    lungscreen explain runs/covid-resnet-cpu images/ --out maps --method eigencam
    ```
    """
    from lungscreen.audit.cams import check_method
    from lungscreen.audit.explain import explain_images, load_predictor, target_index
    from lungscreen.cli.output import ensure_folder
    from lungscreen.errors import ConfigError
    from lungscreen.io.files import atomic_path, iter_image_files

    chosen = [check_method(m, "--method") for m in (methods or ["gradcam"])]
    ensure_folder(out_dir, mkdir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out: {out_dir} is a file, not a folder")
    predictor = load_predictor(run)
    target_index(predictor, target, "--target")
    total = sum(1 for _ in iter_image_files(*inputs))
    if total == 0:
        raise ConfigError(f"INPUTS: no image file in {', '.join(map(str, inputs))} (looked for .png, .jpg, .dcm, ...)")
    with progress_bar() as bar:
        job = bar.add_task("explaining", total=total)
        frame = explain_images(predictor, inputs, out_dir, chosen, target, faithfulness=faithfulness, save_maps=maps,
                               progress=lambda done: bar.update(job, completed=done))
    table = out_dir / "explanations.csv"
    with atomic_path(table) as temporary:
        frame.to_csv(temporary, index=False)
    failed = frame.loc[frame["error"] != "", "path"].nunique()
    out.print(f"{int((frame['file'] != '').sum())} explanation(s) of {frame['path'].nunique()} image(s) -> "
              f"{escape(str(out_dir))} (PNGs, table {escape(str(table))})")
    if failed:
        first = frame.loc[frame["error"] != "", "error"].iloc[0]
        out.print(f"[yellow]{failed} image(s) failed[/], e.g. {escape(first)} (error column)")
    if failed == frame["path"].nunique():
        out.print("[bold red]error:[/] no image could be explained; see the error column")
        raise typer.Exit(2)
