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
    out_path: Path = typer.Option(None, "--out", "-o", help="Checkpoint to write [default: the default lung model "
                                  "path, $LUNGSCREEN_LUNG_MODEL or ~/.local/share/lungscreen/lung_unet.pt]."),
    epochs: int = typer.Option(12, min=1, help="Passes over the training pairs."),
    size: int = typer.Option(256, min=32, help="Working side in pixels (multiple of 16)."),
    batch_size: int = typer.Option(8, min=1, help="Pairs per step."),
    lr: float = typer.Option(3e-3, help="Peak learning rate (one-cycle, AdamW)."),
    threads: int = typer.Option(2, min=1, help="torch CPU threads."),
    seed: int = typer.Option(0, help="Seed of initialisation, augmentation and batch order."),
    max_pairs: int = typer.Option(None, min=1, help="Use at most this many training pairs (quick trials)."),
    default_convention: str = typer.Option(None, help=DEFAULT_CONVENTION_HELP),
) -> None:
    """Train the lung U-Net on the manifest's masks (train split; best epoch chosen on val).

    One network with one output per mask convention: each mask teaches its own convention's channel, so
    heart-excluded and behind-heart-included masks are never mixed. The test split is left for
    `lungscreen lungs evaluate`.
    """
    from lungscreen.data.manifest import load_manifest
    from lungscreen.lungs.segmenter import default_model_path
    from lungscreen.lungs.train import LungTrainConfig, train_lung_model

    config = LungTrainConfig(size=size, epochs=epochs, batch_size=batch_size, lr=lr, threads=threads, seed=seed,
                             max_pairs=max_pairs)
    target = out_path or default_model_path()
    report = train_lung_model(load_manifest(manifest), target, config, default_convention=default_convention,
                              log=lambda line: err.print(escape(line)))
    for path, reason in report.skipped[:10]:
        err.print(f"  [yellow]skipped[/] {escape(reason)}")
    if len(report.skipped) > 10:
        err.print(f"  [yellow]... {len(report.skipped) - 10} more skipped[/]")
    out.print(f"best epoch {report.best_epoch}: validation Dice {report.val_dice:.4f} "
              f"({report.seconds / 60:.1f} min) -> {target}")


@app.command()
def segment(
    inputs: list[Path] = typer.Argument(..., help="Image files and folders (searched recursively)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for <name>_mask.png and <name>_overlay.png."),
    model: Path = _model_option("Lung model checkpoint [default: the default lung model path]."),
    method: str = typer.Option("auto", help="unet, classical, or auto (the U-Net if a model exists, else classical "
                               "with a warning)."),
    convention: str = typer.Option("heart-excluded", help=CONVENTION_HELP),
    batch_size: int = typer.Option(16, min=1, help="Images per forward pass."),
) -> None:
    """Write a lung mask (0/255 PNG, the image's size) and an overlay for every image.

    An image that cannot be read is reported and the rest go on.
    """
    from lungscreen.io.files import iter_image_files
    from lungscreen.lungs.overlay import segment_files
    from lungscreen.preprocessing.transforms import SegmentLungs

    step = SegmentLungs(method=method, model=str(model) if model else None, convention=convention).resolved()
    _announce(step)
    files = list(iter_image_files(*inputs))
    failures = segment_files(files, out_dir, step.segmenter(), batch_size=batch_size, console=err)
    for path, reason in failures:
        err.print(f"[yellow]skipped[/] {escape(reason)}")
    out.print(f"{len(files) - len(failures)} mask(s) and overlay(s) -> {out_dir}"
              + (f" ([yellow]{len(failures)} failed[/])" if failures else ""))
    if failures and len(failures) == len(files):
        raise typer.Exit(1)


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
    from lungscreen.preprocessing.transforms import SegmentLungs

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
