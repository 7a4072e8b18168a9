"""`lungscreen preprocess`: apply a named preprocessing pipeline to a whole manifest, once, through a cache."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True)


def preprocess(
    manifest: Path = typer.Argument(..., help="Manifest (.parquet or .csv)."),
    pipeline: str = typer.Option("tartaglione", "--pipeline", "-p", help="none, covidnet, equalize, clahe, "
                                 "tartaglione, lungcrop, or a JSON file holding a pipeline dict."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for PIPELINE.parquet/.csv, PIPELINE.failures.csv, "
                                 "PIPELINE.pipeline.json and the cache/."),
    set_params: list[str] = typer.Option(None, "--set", help="Change a step parameter: STEP.PARAM=VALUE, e.g. "
                                         "apply_lung_mask.blur_radius=5 or segment_lungs.convention=behind-heart-included."),
    size: int = typer.Option(None, min=8, help="Append a resize to SIZE x SIZE (default: keep each image's size)."),
    lung_model: Path = typer.Option(None, help="Lung model checkpoint [default: $LUNGSCREEN_LUNG_MODEL or "
                                    "~/.local/share/lungscreen/lung_unet.pt]."),
    if_no_lung_model: str = typer.Option("classical", help="When the pipeline segments lungs and no lung model "
                                         "exists: classical (fallback, with a warning), train (train the default "
                                         "model on this manifest's masks first) or error."),
    modality: str = typer.Option("all", help="Rows to preprocess: CXR, CT or all."),
    workers: int = typer.Option(2, min=1, help="Processes (each runs torch on one thread)."),
    mkdir: bool = typer.Option(False, "--mkdir", help="Create the folder --out goes into if it does not exist."),
) -> None:
    """Preprocess every image of MANIFEST once and write a manifest pointing at the results.

    Results are cached under OUT/cache, keyed by each image file (path, size, modification time) and the
    pipeline's parameters (and the lung model's hash): a second run only reads the cache, a changed
    parameter or lung model recomputes. Images that fail are listed in OUT/PIPELINE.failures.csv and left out.

    **Examples**

    ```
    lungscreen preprocess M.parquet --pipeline tartaglione --out preprocessed
    lungscreen preprocess M.parquet --pipeline lungcrop --lung-model lungs.pt --out P
    ```
    """
    from lungscreen.data.manifest import load_manifest
    from lungscreen.errors import ConfigError
    from lungscreen.lungs.step import LungModelWarning, find_lung_model
    from lungscreen.preprocessing import Pipeline, get_pipeline, load_pipeline, preprocess_manifest
    from lungscreen.preprocessing.transforms import Resize

    from lungscreen.cli.output import ensure_folder

    ensure_folder(out_dir, mkdir)
    if if_no_lung_model not in ("classical", "train", "error"):
        raise ConfigError(f"--if-no-lung-model must be classical, train or error, got {if_no_lung_model!r}")
    frame = load_manifest(manifest)
    if modality != "all":
        if modality not in ("CXR", "CT"):
            raise ConfigError(f"--modality must be CXR, CT or all, got {modality!r}")
        frame = frame[frame["modality"] == modality].reset_index(drop=True)
    chosen = _pipeline(pipeline, set_params, get_pipeline, load_pipeline)
    if lung_model is not None:
        chosen = _with_lung(chosen, model=str(lung_model))
    if size:
        chosen = Pipeline(chosen.name, chosen.steps + (Resize(size=size),))
    step = chosen.lung_step
    if step is not None and step.method == "auto" and not step.weights_sha256 and find_lung_model(step.model) is None:
        chosen = _no_lung_model(chosen, if_no_lung_model, frame)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LungModelWarning)  # announced below, once
        resolved = chosen.resolved()
    _announce(resolved)
    result = preprocess_manifest(frame, chosen, out_dir, workers=workers)
    out.print(f"{resolved.describe()}")
    out.print(f"{len(result.manifest)} image(s) in {result.seconds:.1f} s: {result.computed} computed, "
              f"{result.cached} from the cache, {len(result.failures)} failed")
    for path, reason in result.failures[:10]:
        err.print(f"  [yellow]failed[/] {escape(reason)}")
    if len(result.failures) > 10:
        err.print(f"  [yellow]... {len(result.failures) - 10} more in {out_dir / (resolved.name + '.failures.csv')}[/]")
    if result.manifest.empty:
        err.print("[bold red]no image could be preprocessed[/]")
        raise typer.Exit(1)
    out.print(f"wrote {result.manifest_path} (+ .csv)")


def _pipeline(spec: str, overrides: list[str] | None, get_pipeline, load_pipeline):
    from lungscreen.errors import ConfigError

    path = Path(spec)
    if spec.endswith(".json") and path.is_file():
        try:
            pipeline = load_pipeline(json.loads(path.read_text()))
        except ValueError as error:
            raise ConfigError(f"{path}: not JSON ({error})") from None
        if overrides:
            raise ConfigError("--set applies to named pipelines, not to a pipeline JSON file (edit the file)")
        return pipeline
    return get_pipeline(spec, overrides or None)


def _with_lung(pipeline, **changes):
    from lungscreen.errors import ConfigError
    from lungscreen.lungs.step import SegmentLungs
    from lungscreen.preprocessing import Pipeline

    if pipeline.lung_step is None:
        raise ConfigError(f"pipeline {pipeline.name!r} does not segment lungs; --lung-model does not apply")
    steps = tuple(SegmentLungs(**{**{k: v for k, v in step.to_dict().items() if k != "name"}, **changes})
                  if isinstance(step, SegmentLungs) else step for step in pipeline.steps)
    return Pipeline(pipeline.name, steps)


def _no_lung_model(pipeline, policy: str, frame):
    """Apply --if-no-lung-model: fall back loudly, train the default model, or stop."""
    from lungscreen.lungs.segmenter import default_model_path
    from lungscreen.preprocessing.transforms import PreprocessingError

    where = default_model_path()
    if policy == "error":
        raise PreprocessingError(f"no lung model at {where}; train one with `lungscreen lungs train MANIFEST` "
                                 "or pass --if-no-lung-model classical|train")
    if policy == "classical":
        err.print(f"[bold yellow]WARNING: no trained lung model at {where}.[/] The lungs will be segmented with the "
                  "classical threshold + morphology fallback (mean Dice about 0.78 instead of about 0.95). Train the "
                  "U-Net with `lungscreen lungs train MANIFEST`, or rerun with --if-no-lung-model train.")
        return _with_lung(pipeline, method="classical")
    from lungscreen.cli.lungs import train_lung_model

    err.print(f"[bold yellow]No trained lung model at {where}: training the default U-Net on this manifest's "
              "lung masks first[/] (recipe lung-unet-cpu: train split, best epoch on val; minutes on a CPU).")
    report = train_lung_model(None, where, frame=frame)
    err.print(f"lung model trained: validation Dice {report['value']:.4f} -> {where}")
    return pipeline


def _announce(pipeline) -> None:
    step = pipeline.lung_step
    if step is None:
        return
    if step.method == "classical":
        err.print("[bold yellow]lungs: classical threshold + morphology segmentation (no U-Net)[/]")
    else:
        err.print(f"lungs: U-Net {step.model} (sha256 {step.weights_sha256[:12]}), convention {step.convention}")
