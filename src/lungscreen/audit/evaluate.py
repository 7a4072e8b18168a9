"""``lungscreen evaluate``: a run scored on a manifest split, written as metrics.json, predictions.csv and a
self-contained report.html.

The rows are the ones the run's own task and modality take (the checkpoint's inference spec says which),
from the split and sources asked for. The run's training patients are refused (a model scored on what it
learned from proves nothing). The report shows the operating point chosen on validation, the figures with
their 95 % patient-bootstrap intervals, per source beside the pooled figure (sources holding one class
only are marked: there a pooled figure rewards recognising the source), the curves, calibration and the
composition of what was tested.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungscreen.data.labels import TASKS, Task
from lungscreen.data.manifest import FRONTAL_VIEWS, for_task, load_manifest
from lungscreen.errors import ConfigError, LeakageError, LungscreenError
from lungscreen.evaluation.tables import composition, figures_of, per_source
from lungscreen.inference.predict import Predictor
from lungscreen.inference.scoring import original_images, score_rows, scored
from lungscreen.io.files import atomic_path

#: Figures the report's summary table shows first, when the task has them.
HEADLINE = ("accuracy", "balanced_accuracy", "macro_auc", "ece", "sensitivity/COVID-19", "specificity/COVID-19",
            "ppv/COVID-19", "npv/COVID-19", "f1/COVID-19", "dor/COVID-19", "auc/COVID-19")


@dataclass
class Evaluation:
    """A run scored on some rows: the per-image table and everything computed from it."""

    run: str
    manifest: str
    split: str
    classes: list[str]
    table: pd.DataFrame
    figures: dict[str, Any]
    sources: list[dict[str, Any]]
    operating_point: dict[str, Any] | None
    modality: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> pd.DataFrame:
        """The scored rows with a known truth."""
        return scored(self.table)

    def as_dict(self) -> dict[str, Any]:
        rows = self.rows
        return {"run": self.run, "manifest": self.manifest, "split": self.split, "classes": self.classes,
                "modality": self.modality, "images": int(len(rows)), "patients": int(rows["patient_id"].nunique()),
                "failed": int((self.table["error"] != "").sum()), "out_of_distribution": int(rows["ood"].sum()),
                "operating_point": self.operating_point, "figures": self.figures, "per_source": self.sources,
                **self.extra}


def run_task(predictor: Predictor) -> Task:
    """The task the run learned: from its inference spec (older runs name one of the shipped tasks)."""
    spec = predictor.spec
    if spec.task_definition is not None:
        return Task.from_dict(spec.task_definition)
    if spec.task not in TASKS:
        raise ConfigError(f"the run's task {spec.task!r} is not recorded in its checkpoint; evaluate knows "
                          f"{', '.join(TASKS)}")
    return TASKS[spec.task]


def evaluation_rows(predictor: Predictor, manifest: pd.DataFrame, split: str | None,
                    sources: Sequence[str] | None = None) -> pd.DataFrame:
    """The manifest rows a run can be scored on: its task's labels, its modality and views, the split and
    sources asked for, none of its training patients.

    Raises:
        ConfigError: an unknown task, split or source, or no row left.
        LeakageError: rows of patients the model was trained on.
    """
    spec = predictor.spec
    views = tuple(spec.views) if spec.views else (FRONTAL_VIEWS if spec.modality == "CXR" else None)
    rows = for_task(manifest, run_task(predictor), modality=spec.modality, views=views)
    if split:
        if split not in set(manifest["split"]):
            raise ConfigError(f"--split: the manifest has no {split!r} rows (splits: "
                              f"{', '.join(sorted(set(manifest['split']) - {''})) or 'none'})")
        rows = rows[rows["split"] == split]
    if sources:
        unknown = sorted(set(sources) - set(manifest["source"]))
        if unknown:
            raise ConfigError(f"--sources: {unknown[0]!r} is not a source of the manifest "
                              f"({', '.join(sorted(set(manifest['source'])))})")
        rows = rows[rows["source"].isin(sources)]
    if rows.empty:
        raise ConfigError(f"no {spec.modality} row of task {spec.task} in the chosen split and sources")
    rows = original_images(rows)
    trained = set(predictor.checkpoint.meta.get("extra", {}).get("train_patients", []))
    overlap = sorted(trained & set(rows["patient_id"].astype(str)))
    if overlap:
        raise LeakageError(f"{len(overlap)} evaluated patient(s) were in the run's training set (e.g. {overlap[0]}); "
                           "evaluate on held-out patients (the test split, or other sources)")
    copies = training_copies(predictor, rows)
    if copies:
        image, original = copies[0]
        raise LeakageError(f"{len(copies)} evaluated image(s) are copies of the run's training images under other "
                           f"patient IDs (near-duplicates by pHash and thumbnail, e.g. {image} = {original}); evaluate "
                           "on held-out images")
    return rows.reset_index(drop=True)


def training_images(predictor: Predictor) -> pd.DataFrame:
    """The run's training images: the rows of its training patients in the manifests its ``config.yaml``
    names (the run's own folder); empty when that folder, its config or its manifests are not at hand (a lone
    checkpoint, an export, data that moved)."""
    import yaml

    trained = set(predictor.checkpoint.meta.get("extra", {}).get("train_patients", []))
    config = Path(predictor.checkpoint.path).parent / "config.yaml"
    if not trained or not config.is_file():
        return pd.DataFrame(columns=["image_path", "phash"])
    raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    named = [raw.get("data") or {}, *((stage or {}).get("data") or {} for stage in raw.get("stages") or [])]
    frames = []
    for manifest in dict.fromkeys(str(data["manifest"]) for data in named if data.get("manifest")):
        try:
            frames.append(load_manifest(manifest))
        except LungscreenError:  # moved or gone: the patient check above still stands
            continue
    if not frames:
        return pd.DataFrame(columns=["image_path", "phash"])
    frame = pd.concat(frames, ignore_index=True).drop_duplicates("image_path")
    return frame[frame["patient_id"].astype(str).isin(trained)].reset_index(drop=True)


def training_copies(predictor: Predictor, rows: pd.DataFrame) -> list[tuple[str, str]]:
    """(evaluated image, training image) of every evaluated row that repeats one of the run's training images
    under another patient ID or file name (:func:`lungscreen.data.dedup.copies_between`)."""
    from lungscreen.data.dedup import copies_between

    training = training_images(predictor)
    if training.empty:
        return []
    same = rows["image_path"].isin(set(training["image_path"]))  # the very files, listed again
    ours = rows[~same]
    stored = lambda frame: frame["phash"].astype(str).tolist() if "phash" in frame else None  # noqa: E731
    pairs = copies_between(ours["image_path"].tolist(), training["image_path"].tolist(), query_hashes=stored(ours),
                           reference_hashes=stored(training))
    return [(path, path) for path in rows.loc[same, "image_path"]] + \
        [(ours["image_path"].iloc[i], training["image_path"].iloc[j]) for i, j in pairs]


def evaluate_run(run: str | Path | Predictor, manifest: str | Path, *, split: str | None = "test",
                 sources: Sequence[str] | None = None, n_resamples: int = 1000,
                 progress: Callable[[int], None] | None = None) -> Evaluation:
    """Score a run on a manifest's rows and compute every figure (see the module docstring)."""
    predictor = run if isinstance(run, Predictor) else Predictor(run)
    rows = evaluation_rows(predictor, load_manifest(manifest), split, sources)
    table = score_rows(predictor, rows, progress=progress)
    good = scored(table)
    if good.empty:
        raise ConfigError(f"no image could be scored ({len(table)} failed, e.g. {table['error'].iloc[0]})")
    classes = predictor.class_names
    point = predictor.spec.operating_point
    return Evaluation(
        run=str(predictor.checkpoint.path), manifest=str(manifest), split=split or "all", classes=classes,
        table=table, figures={k: v.as_dict() for k, v in figures_of(good, classes, n_resamples=n_resamples).items()},
        sources=per_source(good, classes, n_resamples=n_resamples),
        operating_point=point.model_dump() if point else None, modality=predictor.spec.modality)


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------

