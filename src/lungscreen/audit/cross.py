"""The cross-dataset matrix (paper 000, Tables II-IV): train without one source, test on every source.

For each left-out source S one run trains the recipe on every other source; its operating point is
chosen on those training sources' validation split (the engine does so) and is applied unchanged to S,
which is what a hospital adopting the model would get. Each run is then tested on the test split of every
training source (same-source figures) and on *all* of S (other-source figures), minus any image of S
whose near-duplicate sits in the training sources (the public COVID-19 sets copy each other).

Sources holding one class only are marked: there balanced accuracy and AUC are undefined and only the
sensitivity or the specificity at the transferred threshold can be read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungscreen.data.manifest import load_manifest
from lungscreen.errors import ConfigError
from lungscreen.evaluation.tables import figures_of
from lungscreen.inference.predict import Predictor
from lungscreen.inference.scoring import original_images, score_rows, scored
from lungscreen.io.files import atomic_path

#: Figures of each cell of the matrix (per-class ones of the positive class).
CELL_FIGURES = ("balanced_accuracy", "dor", "auc", "sensitivity", "specificity")
#: A drop of balanced accuracy on the left-out source beyond this is flagged (the intervals of a few
#: hundred test images are about +-0.05: a larger drop is not noise).
MEANINGFUL_DROP = 0.1


@dataclass
class CrossResult:
    """Every (left-out source, tested source) cell with its figures, and the runs that made them."""

    recipe: str
    manifest: str
    positive: str
    runs: dict[str, str]
    cells: list[dict[str, Any]] = field(default_factory=list)

    def matrix(self, figure: str) -> pd.DataFrame:
        """Left-out source x tested source values of one figure (NaN where undefined)."""
        frame = pd.DataFrame([{"left out": c["left_out"], "tested": c["tested"],
                               "value": c["figures"].get(figure, {}).get("value", np.nan)} for c in self.cells])
        return frame.pivot(index="left out", columns="tested", values="value")

    def drops(self) -> list[dict[str, Any]]:
        """Per left-out source: its balanced accuracy against the mean of the same-source cells."""
        out = []
        for left_out in self.runs:
            cells = [c for c in self.cells if c["left_out"] == left_out]
            same = [c["figures"]["balanced_accuracy"]["value"] for c in cells
                    if c["tested"] != left_out and not c["single_class"]]
            other = next((c for c in cells if c["tested"] == left_out), None)
            out.append({"left_out": left_out,
                        "same_source_balanced_accuracy": float(np.nanmean(same)) if same else None,
                        "left_out_balanced_accuracy": None if other is None or other["single_class"]
                        else other["figures"]["balanced_accuracy"]["value"],
                        "transferred_threshold": None if other is None else {
                            key: other["figures"].get(key) for key in ("sensitivity", "specificity")}})
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "manifest": self.manifest, "positive_class": self.positive, "runs": self.runs,
                "cells": self.cells, "drops": self.drops()}


def positive_class(classes: Sequence[str]) -> str | None:
    """The class a screening test is about: COVID-19 where the task has it, else the disease of a two-class
    normal-against-disease task."""
    if "COVID-19" in classes:
        return "COVID-19"
    others = [name for name in classes if name not in ("normal", "non-COVID")]
    return others[0] if len(classes) == 2 and len(others) == 1 else None


def default_left_out(rows: pd.DataFrame, positive: str) -> list[str]:
    """Every source with images of the positive class: each is left out in turn."""
    return sorted(rows.loc[rows["target_name"] == positive, "source"].unique())


def left_out_rows(rows: pd.DataFrame, left_out: str) -> pd.DataFrame:
    """All of the left-out source's rows, minus near-duplicates of images the run trained on."""
    own = rows[rows["source"] == left_out]
    if "dup_group" not in rows.columns:
        return own
    seen = set(rows.loc[rows["source"] != left_out, "dup_group"].astype(str)) - {"", "-1", "nan"}
    return own[~own["dup_group"].astype(str).isin(seen)]


def cross_dataset(recipe: str, manifest: str | Path, out_dir: str | Path, *, held_out: Sequence[str] | None = None,
                  overrides: Sequence[str] = (), n_resamples: int = 1000, quiet: bool = False) -> CrossResult:
    """Train one run per left-out source (or reuse a finished one in ``out_dir``) and score every cell (or
    reuse a cell the run scored on the same images before: ``without-SOURCE/cells/TESTED.json``).

    Raises:
        ConfigError: a recipe without a COVID-19 class, an unknown left-out source, or fewer than two sources.
    """
    from lungscreen.training.config import load_config
    from lungscreen.training.engine import train

    manifest = Path(manifest).resolve()
    frame = load_manifest(manifest)
    base = load_config(recipe, [*overrides, f"data.manifest={manifest}"])
    task = base.task()
    positive = None if isinstance(task, dict) else positive_class(task.classes)
    if positive is None:
        raise ConfigError(f"--cross: recipe {recipe} has no COVID-19 class (nor a normal-against-disease task) to "
                          "test across sources")
    from lungscreen.training.prepare import stage_views, task_rows

    rows = task_rows(frame, task, modality=base.data.modality, views=stage_views(base.data))
    sources = sorted(rows["source"].unique())
    left_outs = list(held_out) if held_out else default_left_out(rows, positive)
    unknown = sorted(set(left_outs) - set(sources))
    if unknown:
        raise ConfigError(f"--held-out: {unknown[0]!r} is not a source of the task's rows ({', '.join(sources)})")
    if len(sources) < 2:
        raise ConfigError(f"--cross needs at least two sources; the task's rows hold {', '.join(sources)}")
    out_dir = Path(out_dir)
    result = CrossResult(recipe, str(manifest), positive, {})
    for left_out in left_outs:
        run_dir = out_dir / f"without-{left_out}"
        training = [s for s in sources if s != left_out]
        if not (run_dir / "summary.json").exists():
            config = load_config(recipe, [*overrides, f"data.manifest={manifest}", f"data.sources={json.dumps(training)}",
                                          f"name={base.name}-without-{left_out}"])
            resume = run_dir if (run_dir / "config.yaml").exists() else None
            train(config, out=None if resume else run_dir, resume=resume, quiet=quiet)
        result.runs[left_out] = str(run_dir)
        predictor = None  # loaded when a cell is not cached
        for tested in sources:
            cell_rows = left_out_rows(rows, left_out) if tested == left_out else \
                rows[(rows["source"] == tested) & (rows["split"] == base.data.test_split)]
            if cell_rows.empty:
                continue
            cached = run_dir / "cells" / f"{tested}.json"
            key = _cell_key(cell_rows, n_resamples)
            kept = json.loads(cached.read_text()) if cached.is_file() else {}
            if kept.get("key") == key:
                result.cells.append(kept["cell"])
                continue
            predictor = predictor or Predictor(run_dir)
            result.cells.append(_cell(predictor, cell_rows, left_out, tested, positive, n_resamples))
            cached.parent.mkdir(exist_ok=True)
            with atomic_path(cached) as temporary:
                temporary.write_text(json.dumps({"key": key, "cell": result.cells[-1]}, indent=1) + "\n")
    return result


