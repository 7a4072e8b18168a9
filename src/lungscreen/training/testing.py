"""The end of a run: the operating point chosen on validation, then best.pt scored on the test split through
its own inference spec, every figure with a 95 % interval that resamples whole patients, per source too,
and a per-image table of what it predicted; whether the run learned at all; ``summary.json``.

Reported, never used to choose: recipes, thresholds and epochs are chosen on validation. The test figures
are also written into best.pt (``extra["test"]``), so whoever shows the model's answers can show them too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungscreen.inference.scoring import original_images
from lungscreen.io.files import write_atomic
from lungscreen.models import OperatingPoint, load_checkpoint, save_checkpoint
from lungscreen.training.prepare import StagePlan, TaskSpec, task_name
from lungscreen.training.run_context import RunContext
from lungscreen.training.run_folder import say, write_json
from lungscreen.training.stage import stage_objective


def choose_operating_point(path: Path, frame: pd.DataFrame, positive_class: str, sensitivity: float,
                           chosen_on: str) -> OperatingPoint:
    """The threshold on ``positive_class``'s probability that reaches ``sensitivity`` on ``frame`` (the
    validation rows), written into the checkpoint's inference spec; later predictions apply it unchanged.

    Raises:
        MetricError: the validation rows hold no positive or no negative image.
    """
    from lungscreen.evaluation.operating_point import threshold_for_sensitivity
    from lungscreen.inference.predict import Predictor
    from lungscreen.inference.scoring import score_rows, scored

    table = scored(score_rows(Predictor(path), frame))
    chosen = threshold_for_sensitivity(table["truth"] == positive_class, table[positive_class], sensitivity)
    point = OperatingPoint(positive_class=positive_class, threshold=chosen.threshold,
                           rule=f"sensitivity/{positive_class} >= {sensitivity:g}", chosen_on=chosen_on,
                           figures=chosen.as_dict())
    checkpoint = load_checkpoint(path)
    save_checkpoint(path, checkpoint.model, spec=checkpoint.spec.with_operating_point(point),
                    extra=checkpoint.meta.get("extra"))
    return point


def test_classifier(path: Path, frame: pd.DataFrame, *, n_resamples: int = 1000) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The scored test table and its report: overall figures and per source, each with intervals."""
    from lungscreen.evaluation.tables import figures_of, per_source
    from lungscreen.inference.predict import Predictor
    from lungscreen.inference.scoring import score_rows, scored

    predictor = Predictor(path)
    table = score_rows(predictor, frame)
    rows = scored(table)
    classes = predictor.class_names
    report = {"images": int(len(rows)), "patients": int(rows["patient_id"].nunique()),
              "skipped": int((table["error"] != "").sum()),
              "refused_by_gate": int((rows["refused"] != "").sum()),
              "counts": {str(k): int(v) for k, v in rows["truth"].value_counts().sort_index().items()},
              "operating_point": predictor.spec.operating_point.model_dump() if predictor.spec.operating_point else None,
              "figures": {k: v.as_dict() for k, v in figures_of(rows, classes, n_resamples=n_resamples).items()},
              "per_source": per_source(rows, classes, n_resamples=n_resamples)}
    return table, report


def score_checkpoint(path: Path, store, task: TaskSpec, objective, *,  # noqa: ANN001
                     batch_size: int = 64) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """What ``objective`` keeps of a checkpoint's outputs on a loaded store's rows, and the patient of every
    image, through the checkpoint's own inference spec."""
    import torch
    from torch.utils.data import DataLoader

    from lungscreen.training.data import ManifestDataset, collate
    from lungscreen.training.module import channels_last

    checkpoint = load_checkpoint(path)
    dataset = ManifestDataset(store, checkpoint.spec.input.size, checkpoint.spec.input, task)
    kept: list[dict[str, np.ndarray]] = []
    model = checkpoint.model.to(memory_format=torch.channels_last)
    offset = 0
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            part = objective.keep(model(channels_last(batch["image"])), batch)
            kept.append({key: value + offset if key.endswith("row") else value for key, value in part.items()})
            offset += len(batch["image"])
    merged = {key: np.concatenate([k[key] for k in kept if key in k]) for key in {key for k in kept for key in k}}
    return merged, store.frame["patient_id"].astype(str).to_numpy()