def write_evaluation(evaluation: Evaluation, out_dir: str | Path) -> dict[str, Path]:
    """metrics.json, predictions.csv and report.html in ``out_dir`` (each written whole or not at all)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(exist_ok=True)
    paths = {"metrics": out_dir / "metrics.json", "predictions": out_dir / "predictions.csv",
             "report": out_dir / "report.html"}
    with atomic_path(paths["metrics"]) as temporary:
        temporary.write_text(json.dumps(evaluation.as_dict(), indent=2, default=_plain) + "\n")
    with atomic_path(paths["predictions"]) as temporary:
        evaluation.table.to_csv(temporary, index=False, float_format="%.6g")
    report_page(evaluation).write(paths["report"])
    return paths


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)


def report_page(evaluation: Evaluation):  # noqa: ANN201 - lungscreen.audit.report.Page
    """The evaluation as one self-contained HTML page."""
    from lungscreen.audit.report import Page

    rows, classes = evaluation.rows, evaluation.classes
    page = Page(f"Evaluation of {Path(evaluation.run).parent.name or evaluation.run}",
                subtitle=f"{evaluation.split} split of {evaluation.manifest}: {len(rows)} images, "
                         f"{rows['patient_id'].nunique()} patients, {evaluation.modality}")
    level, headline, items = _verdict(evaluation)
    page.verdict(level, headline, items)
    page.section("Operating point")
    page.paragraph(_operating_point_text(evaluation.operating_point))
    page.section("Figures, pooled over the sources tested")
    page.table(_figure_table(evaluation.figures), caption="95 % intervals resample whole patients (1000 resamples).")
    _per_source_section(page, evaluation)
    _curves_section(page, rows, classes)
    page.section("What was tested")
    page.table(composition(rows), caption="Images per source and class (truth).")
    failed = evaluation.table[evaluation.table["error"] != ""]
    if len(failed):
        page.table(failed[["image_path", "error"]].head(20), caption=f"{len(failed)} image(s) could not be scored")
    return page


def _verdict(evaluation: Evaluation) -> tuple[str, str, list[str]]:
    figures, items = evaluation.figures, []
    single = [entry["source"] for entry in evaluation.sources if entry["single_class"]]
    if single:
        items.append(f"{len(single)} of {len(evaluation.sources)} source(s) hold one class only ({', '.join(single)}): "
                     "pooled figures partly measure whether the model recognises the source; read them per source.")
    ood = int(evaluation.rows["ood"].sum())
    if ood:
        items.append(f"{ood} image(s) lie outside what the model was trained on (intensity histogram; ood column).")
    failed = int((evaluation.table["error"] != "").sum())
    if failed:
        items.append(f"{failed} image(s) could not be scored.")
    key = "balanced_accuracy"
    value = figures.get(key, {})
    headline = f"balanced accuracy {_estimate_text(value)}"
    for name in ("sensitivity/COVID-19", "specificity/COVID-19"):
        if name in figures:
            headline += f", {name.replace('/', ' ')} {_estimate_text(figures[name])}"
    return ("warning" if items else "ok"), headline, items


def _estimate_text(value: dict[str, float]) -> str:
    if not value or value.get("value") is None or not np.isfinite(value["value"]):
        return "undefined"
    return f"{value['value']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"


def _operating_point_text(point: dict[str, Any] | None) -> str:
    if not point:
        return "No stored operating point: each image is called its most probable class."
    figures = point.get("figures", {})
    return (f"{point['positive_class']} is called when its probability is at least {point['threshold']:.4f}, a "
            f"threshold chosen on the {point.get('chosen_on') or 'validation split'} for {point.get('rule')} "
            f"(there: sensitivity {figures.get('sensitivity', float('nan')):.3f}, specificity "
            f"{figures.get('specificity', float('nan')):.3f}); applied unchanged here.")


def _figure_table(figures: dict[str, dict[str, float]]) -> pd.DataFrame:
    names = [name for name in HEADLINE if name in figures] + sorted(set(figures) - set(HEADLINE))
    return pd.DataFrame({"figure": names, "estimate [95 % CI]": [figures[name] for name in names]})


def _per_source_section(page, evaluation: Evaluation) -> None:  # noqa: ANN001
    page.section("Per source")
    columns = [name for name in ("balanced_accuracy", "sensitivity/COVID-19", "specificity/COVID-19", "auc/COVID-19",
                                 "accuracy", "macro_auc") if any(name in e["figures"] for e in evaluation.sources)]
    frame = pd.DataFrame([{"source": entry["source"], "images": entry["images"], "patients": entry["patients"],
                           "classes": ", ".join(entry["classes_present"]),
                           **{name: entry["figures"].get(name) for name in columns}}
                          for entry in evaluation.sources]).set_index("source")
    marks = {entry["source"]: "holds one class only: AUC and the missing class's figures are undefined"
             for entry in evaluation.sources if entry["single_class"]}
    page.table(frame, caption="Each source on its own; compare with the pooled figures above.", highlight=marks)


def _curves_section(page, rows: pd.DataFrame, classes: list[str]) -> None:  # noqa: ANN001
    from lungscreen.audit.plots import (
        confusion_matrix_figure,
        precision_recall_figure,
        reliability_figure,
        roc_figure,
    )
    from sklearn.metrics import average_precision_score

    from lungscreen.evaluation.curves import auc, precision_recall, reliability, roc
    from lungscreen.evaluation.metrics import confusion_matrix

    page.section("Confusion matrix, curves and calibration")
    truth = rows["target"].to_numpy(dtype=np.int64)
    predicted = np.array([classes.index(name) for name in rows["prediction"]])
    page.figure(confusion_matrix_figure(confusion_matrix(truth, predicted, len(classes)), classes),
                caption="Rows: truth; columns: what the model called (at the operating point).")
    rocs, prs = {}, {}
    for index, name in enumerate(classes):
        positive = truth == index
        if positive.all() or not positive.any():
            continue  # one-vs-rest curves need both answers
        score = rows[name].to_numpy()
        fpr, tpr, _ = roc(positive, score)
        precision, recall, _ = precision_recall(positive, score)
        rocs[name] = (fpr, tpr, auc(positive, score))
        prs[name] = (recall, precision, average_precision_score(positive, score))
    if rocs:
        page.figure(roc_figure(rocs), caption="ROC, each class against the rest (AUC in the legend).")
        page.figure(precision_recall_figure(prs), caption="Precision-recall, each class against the rest (average "
                                                           "precision in the legend).")
    scores = rows[classes].to_numpy()
    confidence, correct = scores.max(axis=1), scores.argmax(axis=1) == truth
    page.figure(reliability_figure(*reliability(correct, confidence)),
                caption="Reliability: accuracy against confidence of the most probable class (the diagonal is "
                        "perfect calibration).")