def _cell_key(rows: pd.DataFrame, n_resamples: int) -> str:
    """What a cell's figures depend on besides the finished run: its images, their labels and the resamples
    (a cell scored again only when one of them changed: scoring runs every image through the pipeline)."""
    import hashlib

    items = sorted(zip(rows["image_path"].astype(str), rows["target"].astype(str), strict=True))
    return hashlib.sha256(json.dumps([items, n_resamples]).encode()).hexdigest()


def _cell(predictor: Predictor, rows: pd.DataFrame, left_out: str, tested: str, positive: str,
          n_resamples: int) -> dict[str, Any]:
    table = scored(score_rows(predictor, original_images(rows)))
    figures = figures_of(table, predictor.class_names, n_resamples=n_resamples)
    figures = {name: figures[name if name == "balanced_accuracy" else f"{name}/{positive}"] for name in CELL_FIGURES}
    present = sorted(set(table["truth"]))
    return {"left_out": left_out, "tested": tested, "same_source": tested != left_out, "images": int(len(table)),
            "patients": int(table["patient_id"].nunique()), "classes_present": present,
            "single_class": len(present) == 1,
            "figures": {name: value.as_dict() for name, value in figures.items()}}


def write_cross(result: CrossResult, out_dir: str | Path) -> dict[str, Path]:
    """cross.json and a self-contained report.html."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "cross.json", "report": out_dir / "report.html"}
    with atomic_path(paths["json"]) as temporary:
        temporary.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    cross_page(result).write(paths["report"])
    return paths


def cross_page(result: CrossResult):  # noqa: ANN201 - lungscreen.audit.report.Page
    from lungscreen.audit.plots import matrix_figure
    from lungscreen.audit.report import Page

    page = Page("Cross-dataset matrix", subtitle=f"recipe {result.recipe}, manifest {result.manifest}; positive class "
                                                f"{result.positive}")
    drops = result.drops()
    items, worst = [], 0.0
    for drop in drops:
        same, other = drop["same_source_balanced_accuracy"], drop["left_out_balanced_accuracy"]
        if same is not None and other is not None:
            worst = max(worst, same - other)
            items.append(f"without {drop['left_out']}: balanced accuracy {same:.3f} on the training sources' "
                         f"test splits, {other:.3f} on {drop['left_out']} (drop {same - other:+.3f})")
    page.verdict("warning" if worst > MEANINGFUL_DROP else "ok",
                 "Same-source against other-source balanced accuracy", items)
    page.section("Balanced accuracy, DOR and AUC: rows trained without the source, columns tested on")
    for figure, limits in (("balanced_accuracy", (0.0, 1.0)), ("auc", (0.0, 1.0)), ("dor", (None, None))):
        matrix = result.matrix(figure)
        title = figure if figure == "balanced_accuracy" else f"{figure} of {result.positive}"
        page.figure(matrix_figure(matrix.to_numpy(dtype=float), list(matrix.index), list(matrix.columns), title,
                                  vmin=limits[0], vmax=limits[1], row_label="left out", column_label="tested on"),
                    caption="n/a: undefined there (the tested set holds one class only).")
    page.section("Every cell, with 95 % intervals")
    table = pd.DataFrame([{"left out": c["left_out"], "tested on": c["tested"],
                           "kind": "same source (test split)" if c["same_source"] else "LEFT-OUT source (all of it)",
                           "images": c["images"], "classes": ", ".join(c["classes_present"]),
                           **c["figures"]} for c in result.cells])
    marks = {index: "one class only: balanced accuracy and AUC undefined" for index, c in enumerate(result.cells)
             if c["single_class"]}
    page.table(table, highlight=marks)
    page.section("The transferred threshold on the left-out source")
    page.paragraph("Each run's operating point was chosen on its training sources' validation split and applied "
                   "unchanged to the left-out source: the sensitivity and specificity a hospital adopting it would get.")
    page.table(pd.DataFrame([{"left out": d["left_out"], **(d["transferred_threshold"] or {})} for d in drops]))
    return page