def test_report(objective, kept: dict[str, np.ndarray], patients: np.ndarray, *, n_resamples: int = 1000,  # noqa: ANN001
                seed: int = 0) -> dict[str, Any]:
    """Every figure of the objective with its 95 % bootstrap interval, whole patients resampled."""
    from lungscreen.evaluation.metrics import bootstrap_many
    from lungscreen.training.objectives import MultitaskObjective, head_of

    if isinstance(objective, MultitaskObjective):
        report: dict[str, Any] = {}
        for name, head in objective.heads.items():
            own = head_of(kept, name)
            if own:
                report.update({f"{name}/{key}": value for key, value in test_report(head, own, patients).items()})
        return report
    rows = kept["row"]

    def statistic(index: np.ndarray) -> dict[str, float]:
        return objective.figures({key: value[index] for key, value in kept.items()})

    figures = bootstrap_many(np.arange(len(rows)), statistic=statistic, n_resamples=n_resamples, seed=seed,
                             groups=patients[rows])
    return {key: value.as_dict() for key, value in figures.items()}


def operating_point(context: RunContext, plan: StagePlan) -> dict[str, Any] | None:
    """Choose best.pt's decision threshold on the validation split (a single-label classifier whose task has
    the configured positive class), store it in its inference spec, and say so."""
    from lungscreen.errors import MetricError

    wanted = context.config.operating_point
    task = plan.task
    positive = wanted.positive_class or ("COVID-19" if "COVID-19" in getattr(task, "classes", ()) else None)
    if isinstance(task, dict) or task.kind != "multiclass" or positive is None or not wanted.enabled:
        return None
    try:
        point = choose_operating_point(context.dir / "best.pt", original_images(plan.frames[plan.data.val_split]),
                                       positive, wanted.sensitivity, chosen_on=f"{plan.data.val_split} split")
    except MetricError as error:
        say(f"  no operating point: {error}")
        return None
    say(f"operating point: {positive} when its probability >= {point.threshold:.4f} "
        f"(validation sensitivity {point.figures['sensitivity']:.3f}, specificity {point.figures['specificity']:.3f})")
    return point.model_dump()


def fit_run_gate(context: RunContext, plan: StagePlan) -> dict[str, Any] | None:
    """Fit best.pt's out-of-distribution gate (:mod:`lungscreen.inference.gate`): the embedding's Gaussian on
    (up to ``gate.train_images`` of) the training images, the limits on the validation images; store it in
    best.pt's inference spec and say what it refuses of validation."""
    from lungscreen.inference.gate import gate_report
    from lungscreen.inference.predict import Predictor
    from lungscreen.inference.scoring import fit_gate_for

    wanted = context.config.gate
    if not wanted.enabled or isinstance(plan.task, dict) or plan.task.kind not in ("multiclass", "multilabel"):
        return None  # segmentation and multi-head runs: predict does not score them image by image
    best = context.dir / "best.pt"
    predictor = Predictor(best)
    if predictor.multitask or not hasattr(predictor.model, "features"):
        return None
    train = original_images(plan.frames[plan.data.train_split])
    train = train.sample(n=min(wanted.train_images, len(train)), random_state=context.config.seed)
    val = original_images(plan.frames[plan.data.val_split])
    try:
        gate = fit_gate_for(predictor, train, val, target=wanted.target, chosen_on=f"{plan.data.val_split} split")
    except ValueError as error:
        say(f"  no OOD gate: {error}")
        return None
    checkpoint = load_checkpoint(best)
    save_checkpoint(best, checkpoint.model, spec=checkpoint.spec.with_gate(gate), extra=checkpoint.meta.get("extra"))
    say(f"OOD gate: refuses {gate.rejected_on_validation:.1%} of the {gate.validation_images} validation images "
        f"(target <= {gate.target:.0%}); images beyond it are not screened")
    return gate_report(gate)


def test_run(context: RunContext, plan: StagePlan, frame: pd.DataFrame) -> dict[str, Any]:
    """best.pt on the test split: test.json (and test_predictions.csv for a classifier)."""
    best = context.dir / "best.pt"
    if not isinstance(plan.task, dict) and plan.task.kind == "multiclass":
        table, test = test_classifier(best, original_images(frame))
        write_atomic(context.dir / "test_predictions.csv", lambda tmp: table.to_csv(tmp, index=False, float_format="%.8g"))
    else:
        objective = stage_objective(context.config.stages[-1], plan, plan.frames[plan.data.train_split]["target"].to_numpy(),
                               load_checkpoint(best).model)
        store = context.store(plan, plan.data.test_split)
        kept, patients = score_checkpoint(best, store, plan.task, objective)
        tested = store.frame
        test = {"images": int(len(tested)), "patients": int(tested["patient_id"].nunique()),
                "skipped": len(store.failures),
                "counts": {str(k): int(v) for k, v in tested["target_name"].value_counts().sort_index().items()}
                if "target_name" in tested else {},
                "figures": test_report(objective, kept, patients)}
    write_json(context.dir / "test.json", test)
    for name in ("accuracy", "balanced_accuracy", "sensitivity/COVID-19", "ppv/COVID-19", "macro_auc", "dice"):
        if name in test["figures"]:
            figure = test["figures"][name]
            say(f"test {name}: {figure['value']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}]")
    return test


