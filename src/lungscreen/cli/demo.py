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
    quick: bool = typer.Option(False, "--quick", help="Stop after the manifest (no preprocessing, training, "
                               "evaluation, audit or explanations)."),
) -> None:
    """Run the lungscreen chain end to end on built-in synthetic phantoms (or on --data DIR).

    Phantoms -> manifest (patient-level splits, leakage guard) -> bias-removing preprocessing -> training
    (configs/demo-cpu.yaml) -> evaluation with 95 % intervals -> bias audit -> Grad-CAM explanations.
    Minutes on two CPU cores; the reports open from disk in a browser.
    """
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
    if quick:
        return
    run = _train(_preprocess(frame, workdir), workdir, seed)
    _evaluate_audit_explain(run, parquet, workdir)


def _preprocess(frame, workdir: Path) -> Path:  # noqa: ANN001
    """The bias-removing pipeline (paper 000), once, through the cache; the classical lungs without a U-Net."""
    import warnings

    from lungscreen.lungs.step import LungModelWarning, find_lung_model
    from lungscreen.preprocessing import get_pipeline, preprocess_manifest

    out.rule("2. preprocessing (equalize, lung mask blurred 3 px)")
    method = "unet" if find_lung_model(None) is not None else "classical"
    if method == "classical":
        out.print("[yellow]no trained lung model: the classical lung segmentation is used[/] (train the U-Net with "
                  "`lungscreen lungs train MANIFEST` on real masks)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LungModelWarning)
        pipeline = get_pipeline("tartaglione", {"segment_lungs.method": method})
        result = preprocess_manifest(frame[frame["modality"] == "CXR"], pipeline, workdir / "preprocessed")
    out.print(f"{len(result.manifest)} images preprocessed ({result.computed} computed, {result.cached} from the "
              f"cache, {len(result.failures)} refused) -> {result.manifest_path}")
    return result.manifest_path


def _train(manifest: Path, workdir: Path, seed: int) -> Path:
    """The demo recipe on the preprocessed manifest; a finished run is reused, an interrupted one resumed."""
    from lungscreen.training.config import load_config
    from lungscreen.training.engine import train

    out.rule("3. training (configs/demo-cpu.yaml)")
    run = workdir / "run"
    if (run / "summary.json").exists():
        out.print(f"reusing the finished run {run}")
        return run
    if (run / "config.yaml").exists():
        return train(None, resume=run).run_dir  # type: ignore[arg-type]
    config = load_config("demo-cpu", [f"data.manifest={manifest.resolve()}", f"seed={seed}"])
    return train(config, out=run).run_dir


def _evaluate_audit_explain(run: Path, manifest: Path, workdir: Path) -> None:
    from lungscreen.audit.bias import audit, write_audit
    from lungscreen.audit.evaluate import evaluate_run, evaluation_rows, write_evaluation
    from lungscreen.audit.explain import explain_images
    from lungscreen.data.manifest import load_manifest
    from lungscreen.inference.predict import Predictor

    predictor = Predictor(run)
    out.rule("4. evaluation on the held-out patients")
    evaluation = evaluate_run(predictor, manifest, split="test")
    report = write_evaluation(evaluation, workdir / "evaluation")["report"]
    figure = evaluation.figures["balanced_accuracy"]
    out.print(f"balanced accuracy {figure['value']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}] on "
              f"{len(evaluation.rows)} test images -> {report}")
    out.rule("5. bias audit")
    result = audit(predictor, evaluation_rows(predictor, load_manifest(manifest), "test"), max_images=150)
    page = write_audit(result, workdir / "audit", str(run))["html"]
    out.print(("[yellow]shortcut suspected[/]: " + "; ".join(result.warnings)) if result.flagged
              else "[green]no shortcut found[/] by the four checks")
    out.print(f"audit -> {page}")
    out.rule("6. explanations of three test images")
    paths = evaluation.rows["image_path"].head(3).tolist()
    explained = explain_images(predictor, paths, workdir / "explanations", methods=("gradcam",))
    out.print(f"{int((explained['error'] == '').sum())} overlays -> {workdir / 'explanations'}")
    out.rule("done")
    out.print(f"open {report} and {page} in a browser (no server needed)")


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
