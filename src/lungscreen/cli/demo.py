"""`lungscreen demo`: the whole chain on a built-in dataset, minutes on a laptop.

For now the chain is: synthesize phantoms (or take ``--data``), build and validate a manifest (schema,
every listed file present, no leakage), print its composition. Later capabilities (segmentation, training,
evaluation, audit, serving) extend it here.
"""

from __future__ import annotations

from pathlib import Path

import typer

from lungscreen.cli.output import stdout_console

out = stdout_console()


def demo(
    data: Path | None = typer.Option(None, help="Use this data folder instead of synthesizing phantoms.",
                                     exists=True, file_okay=False),
    workdir: Path = typer.Option(Path("lungscreen-demo"), help="Folder for the demo's data and outputs."),
    n: int = typer.Option(600, min=30, help="Number of synthetic images when no --data is given."),
    seed: int = typer.Option(0, help="Seed for the phantoms and the split."),
) -> None:
    """Run the lungscreen chain end to end on built-in synthetic phantoms (or on --data DIR)."""
    from lungscreen.cli.data import print_composition
    from lungscreen.data.build import build_manifest
    from lungscreen.data.manifest import check_files, load_manifest, save_manifest
    from lungscreen.data.splits import check_leakage

    workdir.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = _synthesize(workdir / "data", n=n, seed=seed)
    out.rule("1. manifest")
    result = build_manifest([data], seed=seed)
    parquet, _ = save_manifest(result.manifest, workdir / "manifest")
    frame = load_manifest(parquet)
    check_files(frame, parquet)
    check_leakage(frame)
    print_composition(frame)
    out.print(f"[green]manifest ok[/]: {len(frame)} images, {frame['patient_id'].nunique()} patients, "
              f"{len(result.skips)} skipped, every file present, no patient or duplicate across splits -> {parquet}")


def _synthesize(target: Path, n: int, seed: int) -> Path:
    """Phantoms in real public layouts; an identical earlier tree is reused, not rewritten."""
    from lungscreen.data.synth import synthesize
    from lungscreen.progress import progress_bar

    out.rule("0. synthetic phantoms")
    with progress_bar() as bar:
        task = bar.add_task("phantoms", total=n)
        result = synthesize(target, n, seed=seed, workers=2, progress=lambda done: bar.advance(task, done))
    note = "reused" if result.cached else "written"
    out.print(f"{result.images} phantoms {note} in {result.root} (sources: {', '.join(result.counts)})")
    return target