def keep_test_figures(best: Path, test: dict[str, Any], split: str) -> None:
    """Write the test figures into best.pt (``extra["test"]``): what the viewer and the PACS report show
    beside an answer, travelling with the weights they describe."""
    def plain(value: Any) -> Any:  # JSON without NaN: an undefined figure (no positive prediction) is None
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, (float, np.floating)):
            return float(value) if np.isfinite(value) else None
        return value.item() if isinstance(value, np.integer) else value

    checkpoint = load_checkpoint(best)
    kept = plain({"split": split, **{key: test[key] for key in ("images", "patients", "counts", "figures")
                                     if key in test}})
    extra = {**checkpoint.meta.get("extra", {}), "test": kept}
    save_checkpoint(best, checkpoint.model, spec=checkpoint.spec, extra=extra)


#: How far above chance the best validation epoch must be for a run to count as having learned.
CHANCE_MARGIN = 0.05


def learned_beyond_chance(history: pd.DataFrame, task: TaskSpec, last_stage: int) -> tuple[bool | None, str]:
    """Whether the last stage's validation ever beat chance, and the warning to print when it never did.

    Chance is 1/k for a classifier's balanced accuracy and 0.5 for an AUC; a run counts as having learned
    when its best epoch is at least :data:`CHANCE_MARGIN` above it. None (no judgement) for masks and boxes.
    """
    figure, chance = _chance_of(task)
    rows = history[history["stage"] == last_stage] if not history.empty else history
    if figure is None or figure not in rows:
        return None, ""
    best = float(rows[figure].max())
    if best >= chance + CHANCE_MARGIN:
        return True, ""
    return False, (f"the model did not learn: its best {figure} over {len(rows)} epoch(s) is {best:.3f}, chance is "
                   f"{chance:.3f}; do not use this run (check the data, the learning rate, the epochs)")


def _chance_of(task: TaskSpec) -> tuple[str | None, float]:
    """The validation figure that says whether a classifier learned, and its value by chance."""
    if isinstance(task, dict):
        return ("val/findings/macro_auc", 0.5) if "findings" in task else (None, 0.0)
    if task.kind == "multiclass":
        return "val/balanced_accuracy", 1.0 / len(task.classes)
    return ("val/macro_auc", 0.5) if task.kind == "multilabel" else (None, 0.0)


def finish(context: RunContext, stage_reports: list[dict], started: float) -> dict[str, Any]:
    config, env = context.config, context.env
    plan = context.prepared.stages[-1]
    summary: dict[str, Any] = {
        "run": str(context.dir), "config": config.name, "model": config.model.name,
        "task": task_name(plan.task), "classes": context.classes,
        "stages": stage_reports, "best": context.best, "stopped": context.stop_requested,
        "train_seconds": round(sum(r.get("train_seconds") or 0.0 for r in stage_reports), 2),
    }
    finished = env.is_zero and not context.stop_requested and context.best is not None
    supervised = config.stages[-1].objective == "supervised"  # a pre-training run has no answers to test
    if finished and supervised:
        summary["operating_point"] = operating_point(context, plan)
        summary["ood_gate"] = fit_run_gate(context, plan)
    test_frame = plan.frames.get(plan.data.test_split, pd.DataFrame())
    if config.test and finished and supervised and not test_frame.empty:
        summary["test"] = test_run(context, plan, test_frame)
        keep_test_figures(context.dir / "best.pt", summary["test"], plan.data.test_split)
    if supervised and context.best is not None:
        summary["learned"], summary["warning"] = learned_beyond_chance(context.history(), plan.task,
                                                                        len(config.stages) - 1)
        if summary["warning"]:
            say(f"warning: {summary['warning']}")
    summary["wall_seconds_this_session"] = round(time.perf_counter() - started, 2)
    if env.is_zero:
        write_json(context.dir / "summary.json", summary)
        if context.tracker is not None:
            context.tracker.finish(summary)
    return summary
