"""CT screening, step by step: what each lever adds on the UCSD COVID-CT patient-level test split.

Rows, for each of the two CT recipes (``light``: paper 002's light CNN, ``light-ct-cpu``; ``resnet``: a
width-32 ResNet-18 at the same size and settings):

1. ``scratch``: the recipe with pipeline ``none`` (stop 17's figure);
2. ``+ctcrop``: the CT body crop and percentile window (``pipeline: ctcrop``);

then one lever at a time on top of whichever of the two scored better on validation:

3. ``+tuned``: the best rates of a ``lungscreen tune light-ct-cpu --trials 30`` search (``--study FOLDER``;
   its summary goes into the JSON);
4. ``+simclr``: self-supervised pre-training on every CT slice (test split excluded) before fine-tuning
   (``light-ct-simclr-cpu``'s first stage in front of the recipe);
5. ``+cxr``: a first stage trains the network on the shared chest X-ray pool (binary COVID-19, without
   pre-processing), the CT stages go on from it;

and, when more than one lever beat its start on validation, those levers together.

``--robust``: the site-robust levers that need no second source (issue 26) on the two shipped CT recipes as
they were before that study (``light-ct-cpu``: body crop and the searched rates; ``ct-resnet-cpu``: SimCLR then
fine-tuning; both with paper 002's augmentation): ``baseline``, ``+acquisition`` (``data.augment: acquisition``
instead of paper 002's set) and ``+spectral`` (``loss.spectral_decoupling: 0.01``), three seeds each; under ``site_robust`` in the JSON. The row with the best
validation accuracy (AUC on a tie) is marked ``chosen_on_validation``: the recipe to ship.

Every row: accuracy, AUC, COVID-19 sensitivity, specificity and F1 on the UCSD test split with 95 %
patient-bootstrap intervals (from the run's own test step, at its validation-chosen operating point),
and the same on a second source, Cohen's CT images (small: read its intervals); train seconds on 2 cores.
best.pt is chosen on validation inside each run; the test split is reported, never used to choose.

    nice .venv/bin/python benchmarks/ct.py [--manifest M] [--only light,resnet] [--seeds 1,2] [--set key=value ...]

Writes ``benchmarks/results/ct.json`` (after every row; finished runs in ``benchmarks/cache/ct/`` are reused).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path
from typing import Any

from cached_runs import run, shown

HERE = Path(__file__).resolve().parent
TARGET = HERE / "results" / "ct.json"
FIGURES = ("accuracy", "auc/COVID-19", "sensitivity/COVID-19", "specificity/COVID-19", "f1/COVID-19")
BACKBONES = {"light": {"name": "squeezenet_ct"}, "resnet": {"name": "resnet18", "options": {"width": 32}}}


def recipe(backbone: str, overrides: list[str]) -> dict[str, Any]:
    """The starting point of every row, whatever the shipped recipes later became: light-ct-cpu as stop 17
    measured it (no pre-processing, paper 002's published SGD rates, taken from its recipe light-ct)."""
    from lungscreen.training.config import load_config, to_raw

    raw = to_raw(load_config("light-ct-cpu", ["data.pipeline=none", *overrides]))
    raw["stages"][0]["optimizer"] = to_raw(load_config("light-ct"))["stages"][0]["optimizer"]
    raw["model"] = {**raw["model"], **copy.deepcopy(BACKBONES[backbone])}
    raw["name"] = f"ct-{backbone}"
    return raw


def study_summary(folder: Path) -> dict[str, Any]:
    """A ``lungscreen tune`` search folder's study: trials finished and pruned, the best validation value and rates."""
    import optuna
    from optuna.trial import TrialState

    storage = f"sqlite:///{(folder / 'study.db').resolve()}"
    (name,) = [summary.study_name for summary in optuna.get_all_study_summaries(storage)]
    study = optuna.load_study(study_name=name, storage=storage)
    count = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
             for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials if t.datetime_complete]
    return {"folder": shown(folder), "study": name, "trials": count, "search_wall_seconds": round(sum(seconds), 1),
            "best_trial": study.best_trial.number, "best_value": study.best_value, "best_params": study.best_params}


