"""`lungscreen predict`: probabilities for new images with a trained run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress

out = Console(stderr=True)


def predict(
    run: Path = typer.Argument(..., help="Run folder (with best.pt) or a checkpoint file."),
    inputs: list[Path] = typer.Argument(..., help="Image files and folders (searched recursively)."),
    out_path: Path = typer.Option(Path("predictions.csv"), "--out", "-o", help="CSV to write."),
    batch_size: int = typer.Option(32, min=1, help="Images per forward pass."),
) -> None:
    """Write one CSV row per image: path, a probability column per class, prediction, error.

    The run's own preprocessing is applied. An image that cannot be read gets its reason in `error` and
    the rest of the batch goes on.
    """
    from lungscreen.inference.predict import predict_paths
    from lungscreen.io.files import atomic_path, iter_image_files

    total = sum(1 for _ in iter_image_files(*inputs))
    with Progress(console=out, transient=True) as progress:
        job = progress.add_task("predicting", total=total)
        frame = predict_paths(run, inputs, batch_size=batch_size, progress=lambda done: progress.update(job, completed=done))
    with atomic_path(out_path) as temporary:
        frame.to_csv(temporary, index=False)
    failed = int((frame["error"] != "").sum())
    out.print(f"{len(frame)} image(s) -> {out_path}" + (f" ([yellow]{failed} unreadable[/], see the error column)" if failed else ""))
