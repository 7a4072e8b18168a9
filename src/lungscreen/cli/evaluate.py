"""`lungscreen evaluate` and `lungscreen audit`: honest figures for a trained run, and whether it reads the lungs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from lungscreen.progress import progress_bar

err = Console(stderr=True, highlight=False)

RUN = typer.Argument(None, help="Run folder (with best.pt) or a checkpoint file.")
ON = typer.Option(None, "--on", help="Manifest to score on (.parquet or .csv).")
SPLIT = typer.Option("test", help="Split to score ('all' for every row: e.g. another hospital's data).")
SOURCES = typer.Option(None, "--sources", help="Comma-separated sources to keep (default: all).")
OUT = typer.Option(..., "--out", "-o", help="Folder to write into.")
MKDIR = typer.Option(False, "--mkdir", help="Create the folder --out goes into if it does not exist.")


def _sources(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def evaluate(
    run: Path | None = RUN,
    on: Path | None = ON,
    split: str = SPLIT,
    sources: str | None = SOURCES,
    out_dir: Path = OUT,
    mkdir: bool = MKDIR,
    cross: str | None = typer.Option(None, "--cross", help="Recipe: train one run per left-out source and test each "
                                     "on every source (needs --manifest)."),
    manifest: Path | None = typer.Option(None, "--manifest", "-m", help="With --cross: the manifest to train and "
                                         "test on."),
    held_out: str | None = typer.Option(None, "--held-out", help="With --cross: comma-separated sources to leave "
                                        "out in turn (default: every source with both classes)."),
    overrides: list[str] = typer.Option([], "--set", "-s", help="With --cross: override a recipe key."),
    resamples: int = typer.Option(1000, min=100, help="Bootstrap resamples (whole patients) for the 95 % intervals."),
) -> None:
    """Score a run on a manifest split: metrics.json, predictions.csv and a self-contained report.html.

    Every figure comes with a 95 % interval that resamples whole patients, per source beside the pooled
    figure (sources holding one class only are marked), at the operating point chosen on validation. The
    run's own training patients are refused. With --cross RECIPE --manifest M, trains one run per
    left-out source and writes the train-source x test-source matrix (balanced accuracy, DOR, AUC, and
    the transferred threshold's sensitivity and specificity on the left-out source).

    **Examples**

    ```
    lungscreen evaluate runs/covid-resnet-cpu --on M.parquet --out evaluation
    lungscreen evaluate runs/covid-resnet-cpu --on hospital_b.csv --split all --out eval-b
    lungscreen evaluate --cross covid-resnet-cpu --manifest M.parquet --out cross
    ```
    """
    from lungscreen.cli.output import ensure_folder
    from lungscreen.errors import ConfigError

    ensure_folder(out_dir, mkdir)
    if cross is not None:
        from lungscreen.audit.cross import cross_dataset, write_cross

        if manifest is None:
            raise ConfigError("--manifest: --cross trains runs, so it needs the manifest to train and test on")
        result = cross_dataset(cross, manifest, out_dir, held_out=_sources(held_out), overrides=overrides,
                               n_resamples=resamples)
        paths = write_cross(result, out_dir)
        err.print(f"cross-dataset matrix -> {escape(str(paths['report']))}")
        return
    if run is None or on is None:
        raise ConfigError("RUN and --on: give the run to score and the manifest to score it on (or --cross RECIPE)")
    from lungscreen.audit.evaluate import evaluate_run, write_evaluation

    with progress_bar() as bar:
        job = bar.add_task("scoring", total=None)
        evaluation = evaluate_run(run, on, split=None if split == "all" else split, sources=_sources(sources),
                                  n_resamples=resamples, progress=lambda done: bar.update(job, completed=done))
    paths = write_evaluation(evaluation, out_dir)
    figures = evaluation.figures
    for name in ("balanced_accuracy", "sensitivity/COVID-19", "specificity/COVID-19", "auc/COVID-19"):
        if name in figures and figures[name]["value"] == figures[name]["value"]:
            value = figures[name]
            err.print(f"{name}: {value['value']:.3f} [{value['low']:.3f}, {value['high']:.3f}]")
    single = [entry["source"] for entry in evaluation.sources if entry["single_class"]]
    if single:
        err.print(f"[yellow]sources with one class only (read their figures per source):[/] {escape(', '.join(single))}")
    err.print(f"report -> {escape(str(paths['report']))}")


def _lung_segmenter(choice: str) -> Any:
    """The segmenter ``--lungs`` names (None: the run's own)."""
    from lungscreen.errors import ConfigError
    from lungscreen.lungs.step import SegmentLungs

    if choice == "run":
        return None
    if choice in ("unet", "classical"):
        return SegmentLungs(method=choice).resolved().segmenter()
    path = Path(choice)
    if not path.is_file():
        raise ConfigError(f"--lungs: {choice!r} is neither run, unet, classical nor a lung model file")
    return SegmentLungs(method="onnx" if path.suffix == ".onnx" else "unet", model=str(path)).resolved().segmenter()


def audit(
    run: Path = typer.Argument(..., help="Run folder (with best.pt) or a checkpoint file."),
    on: Path = typer.Option(..., "--on", help="Manifest whose held-out images to audit on."),
    split: str = SPLIT,
    sources: str | None = SOURCES,
    out_dir: Path = OUT,
    mkdir: bool = MKDIR,
    max_images: int = typer.Option(300, min=10, help="Images audited at most (the same share of every source and "
                                   "class)."),
    method: str = typer.Option("gradcam", help="CAM method of the attention check: gradcam, gradcam++, scorecam, "
                               "eigencam."),
    seed: int = typer.Option(0, help="Seed of the image sample, the probe's folds and t-SNE."),
    lungs: str = typer.Option("run", help="Who draws the lungs for the attention and masking checks: 'run' (the "
                              "run's own pipeline, else the installed U-Net), 'unet', 'classical' (thresholding: "
                              "for drawn phantoms), or a lung model file (.pt, or .onnx from lungscreen export)."),
) -> None:
    """Does the model read the lungs or the hospital? audit.html (verdict first) and audit.json.

    Four checks on held-out images: a t-SNE of the model's features by source and label; a probe that
    predicts the source from the features within each label; the share of the raw Grad-CAM mass inside
    the lungs; and a masking test (lungs only, lungs hidden). The verdict names each warning that fired,
    with its number and threshold: red (shortcut suspected), amber (not enough skill to judge: a check could
    not be made, never a clean bill) or green (every check judged, none fired). Exit code 0 in every case: a
    flagged model is a finding, not an error.

    **Examples**

    ```
    lungscreen audit runs/covid-resnet-cpu --on M.parquet --out audit
    lungscreen audit runs/covid-resnet-cpu --on M.parquet --out audit --max-images 150
    lungscreen audit runs/demo --on phantoms.parquet --out audit --lungs classical
    ```
    """
    from lungscreen.audit.bias import audit as run_audit, write_audit
    from lungscreen.audit.cams import check_method
    from lungscreen.audit.evaluate import evaluation_rows
    from lungscreen.cli.output import ensure_folder
    from lungscreen.data.manifest import load_manifest
    from lungscreen.inference.predict import Predictor

    ensure_folder(out_dir, mkdir)
    check_method(method, "--method")
    segmenter = _lung_segmenter(lungs)
    predictor = Predictor(run)
    rows = evaluation_rows(predictor, load_manifest(on), None if split == "all" else split, _sources(sources))
    with progress_bar() as bar:
        job = bar.add_task("auditing", total=min(len(rows), max_images))
        result = run_audit(predictor, rows, max_images=max_images, method=method, seed=seed,
                           progress=lambda done: bar.update(job, completed=done), segmenter=segmenter)
    paths = write_audit(result, out_dir, str(predictor.checkpoint.path))
    print_verdict(err, result)
    err.print(f"audit -> {escape(str(paths['html']))}")


def print_verdict(console: Console, result) -> None:  # noqa: ANN001 - an AuditResult
    """The audit's verdict in the page's colours: red (a check fired), amber (a check could not be judged), green."""
    colour = {"shortcut suspected": "bold red", "not enough skill to judge": "bold yellow"}.get(result.verdict, "green")
    console.print(f"[{colour}]{result.verdict}[/]" + ("" if result.flagged or result.unjudged else " by the four checks"))
    for line in result.warnings + result.unjudged:
        console.print(f"  - {escape(line)}")