def simclr_stage(overrides: list[str]) -> dict[str, Any]:
    from lungscreen.training.config import load_config, to_raw

    return to_raw(load_config("light-ct-simclr-cpu", overrides))["stages"][0]


def cxr_stage(base: dict[str, Any], epochs: int) -> dict[str, Any]:
    """A first stage on the chest X-ray pool (binary COVID-19, no pre-processing: each stage has its own
    pipeline) from which the CT stages go on: the transfer lever, inside the recipe."""
    return {**copy.deepcopy(base["stages"][0]), "name": "cxr", "epochs": epochs,
            "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4}, "schedule": {"name": "one_cycle"},
            "data": {"modality": "CXR", "sources": None, "pipeline": "none", "augment": "light"}}


def second_source(folder: Path, manifest: Path) -> dict[str, Any]:
    """The run's best.pt on Cohen's CT images (binary task; every one of them: another source)."""
    from lungscreen.data.manifest import for_task, load_manifest
    from lungscreen.evaluation.tables import figures_of
    from lungscreen.inference.predict import Predictor
    from lungscreen.inference.scoring import original_images, score_rows, scored

    rows = for_task(load_manifest(manifest), "binary", modality="CT", views=None)
    rows = rows[rows["source"] == "cohen"]
    if rows.empty:
        return {"images": 0}
    predictor = Predictor(folder)
    table = scored(score_rows(predictor, original_images(rows)))
    figures = figures_of(table, predictor.class_names)
    return {"images": len(table), "patients": int(table["patient_id"].nunique()),
            "classes": {str(k): int(v) for k, v in table["truth"].value_counts().items()},
            "figures": {name: figures[name].as_dict() for name in FIGURES if name in figures}}


def row(name: str, folder: Path, seconds: float | None, manifest: Path) -> dict[str, Any]:
    summary = json.loads((folder / "summary.json").read_text())
    test = summary.get("test") or {}
    best = summary["best"]
    return {"row": name, "run": shown(folder),
            "train_seconds": summary["train_seconds"], "wall_seconds": seconds,
            "cpu_minutes_total": round(summary["train_seconds"] / 60, 1),
            "validation": {"epoch": best.get("epoch"), "stage": best.get("stage_name"),
                           **{k: best["figures"].get(f"val/{k}") for k in ("accuracy", "auc/COVID-19")}},
            "test_images": test.get("images"), "operating_point": summary.get("operating_point"),
            "ucsd_test": {k: test.get("figures", {}).get(k) for k in FIGURES},
            "cohen_ct": second_source(folder, manifest)}


def validation_score(entry: dict[str, Any]) -> tuple[float, float]:
    """How rows are compared: validation accuracy (the recipes' monitor), validation AUC on a tie."""
    return entry["validation"]["accuracy"] or 0.0, entry["validation"]["auc/COVID-19"] or 0.0


def with_levers(base: dict[str, Any], levers: list[str], overrides: list[str], study: dict | None,
                cxr_epochs: int) -> dict[str, Any]:
    """``base`` with the levers named (``tuned``, ``simclr``, ``cxr``) put in; stages: CXR, SimCLR, the recipe's."""
    raw = copy.deepcopy(base)
    if "tuned" in levers and study:
        for stage in raw["stages"]:
            stage["optimizer"].update({k.rsplit(".", 1)[-1]: v for k, v in study.items()})
    if "simclr" in levers:
        raw["stages"] = [simclr_stage(overrides), *raw["stages"]]
    if "cxr" in levers:
        raw["stages"] = [cxr_stage(base, cxr_epochs), *raw["stages"]]
    return raw


