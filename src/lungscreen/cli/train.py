"""`lungscreen train` and `lungscreen tune`: any model of the zoo with any paper's recipe."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

out = Console()

CONFIG = typer.Argument(None, help="Recipe: a YAML file or the name of a shipped one (covid-resnet-cpu, light-ct, ...).")
SET = typer.Option([], "--set", "-s", help="Override a config key: --set stages.0.epochs=2 --set data.batch_size=16 "
                   "(dotted keys; stages.*.x sets every stage; values are YAML).")
MANIFEST = typer.Option(None, "--manifest", "-m", help="Manifest to train on (sets data.manifest).")


def _load(config: str, manifest: Path | None, overrides: list[str]):
    from lungscreen.training.config import load_config

    extra = [f"data.manifest={manifest.resolve()}"] if manifest is not None else []
    loaded = load_config(config, [*overrides, *extra])
    if loaded.data.manifest:
        loaded.data.manifest = str(Path(loaded.data.manifest).expanduser().resolve())
    return loaded


def train(
    config: str = CONFIG,
    manifest: Path | None = MANIFEST,
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Run folder to write (default runs/NAME-TIME)."),
    overrides: list[str] = SET,
    resume: Path | None = typer.Option(None, "--resume", help="Continue an interrupted run folder (its own config is used)."),
    check: bool = typer.Option(False, "--check", help="Validate the recipe against the zoo and the manifest, then stop."),
    mkdir: bool = typer.Option(False, "--mkdir", help="Create the folder --out goes into if it does not exist."),
) -> None:
    """Train a recipe into a run folder: resolved config, metrics.csv, checkpoints, best.pt, test figures.

    A recipe is a list of stages (image size, epochs, trainable layer groups, optimizer, schedule, loss):
    progressive resizing and freeze-then-unfreeze are stages. Bad recipes fail before training with the
    key named. Under `torchrun --nproc_per_node N` the same command trains data-parallel (data.batch_size
    is the global batch). `--resume RUN` continues a run killed at any point and ends with the weights an
    uninterrupted run would have.

    **Examples**

    ```
    lungscreen train covid-resnet-cpu --manifest data/manifest.parquet
    lungscreen train covid-resnet-cpu --manifest M.parquet --set stages.0.epochs=2 --out runs/quick
    lungscreen train configs/my-recipe.yaml --check   # validate only
    lungscreen train --resume runs/quick              # after Ctrl-C
    ```
    """
    from lungscreen.errors import ConfigError
    from lungscreen.training.engine import train as run_training
    from lungscreen.training.prepare import prepare

    if out_dir is not None:
        from lungscreen.cli.output import ensure_folder

        ensure_folder(out_dir, mkdir)
    if resume is not None:
        result = run_training(None, resume=resume)  # type: ignore[arg-type]
    else:
        if config is None:
            raise ConfigError("config: give a recipe (or --resume RUN)")
        loaded = _load(config, manifest, overrides)
        if check:
            prepared = prepare(loaded)
            sizes = {name: len(frame) for name, frame in prepared.stages[-1].frames.items()}
            out.print(f"[green]ok[/]: {loaded.name}, model {loaded.model.name}, {len(loaded.stages)} stage(s), "
                      f"task {prepared.stages[-1].task.name}, images per split {sizes}")
            return
        result = run_training(loaded, out=out_dir)
    out.print(f"[green]done[/]: {result.run_dir}")
    if result.summary.get("warning"):
        out.print(f"[yellow]warning[/]: {result.summary['warning']}")


def tune(
    config: str = CONFIG,
    trials: int | None = typer.Option(None, "--trials", "-n", min=1, help="Finished trials the study should hold (default tune.trials)."),
    manifest: Path | None = MANIFEST,
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Search folder: trial runs, study.db, trials.csv/png (default runs/NAME-tune)."),
    storage: str | None = typer.Option(None, "--storage", help="SQLAlchemy URL of the study (default sqlite:///OUT/study.db); share one URL between machines."),
    study: str | None = typer.Option(None, "--study", help="Study name (default tune.study or the recipe's name)."),
    overrides: list[str] = SET,
) -> None:
    """Bayesian search (Optuna TPE, median pruning) over the recipe's tune.params ranges.

    By default: initial learning rate, momentum and L2, as in paper 002. Run it again with the same --out
    (or --storage) to resume: it stops once the study holds --trials finished trials. Prints the trials
    table and writes trials.csv, trials.png and best.yaml (the recipe with the best parameters).

    **Examples**

    ```
    lungscreen tune light-ct-cpu --manifest M.parquet --trials 30
    lungscreen tune light-ct-cpu --manifest M.parquet --storage sqlite:///s.db
    ```
    """
    import yaml

    from lungscreen.errors import ConfigError
    from lungscreen.training.config import apply_overrides, from_dict, to_raw
    from lungscreen.training.tune import overrides_for, run_search

    if config is None:
        raise ConfigError("config: give a recipe")
    from lungscreen.interrupts import Interrupted

    loaded = _load(config, manifest, overrides)
    try:
        result = run_search(loaded, trials=trials, out=out_dir, storage=storage, study_name=study)
    except Interrupted as stop:
        stop.where, stop.hint = "during a trial", "run the same tune command again: the study continues where it stopped"
        raise
    table = Table(title=f"study {result.study.study_name}: {len(result.table)} trials")
    for column in result.table.columns:
        table.add_column(str(column).replace("params_", ""))
    for _, row in result.table.iterrows():
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v).split(".")[-1] for v in row])
    out.print(table)
    if result.best_params:
        best = from_dict(apply_overrides(to_raw(loaded), overrides_for(result.best_params, loaded.tune.params)))
        (result.out / "best.yaml").write_text(yaml.safe_dump(to_raw(best), sort_keys=False), encoding="utf-8")
        out.print(f"best value {result.best_value:.4f} with {result.best_params}; recipe in {result.out / 'best.yaml'}")
    out.print(f"trials table {result.out / 'trials.csv'}, plot {result.out / 'trials.png'}")
