"""`lungscreen lungs ...`: train, apply and evaluate the lung segmentation U-Net."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="Lung segmentation: train the U-Net on public lung masks, segment images, measure Dice.",
                  no_args_is_help=True)
out = Console()
err = Console(stderr=True)

CONVENTION_HELP = "Which lungs to draw: heart-excluded (visible lung fields) or behind-heart-included (v7labs)."
DEFAULT_CONVENTION_HELP = ("Convention of mask rows that do not state one (hand-written manifests); by default "
                           "such rows are refused.")


def _model_option(help_text: str) -> typer.Option:
    return typer.Option(None, "--model", "-m", help=help_text)


@app.command()
def train(
    manifest: Path = typer.Argument(..., help="Manifest with lung-mask rows (mask_path, mask_convention, split)."),
    out_path: Path = typer.Option(None, "--out", "-o", help="Where to install the trained model [default: the default "
                                  "lung model path, $LUNGSCREEN_LUNG_MODEL or ~/.local/share/lungscreen/lung_unet.pt]."),
    config: str = typer.Option("lung-unet-cpu", "--config", "-c", help="Recipe: a YAML file or a shipped recipe name."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Run folder (default runs/lung-unet-cpu-TIME)."),
    overrides: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key, e.g. --set stages.0.epochs=4."),
    resume: Path = typer.Option(None, "--resume", help="Continue an interrupted lung run folder, then install it."),
    default_convention: str = typer.Option(None, help=DEFAULT_CONVENTION_HELP),
) -> None:
    """Train the lung U-Net on the manifest's masks through the training engine (`configs/lung-unet-cpu.yaml`).

    One network with one output per mask convention: each mask teaches its own convention's channel, so
    heart-excluded and behind-heart-included masks are never mixed. Training uses the manifest's train
    split, the best epoch is chosen on val (Dice), and the test split is left for `lungscreen lungs
    evaluate`. The run folder can be resumed with --resume; best.pt is then installed at --out.

    **Examples**

    ```
    lungscreen lungs train M.parquet            # the default lung model
    lungscreen lungs train M.parquet --out lungs.pt
    ```
    """
    report = train_lung_model(manifest, out_path, config=config, run_dir=run_dir, overrides=overrides, resume=resume,
                              default_convention=default_convention)
    out.print(f"validation Dice {report['value']:.4f} (epoch {report['epoch'] + 1}) -> {report['installed']}")


def train_lung_model(manifest: Path | None, target: Path | None = None, *, config: str = "lung-unet-cpu",
                     run_dir: Path | None = None, overrides: list[str] = (), resume: Path | None = None,
                     default_convention: str | None = None, frame=None) -> dict:  # noqa: ANN001
    """Train the lung recipe on the mask rows of a manifest (or a loaded ``frame``), then install best.pt.

    The mask rows, with their conventions checked and any missing patient-level split filled in, are written
    into the run folder as ``masks.parquet``, the manifest the run trains on.
    """
    import shutil

    from lungscreen.data.manifest import load_manifest, save_manifest
    from lungscreen.data.splits import with_splits
    from lungscreen.io.files import atomic_path
    from lungscreen.lungs.data import mask_rows
    from lungscreen.lungs.segmenter import default_model_path
    from lungscreen.training.config import load_config
    from lungscreen.training.distributed import DistEnv
    from lungscreen.training.engine import train as run_training
    from lungscreen.training.run_folder import default_run_dir

    if resume is not None:
        result = run_training(None, resume=resume)  # type: ignore[arg-type]
    else:
        recipe = load_config(config, overrides)
        folder = run_dir or default_run_dir(recipe, DistEnv())
        frame = load_manifest(manifest) if frame is None else frame
        rows = with_splits(mask_rows(frame, default_convention))
        masks, _ = save_manifest(rows, folder / "masks")
        recipe = load_config(config, [*overrides, f"data.manifest={masks.resolve()}"])
        result = run_training(recipe, out=folder)
    best = result.run_dir / "best.pt"
    target = target or default_model_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as temporary:
        shutil.copyfile(best, temporary)
    return {**(result.best or {}), "installed": str(target)}


@app.command()
def segment(
    inputs: list[Path] = typer.Argument(..., help="Image files and folders (searched recursively)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for <name>_mask.png and <name>_overlay.png."),
    model: Path = _model_option("Lung model checkpoint [default: the default lung model path]."),
    method: str = typer.Option("auto", help="unet, classical, or auto (the U-Net if a model exists, else classical "
                               "with a warning)."),
    convention: str = typer.Option("heart-excluded", help=CONVENTION_HELP),
    batch_size: int = typer.Option(16, min=1, help="Images per forward pass."),
    mkdir: bool = typer.Option(False, "--mkdir", help="Create the folder --out goes into if it does not exist."),
) -> None:
    """Write a lung mask (0/255 PNG, the image's size) and an overlay for every image.

    An image that cannot be read is reported and the rest go on.
    """
    from lungscreen.io.files import iter_image_files
    from lungscreen.lungs.overlay import segment_files
    from lungscreen.lungs.step import SegmentLungs

    from lungscreen.cli.output import ensure_folder

    ensure_folder(out_dir, mkdir)
    step = SegmentLungs(method=method, model=str(model) if model else None, convention=convention).resolved()
    _announce(step)
    files = list(iter_image_files(*inputs))
    failures = segment_files(files, out_dir, step.segmenter(), batch_size=batch_size, console=err)
    for path, reason in failures:
        err.print(f"[yellow]skipped[/] {escape(reason)}")
    out.print(f"{len(files) - len(failures)} mask(s) and overlay(s) -> {out_dir}"
              + (f" ([yellow]{len(failures)} failed[/])" if failures else ""))
    if failures and len(failures) == len(files):
        err.print(f"[bold red]error:[/] no image could be segmented ({len(failures)} failed)")
        raise typer.Exit(2)


@app.command()
def evaluate(
    manifest: Path = typer.Argument(..., help="Manifest with lung-mask rows."),
    model: Path = _model_option("Lung model checkpoint [default: the default lung model path]."),
    method: str = typer.Option("both", help="unet, classical, or both (the fallback scored on the same images)."),
    split: str = typer.Option("test", help="Split to score (held-out patients); 'all' scores every mask row."),
    json_path: Path = typer.Option(None, "--json", help="Also write the figures (and per-image scores) as JSON."),
    resamples: int = typer.Option(1000, min=100, help="Bootstrap resamples (patients) for the 95 % intervals."),
    default_convention: str = typer.Option(None, help=DEFAULT_CONVENTION_HELP),
) -> None:
    """Dice and IoU per source and mask convention, with patient-bootstrap 95 % intervals.

    The U-Net is scored on the output of each row's own convention; a model is refused on its own
    training patients.
    """
    from lungscreen.data.manifest import load_manifest
    from lungscreen.errors import ConfigError
    from lungscreen.io.files import atomic_path
    from lungscreen.lungs.evaluate import evaluate_segmenter, evaluation_rows
    from lungscreen.lungs.segmenter import ClassicalSegmenter
    from lungscreen.lungs.step import SegmentLungs

    if method not in ("unet", "classical", "both"):
        raise ConfigError(f"--method must be unet, classical or both, got {method!r}")
    rows = evaluation_rows(load_manifest(manifest), None if split == "all" else split, default_convention)
    segmenters = []
    if method in ("unet", "both"):
        segmenters.append(SegmentLungs(method="unet", model=str(model) if model else None).resolved().segmenter())
    if method in ("classical", "both"):
        segmenters.append(ClassicalSegmenter())
    reports = [evaluate_segmenter(s, rows, n_resamples=resamples, split=split) for s in segmenters]
    for report in reports:
        print_report(report)
    if json_path:
        payload = {r.method: {**r.as_dict(), "per_image": r.per_image.to_dict("records")} for r in reports}
        with atomic_path(json_path) as temporary:
            temporary.write_text(json.dumps(payload, indent=2))
        out.print(f"wrote {json_path}")


def print_report(report) -> None:
    """One table per method: a row per (source, convention) and the overall means."""
    title = f"{report.method} lung segmentation, split {report.split}"
    if report.model:
        title += f" (model {report.model[:12]})"
    table = Table(title=title)
    for column in ("source", "convention", "images", "patients", "Dice [95 % CI]", "IoU [95 % CI]"):
        table.add_column(column, justify="right" if column in ("images", "patients") else "left")
    for group in report.groups:
        table.add_row(group.source, group.convention, str(group.images), str(group.patients), str(group.dice),
                      str(group.iou))
    table.add_row("[bold]all[/]", "", str(len(report.per_image)), str(report.per_image["patient_id"].nunique()),
                  f"[bold]{report.overall['dice']}[/]", str(report.overall["iou"]))
    out.print(table)
    out.print(f"mean of the per-source means (each source counts once): Dice {report.macro_dice:.3f}"
              + (f"; {len(report.skipped)} row(s) could not be scored" if report.skipped else ""))
    if report.method == "classical":
        out.print("[dim]the classical method has one output; it is scored against each row's own convention[/]")


def _announce(step) -> None:
    if step.method == "classical":
        err.print("[bold yellow]lungs: classical threshold + morphology segmentation[/] (no U-Net in use)")
    else:
        err.print(f"lungs: U-Net {step.model} (sha256 {step.weights_sha256[:12]}), convention {step.convention}")
