"""`lungscreen export`: a run as a portable ONNX model that predicts and serves without PyTorch."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

out = Console(stderr=True, highlight=False)


def export(
    run: Path = typer.Argument(..., help="Run folder (with best.pt) or a checkpoint file."),
    onnx: Path = typer.Option(..., "--onnx", help="Where to write the model (.onnx); a lung U-Net the run's "
                              "pipeline needs is written beside it as NAME.lungs.onnx."),
    int8: list[Path] = typer.Option([], "--int8", exists=True, help="Also write NAME.int8.onnx, statically "
                                    "quantised to int8 and calibrated on these images or folders (training or "
                                    "validation images, never test images). Repeatable."),
    calibration_images: int = typer.Option(128, min=8, help="At most this many --int8 images are used."),
    mkdir: bool = typer.Option(False, "--mkdir", help="Create the folder of --onnx if it does not exist."),
) -> None:
    """Export a trained run to ONNX, its inference spec inside (ONNX metadata).

    `lungscreen predict OUT.onnx ...` and `lungscreen serve OUT.onnx` run the export on onnxruntime with the
    run's own preprocessing, lung segmentation included (the U-Net from NAME.lungs.onnx, pinned by its
    SHA-256). Each file is checked against PyTorch before it is written (largest output difference on random
    inputs <= 1e-4). Multi-task runs do not export (their heads run per image behind the findings filter).

    **Examples**

    ```
    lungscreen export runs/covid-resnet-cpu --onnx covid.onnx
    lungscreen export runs/covid-resnet-cpu --onnx covid.onnx --int8 val_images/
    ```
    """
    from lungscreen.cli.output import ensure_folder
    from lungscreen.inference.export import export_run

    ensure_folder(onnx, mkdir, "--onnx")
    done = export_run(run, onnx, calibration=int8, calibration_images=calibration_images)
    out.print(f"wrote {escape(str(done.model))} (largest difference from PyTorch {done.max_difference:.1e})")
    for extra, what in ((done.lungs, "the lung U-Net"), (done.int8, "int8 classifier")):
        if extra is not None:
            out.print(f"wrote {escape(str(extra))} ({what})")
