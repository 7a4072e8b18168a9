"""`lungscreen predict`: probabilities for new images with a trained run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from lungscreen.progress import progress_bar

out = Console(stderr=True, highlight=False)


def predict(
    run: Path = typer.Argument(..., help="Run folder (with best.pt), a checkpoint file, or a model exported with "
                             "`lungscreen export` (.onnx: runs on onnxruntime)."),
    inputs: list[Path] = typer.Argument(..., help="Image files and folders (searched recursively), DICOM included.",
                                        exists=True),
    out_path: Path = typer.Option(Path("predictions.csv"), "--out", "-o",
                                  help="Where to write: .csv, or .json (one object per image)."),
    mkdir: bool = typer.Option(False, "--mkdir", help="Create the folder of --out if it does not exist."),
    modality: str | None = typer.Option(None, help="What the inputs are, CXR or CT, when you know (DICOM tags "
                                        "are read anyway); refused if the model was trained on the other."),
    force: bool = typer.Option(False, "--force", help="Score inputs of another modality than the model's, or "
                               "beyond its out-of-distribution gate, anyway (their rows say so)."),
    batch_size: int = typer.Option(32, min=1, help="Images per forward pass."),
    workers: int = typer.Option(1, min=0, help="Threads decoding and preprocessing images (lung segmentation "
                                "included) ahead of the model, so both run at once; 0: all in one thread."),
    masks: Path | None = typer.Option(None, "--masks", help="A multi-task run (MultiCheXNet): write each image's "
                                      "predicted mask channels as PNGs in this folder (created if needed)."),
) -> None:
    """Write one row per image: path, a probability column per class, prediction, ood, error.

    The run's own inference spec feeds the model (its preprocessing, lung segmentation included, size and
    scaling). An image that cannot be read gets its reason in `error` and the rest go on; `ood` flags an
    image far from what the model was trained on (its intensity histogram against the training inputs').
    The file is written whole or not at all. Exit code 0 when at least one image was scored (the number
    of failures is printed last), 2 when none could be. A multi-task run adds `screened` (its findings head
    passed the image on to the box and mask heads), `boxes` (JSON, original pixels, with scores) and
    `mask` (the PNG files written under --masks).

    **Examples**

    ```
    lungscreen predict runs/covid-resnet-cpu new_images/ --out predictions.csv
    lungscreen predict covid.onnx study.dcm --out predictions.json
    lungscreen predict runs/covid-resnet-cpu ct_slices/ --modality CT --force
    ```
    """
    from lungscreen.cli.output import ensure_folder
    from lungscreen.errors import ConfigError
    from lungscreen.inference.predict import Predictor, predict_paths
    from lungscreen.io.files import atomic_path, iter_image_files

    if out_path.suffix.lower() not in (".csv", ".json"):
        raise ConfigError(f"--out: {out_path} must end in .csv or .json")
    ensure_folder(out_path, mkdir)
    if modality is not None and modality not in ("CXR", "CT"):
        raise ConfigError(f"--modality: must be CXR or CT, got {modality!r}")
    predictor = Predictor(run, modality=modality, force=force)
    if masks is not None:
        masks.mkdir(parents=True, exist_ok=True)
    total = sum(1 for _ in iter_image_files(*inputs))
    if total == 0:
        raise ConfigError(f"INPUTS: no image file in {', '.join(map(str, inputs))} (looked for .png, .jpg, .dcm, ...)")
    with progress_bar() as bar:
        job = bar.add_task("predicting", total=total)
        frame = predict_paths(predictor, inputs, batch_size=batch_size, masks=masks, workers=workers,
                              progress=lambda done: bar.update(job, completed=done))
    with atomic_path(out_path) as temporary:
        if out_path.suffix.lower() == ".json":
            frame.to_json(temporary, orient="records", indent=2)
        else:
            frame.to_csv(temporary, index=False)
    failed, flagged = int((frame["error"] != "").sum()), int(frame["ood"].sum())
    out.print(f"{len(frame) - failed} of {len(frame)} image(s) scored by a {predictor.spec.modality} model -> "
              f"{escape(str(out_path))}" + (f"; [yellow]{flagged} out of distribution[/] (ood column)" if flagged else ""))
    if failed:
        first = frame.loc[frame["error"] != "", "error"].iloc[0]
        out.print(f"[yellow]{failed} image(s) failed[/], e.g. {escape(first)} (error column)")
    if failed == len(frame):
        out.print(f"[bold red]error:[/] no image could be scored ({failed} failed); see the error column of "
                  f"{escape(str(out_path))}")
        raise typer.Exit(2)