def seed_spread(name: str, raw: dict[str, Any], seeds: list[int], cache: Path) -> dict:
    """The row's run (``cache/name``) and its recipe again with other seeds: validation and test figures per
    seed, their mean and standard deviation (each seed is one more look at the test split)."""
    import numpy as np

    figures: dict[str, list] = {"seed": [], "val_accuracy": [], "test_accuracy": [], "test_auc": []}
    runs = [(raw["seed"], cache / name)]
    runs += [(seed, run(f"{name}-seed{seed}", {**copy.deepcopy(raw), "seed": seed}, cache)[0]) for seed in seeds]
    for seed, folder in runs:
        summary = json.loads((folder / "summary.json").read_text())
        test = summary["test"]["figures"]
        figures["seed"].append(seed)
        figures["val_accuracy"].append(summary["best"]["figures"].get("val/accuracy"))
        figures["test_accuracy"].append(test["accuracy"]["value"])
        figures["test_auc"].append(test["auc/COVID-19"]["value"])
    spread = {key: {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1))}
              for key, values in figures.items() if key != "seed"}
    return {**figures, "spread": spread}


def rows_for(backbone: str, manifest: Path, overrides: list[str], cache: Path, study: dict | None,
             cxr_epochs: int, combine: bool = True, seeds: list[int] = ()) -> list[dict]:
    """One row per lever, each on top of the better pipeline (chosen on validation), then the final recipe:
    every lever that beat that pipeline's row on validation, together. ``seeds``: the scratch row and the
    chosen row again with these seeds (their spread)."""
    base = recipe(backbone, overrides)
    cropped = copy.deepcopy(base)
    cropped["data"]["pipeline"] = "ctcrop"
    out: list[dict] = []
    recipes: dict[str, dict[str, Any]] = {}

    def run_name(row_name: str) -> str:
        return f"{backbone}{row_name.replace('+', '-')}"

    def measured(name: str, raw: dict[str, Any]) -> dict[str, Any]:
        folder, seconds = run(run_name(name), raw, cache)
        out.append(row(name, folder, seconds, manifest))
        recipes[name] = raw
        print(f"{backbone} {name}: validation {out[-1]['validation']}", flush=True)
        return out[-1]

    scratch, crop = measured("scratch", base), measured("+ctcrop", cropped)
    start, reference = (cropped, crop) if validation_score(crop) > validation_score(scratch) else (base, scratch)
    levers = ["tuned", "simclr", "cxr"] if study else ["simclr", "cxr"]
    kept = []
    for lever in levers:
        entry = measured(f"+{lever}", with_levers(start, [lever], overrides, study, cxr_epochs))
        if validation_score(entry) > validation_score(reference):
            kept.append(lever)
    if len(kept) > 1 and combine:
        measured("+" + "+".join(kept), with_levers(start, kept, overrides, study, cxr_epochs))
    final = max(out, key=validation_score)
    for entry in out:
        entry["chosen_on_validation"] = entry is final
        if seeds and (entry is final or entry["row"] == "scratch"):
            entry["seeds"] = seed_spread(run_name(entry["row"]), recipes[entry["row"]], list(seeds), cache)
    return out


#: The shipped CT recipes as they were before the site-robust study (paper 002's augmentation): every row starts
#: from it, whatever the study made them ship since.
BEFORE_STUDY = ["data.augment=ct_polsinelli"]
#: The site-robust levers of ``--robust`` as overrides of that recipe (its last stage trains on labels).
ROBUST = {"baseline": [], "+acquisition": ["data.augment=acquisition"],
          "+spectral": ["stages.-1.loss.spectral_decoupling=0.01"]}


