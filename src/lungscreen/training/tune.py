"""Hyper-parameter search (paper 002): Optuna's TPE over ranges in the recipe, with pruning.

Paper 002 tuned the initial learning rate, the momentum and the L2 term by Bayesian optimisation
(30 trials x 20 epochs); :data:`~lungscreen.training.config.DEFAULT_SEARCH` is that space, and a recipe's
``tune.params`` can name any other dotted key (``stages.*.optimizer.lr`` sets every stage). Each trial is
a normal run in ``OUT/trial-NNN``; its validation figure (``tune.metric``, the recipe's monitor by default)
is reported every epoch so the median pruner can stop hopeless trials early. Trials never score the test
split (``test: false``): a search must not look at it thirty times; the best recipe's own run does, once.

The study lives in a database: SQLite in the output folder by default, or any SQLAlchemy URL, so several
machines can work on one study (``--storage postgresql://...``). It is resumable: a killed search picks up
where it stopped and runs until the study holds ``--trials`` finished (complete or pruned) trials; the
trial that was running when the process died is marked failed once its heartbeat goes stale and is tried
again with the same parameters.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lungscreen.errors import ConfigError
from lungscreen.training.config import ParamRange, TrainConfig, apply_overrides, from_dict, to_raw


@dataclass
class TuneResult:
    """The finished study and where its table and plot were written."""

    study: Any
    out: Path
    table: pd.DataFrame
    best_params: dict[str, Any]
    best_value: float


def open_study(config: TrainConfig, out: Path, *, storage: str | None = None, study_name: str | None = None):  # noqa: ANN201
    """Create or load the study (TPE sampler, median pruner, heartbeat so dead trials are retried)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    tune = config.tune
    metric, mode = tune_metric(config)
    url = storage or tune.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    try:
        with warnings.catch_warnings():  # the heartbeat is "experimental" in optuna since 2.8; it is what resumes
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = RDBStorage(url, heartbeat_interval=tune.heartbeat_seconds, grace_period=2 * tune.heartbeat_seconds,
                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    except Exception as error:  # noqa: BLE001 - SQLAlchemy raises many kinds; the URL is user input
        raise ConfigError(f"tune.storage: cannot open {url}: {error}") from None
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=1)
              if tune.pruner == "median" else optuna.pruners.NopPruner())
    return optuna.create_study(
        study_name=study_name or tune.study or config.name, storage=rdb, load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=tune.sampler_seed, n_startup_trials=tune.startup_trials),
        pruner=pruner, direction="maximize" if mode == "max" else "minimize")


def tune_metric(config: TrainConfig) -> tuple[str, str]:
    metric = config.tune.metric or config.monitor_metric()[0]
    direction = config.tune.direction
    mode = ("max" if direction == "maximize" else "min") if direction else ("min" if metric.endswith("loss") else "max")
    return metric, mode


def param_name(key: str) -> str:
    """The name a search parameter has in the study (``stages.*.optimizer.lr`` -> ``optimizer.lr``)."""
    return key.replace("stages.*.", "")


def overrides_for(params: dict[str, Any], space: dict[str, ParamRange]) -> list[str]:
    """``key=value`` overrides of the recipe for a trial's (or the best) parameters."""
    keys = {param_name(key): key for key in space}
    return [f"{keys.get(name, name)}={value}" for name, value in params.items()]


def suggest(trial, params: dict[str, ParamRange]) -> list[str]:  # noqa: ANN001
    """Draw every parameter of the search space; return them as ``key=value`` overrides."""
    overrides = []
    for key, spec in params.items():
        name = param_name(key)
        if spec.choices is not None:
            value = trial.suggest_categorical(name, spec.choices)
        elif spec.integer:
            value = trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log)
        else:
            value = trial.suggest_float(name, float(spec.low), float(spec.high), log=spec.log)
        overrides.append(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    return overrides


def finished_count(study) -> int:  # noqa: ANN001
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_search(config: TrainConfig, *, trials: int | None = None, out: str | Path | None = None,
               storage: str | None = None, study_name: str | None = None) -> TuneResult:
    """Run (or resume) the search until the study holds ``trials`` finished trials; write its table and plot."""
    import optuna

    target = trials or config.tune.trials
    out = Path(out) if out is not None else Path("runs") / f"{config.name}-tune"
    out.mkdir(parents=True, exist_ok=True)
    study = open_study(config, out, storage=storage, study_name=study_name)
    metric, mode = tune_metric(config)
    base = {**to_raw(config), "test": False}  # trials are chosen on validation; the test split is not looked at
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial) -> float:  # noqa: ANN001
        from lungscreen.training.engine import train

        overrides = suggest(trial, config.tune.params)
        trial_config = from_dict(apply_overrides(base, overrides))
        trial_dir = out / f"trial-{trial.number:03d}"
        print(f"trial {trial.number}: {', '.join(overrides)}", flush=True)

        def report(row: dict[str, Any]) -> bool:
            value = row.get(metric)
            if value is None or not math.isfinite(float(value)):
                return False
            trial.report(float(value), step=int(row["run_epoch"]))
            return trial.should_prune()

        result = train(trial_config, out=trial_dir, listeners=[report], quiet=True)
        if result.stopped:
            raise optuna.TrialPruned()
        history = result.history
        values = history[metric].dropna() if metric in history else pd.Series(dtype=float)
        if values.empty:
            return float("nan")
        value = float(values.max() if mode == "max" else values.min())
        print(f"trial {trial.number}: {metric} {value:.4f}", flush=True)
        return value

    while finished_count(study) < target:
        study.optimize(objective, n_trials=1, gc_after_trial=True)
    return summarize(study, out, metric)


def summarize(study, out: Path, metric: str) -> TuneResult:  # noqa: ANN001
    """Write ``trials.csv`` and ``trials.png`` (optimisation history) and return the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState

    table = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration"))
    table.to_csv(out / "trials.csv", index=False)
    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if finished:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
            axes = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=metric)
        axes.figure.savefig(out / "trials.png", dpi=100, bbox_inches="tight")
        plt.close(axes.figure)
        best = study.best_trial
        return TuneResult(study, out, table, dict(best.params), float(best.value))
    return TuneResult(study, out, table, {}, float("nan"))
