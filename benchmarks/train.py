"""Benchmark training: the CPU recipes end to end, with wall time, images/s per stage and test figures.

* ``covid-resnet-cpu`` on the shared CXR manifest (3 classes, patient-level split): target <= 20 minutes
  on 2 cores, with test COVID-19 sensitivity and PPV both >= 0.90 (95 % patient-bootstrap intervals).
* ``light-ct-cpu`` on the UCSD COVID-CT slices (binary; paper 002 reached accuracy 0.83).
* ``bf16``: seconds per training step in float32 and in bf16 autocast for each recipe's model and sizes,
  the measurement behind ``precision: auto``.

Each recipe runs as ``lungscreen train`` in a subprocess (the wall time includes start-up, image loading,
every epoch and the test evaluation). best.pt is chosen on the validation split; the test split is only
reported. Gently, on a shared machine::

    nice -n 10 /work/venv/bin/python benchmarks/train.py [--manifest M] [--only covid-resnet-cpu]

The manifest defaults to /work/scratch/shared-manifest.parquet when present, else one built from
``../shared/data`` into ``benchmarks/cache/``. Writes ``benchmarks/results/train.json`` (merging runs of
``--only``), with the load average before and after (other jobs on the cores inflate the times).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED_MANIFEST = Path("/work/scratch/shared-manifest.parquet")
RECIPES = ("covid-resnet-cpu", "light-ct-cpu")
KEY_FIGURES = ("accuracy", "balanced_accuracy", "macro_auc", "sensitivity/COVID-19", "specificity/COVID-19",
               "ppv/COVID-19", "f1/COVID-19", "auc/COVID-19", "dor/COVID-19")


def default_manifest() -> Path:
    if SHARED_MANIFEST.exists():
        return SHARED_MANIFEST
    target = HERE / "cache" / "shared-manifest"
    if not target.with_suffix(".parquet").exists():
        subprocess.run([sys.executable, "-m", "lungscreen", "data", "build", str(ROOT.parent / "shared" / "data"),
                        "--out", str(target)], check=True)
    return target.with_suffix(".parquet")


def run_recipe(name: str, manifest: Path, overrides: list[str], existing: Path | None = None) -> dict:
    """Train ``name`` (or take the finished run ``existing``) and collect its figures."""
    out = existing.resolve() if existing else HERE / "cache" / "runs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [sys.executable, "-m", "lungscreen", "train", name, "--manifest", str(manifest), "--out", str(out), "--mkdir"]
    for item in overrides:
        command += ["--set", item]
    load_before = os.getloadavg()
    start = time.perf_counter()
    if existing is None:
        subprocess.run(command, check=True)
    wall = time.perf_counter() - start if existing is None else None
    summary = json.loads((out / "summary.json").read_text())
    test = summary.get("test") or {}
    figures = test.get("figures", {})
    result = {
        "command": " ".join(["lungscreen", "train", name, "--manifest", str(manifest)] + [f"--set {o}" for o in overrides]),
        "run": str(out.relative_to(ROOT)),
        "wall_seconds": round(wall, 1) if wall is not None else None,
        "train_seconds": summary["train_seconds"],
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "stages": [{key: stage[key] for key in ("name", "image_size", "epochs_run", "precision", "images_per_s",
                                                  "train_seconds", "train_images")} for stage in summary["stages"]],
        "best_validation": summary["best"],
        "test_images": test.get("images"),
        "test_patients": test.get("patients"),
        "test_counts": test.get("counts"),
        "operating_point": summary.get("operating_point"),
        "test": {name: figures[name] for name in KEY_FIGURES if name in figures},
        "test_most_probable_class": most_probable_class_figures(out, summary["classes"]),
    }
    if name == "covid-resnet-cpu":
        sensitivity, ppv = figures["sensitivity/COVID-19"]["value"], figures["ppv/COVID-19"]["value"]
        result["targets"] = {"wall_seconds<=1200": None if wall is None else wall <= 1200,
                             "sensitivity/COVID-19>=0.90": sensitivity >= 0.90, "ppv/COVID-19>=0.90": ppv >= 0.90}
    if name == "light-ct-cpu":
        result["paper_002_accuracy"] = 0.83
    return result


def most_probable_class_figures(run: Path, classes: list[str]) -> dict:
    """The test figures when each image is called its most probable class (no operating point): how runs
    before the operating point existed were reported, so the history stays comparable."""
    import pandas as pd

    from lungscreen.evaluation.tables import figures_of

    table = pd.read_csv(run / "test_predictions.csv", keep_default_na=False, na_values=[""])
    table = table[table["error"].isna()].assign(prediction=lambda t: t[classes].idxmax(axis=1))
    figures = figures_of(table, classes)
    return {name: figures[name].as_dict() for name in KEY_FIGURES if name in figures}


def recipe_shapes() -> list[tuple[str, tuple, int]]:
    """(model, its options as items, image size) of every stage of the benchmarked recipes, once each."""
    from lungscreen.training.config import load_config

    shapes = []
    for recipe in RECIPES:
        config = load_config(recipe)
        options = tuple(sorted(config.model.options.items()))
        shapes += [(config.model.name, options, stage.image_size) for stage in config.stages]
    return list(dict.fromkeys(shapes))


def measure_bf16() -> list[dict]:
    """fp32 vs bf16-autocast seconds per training step (batch 32) for the recipes' models and sizes."""
    import torch

    from lungscreen import models
    from lungscreen.training.precision import measure_precision

    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, options, size in recipe_shapes():
            torch.manual_seed(0)
            timing = measure_precision(models.create(name, num_classes=3, **dict(options)), size, 32, repeats=3)
            rows.append({"model": name, "options": dict(options), "image_size": size, "threads": threads,
                         "fp32_step_s": round(timing["fp32_step_s"], 4), "bf16_step_s": round(timing["bf16_step_s"], 4),
                         "bf16_speedup": round(timing["fp32_step_s"] / timing["bf16_step_s"], 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=None)
    parser.add_argument("--only", choices=(*RECIPES, "bf16"), action="append", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override for every recipe")
    parser.add_argument("--from-run", type=Path, default=None, help="record this finished run of the (single) --only "
                        "recipe instead of training it (its wall time is then unknown)")
    args = parser.parse_args()
    manifest = args.manifest or default_manifest()
    target = HERE / "results" / "train.json"
    results = json.loads(target.read_text()) if target.exists() and args.only else {}
    results.update({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
                    "manifest": str(manifest)})
    for name in args.only or (*RECIPES, "bf16"):
        print(f"== {name}", flush=True)
        results[name] = measure_bf16() if name == "bf16" else run_recipe(name, manifest, args.overrides, args.from_run)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