def robust_rows(recipe_name: str, manifest: Path, overrides: list[str], cache: Path, seeds: list[int]) -> dict:
    """The CT recipe before the study with each site-robust lever, over ``seeds``: per row the runs and their
    means; the row with the best mean validation accuracy (AUC on a tie) is ``chosen_on_validation``."""
    import numpy as np

    from lungscreen.training.config import load_config, to_raw

    rows = {}
    for name, changes in ROBUST.items():
        raw = to_raw(load_config(recipe_name, overrides))
        last = len(raw["stages"]) - 1
        raw = to_raw(load_config(recipe_name, [*overrides, *BEFORE_STUDY, *(c.replace("stages.-1.", f"stages.{last}.")
                                                                             for c in changes)]))
        runs = []
        for seed in seeds:
            folder, seconds = run(f"robust-{recipe_name}-{name.lstrip('+')}-seed{seed}", {**raw, "seed": seed},
                                  cache)
            runs.append(row(f"{name} seed {seed}", folder, seconds, manifest))
            print(f"{recipe_name} {name} seed {seed}: validation {runs[-1]['validation']}", flush=True)
        mean = {key: float(np.mean([r["validation"][key] or 0 for r in runs])) for key in ("accuracy", "auc/COVID-19")}
        rows[name] = {"runs": runs, "validation_mean": mean,
                      "test_mean": {key: float(np.mean([r["ucsd_test"][key]["value"] for r in runs]))
                                    for key in ("accuracy", "auc/COVID-19")}}
    best = max(rows, key=lambda name: (rows[name]["validation_mean"]["accuracy"],
                                       rows[name]["validation_mean"]["auc/COVID-19"]))
    for name, entry in rows.items():
        entry["chosen_on_validation"] = name == best
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=HERE / "cache" / "shared-manifest.parquet")
    parser.add_argument("--only", default=",".join(BACKBONES), help="backbones to run ('none': only record --study)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--study", type=Path, default=None, help="search folder of a finished `lungscreen tune` (study.db)")
    parser.add_argument("--cxr-epochs", type=int, default=8, help="epochs of the chest X-ray stage of +cxr")
    parser.add_argument("--no-combine", dest="combine", action="store_false",
                        help="do not run the levers that beat the start together (said in the JSON)")
    parser.add_argument("--seeds", default="", help="other seeds for the scratch and the chosen row, e.g. 1,2 "
                        "(each one more look at the test split)")
    parser.add_argument("--robust", default="", help="shipped CT recipes to run the site-robust levers on "
                        "(light-ct-cpu,ct-resnet-cpu), with --seeds (default 0,1,2)")
    parser.add_argument("--cache", type=Path, default=HERE / "cache" / "ct")
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args()
    overrides = [f"data.manifest={args.manifest.resolve()}", *args.overrides]
    search = study_summary(args.study) if args.study else None
    study = search["best_params"] if search else None
    seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    results: dict[str, Any] = {"manifest": shown(args.manifest.resolve()), "machine": {"cpus": os.cpu_count()},
                               "targets": {"accuracy": 0.83, "auc/COVID-19": 0.90, "minutes": 30}}
    if search:
        results["tune"] = search
    write(results, args.out)
    for name in [r for r in args.robust.split(",") if r]:
        write({"site_robust": {name: robust_rows(name, args.manifest, overrides, args.cache, seeds or [0, 1, 2])}},
              args.out)
    for backbone in [name for name in args.only.split(",") if name not in ("", "none")]:
        rows = rows_for(backbone, args.manifest, overrides, args.cache, study, args.cxr_epochs, args.combine, seeds)
        write({backbone: rows, "overrides": {backbone: args.overrides}, "combined": {backbone: args.combine}},
              args.out)
    print(f"wrote {args.out}")


def write(updates: dict[str, Any], out: Path) -> None:
    """Merge ``updates`` into the JSON as it is on disk now (another invocation may have written other rows)."""
    results = json.loads(out.read_text()) if out.exists() else {}
    for key, value in updates.items():
        results[key] = {**results.get(key, {}), **value} if key in ("overrides", "combined", "site_robust") else value
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
