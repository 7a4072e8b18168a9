"""Does the site adversary hide the hospital from the embedding, or only from its own head?

Phantoms from ``lungscreen data synth`` (the Radiography Database and NIH layouts, 64 px) with a burnt-in
corner marker on every NIH image (``--shortcut marker --shortcut-by source``): the source is plain to see
inside each class that both sources hold (normal, pneumonia). One small recipe (ResNet-18 width 16, 3 classes,
``--epochs`` epochs) trains without an adversary and with the class-conditional site adversary in each mode
(Ganin's reversal, confusion), over ``--seeds``. Each run reports:

* ``head``: the adversary head's own within-class source accuracy on validation at the last epoch (with
  the accuracy of always naming each class's larger source, ``site/chance``);
* ``probe``: what the bias audit measures, a logistic regression fitted afterwards on the pooled embedding of
  the validation and test images, cross-validated within each class (``audit.bias.source_probe``), with
  its patient-bootstrap interval and chance;
* the validation balanced accuracy, so a row that hides the source by forgetting the disease shows it.

The issue's test "the adversary lowers the source probe" needs the probe row of an adversary mode to sit
below the no-adversary row beyond the seed spread; this benchmark says whether it does.

    nice .venv/bin/python benchmarks/adversary.py [--seeds 0,1,2] [--epochs 12]

Writes ``benchmarks/results/adversary.json`` (runs cached in ``benchmarks/cache/adversary/``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cached_runs import run, shown

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "adversary"
TARGET = HERE / "results" / "adversary.json"
MODES: dict[str, dict[str, Any] | None] = {"none": None, "reversal": {"weight": 1.0, "mode": "reversal"},
                                           "confusion": {"weight": 1.0, "mode": "confusion"}}


def phantoms(n: int, size: int) -> Path:
    """The marked phantoms' manifest (cached)."""
    from lungscreen.data.build import build_manifest
    from lungscreen.data.manifest import save_manifest
    from lungscreen.data.synth import Shortcut, synthesize

    target = CACHE / "manifest.parquet"
    if not target.exists():
        tree = synthesize(CACHE / "tree", n, size=size, seed=3, layouts=("radiography", "nih"),
                          shortcut=Shortcut("marker", by="source", target="nih", strength=1.0), workers=2).root
        save_manifest(build_manifest([tree], seed=0, workers=2, show_progress=False).manifest, CACHE / "manifest")
    return target


def recipe(manifest: Path, adversary: dict[str, Any] | None, seed: int, epochs: int, size: int) -> dict[str, Any]:
    stage: dict[str, Any] = {"name": "all", "epochs": epochs, "image_size": size, "train": "all",
                             "optimizer": {"name": "adam", "lr": 2.0e-3}, "schedule": {"name": "one_cycle"}}
    if adversary is not None:
        stage["adversary"] = adversary
    return {"name": "adversary-probe", "seed": seed, "threads": 1, "precision": "32", "gate": {"enabled": False},
            "data": {"manifest": str(manifest), "task": "covidx", "pipeline": "none", "augment": "light",
                     "batch_size": 16, "eval_batch_size": 64, "balance": {"method": "weighted"}},
            "model": {"name": "resnet18", "options": {"width": 16}}, "stages": [stage]}


def measured(folder: Path, manifest: Path) -> dict[str, Any]:
    """The head's last validation figures and the post-hoc probe on validation + test."""
    from lungscreen.audit.bias import source_probe
    from lungscreen.data.manifest import for_task, load_manifest
    from lungscreen.inference.predict import Predictor
    from lungscreen.inference.scoring import gate_inputs

    rows = for_task(load_manifest(manifest), "covidx")
    rows = rows[rows["split"].isin(["val", "test"])].reset_index(drop=True)
    features, _, _ = gate_inputs(Predictor(folder), rows)
    if len(features) != len(rows):
        raise RuntimeError(f"{len(rows) - len(features)} phantoms could not be prepared")
    probe = source_probe(features, rows.assign(truth=rows["target_name"]))
    history = pd.read_csv(folder / "metrics.csv")
    last = history.dropna(subset=["val/balanced_accuracy"]).iloc[-1]
    head = ({"accuracy": float(last["val/site/accuracy"]), "chance": float(last["val/site/chance"])}
            if "val/site/accuracy" in history else None)
    return {"run": shown(folder), "validation_balanced_accuracy": float(last["val/balanced_accuracy"]),
            "head": head, "probe": {entry["label"]: {"accuracy": entry["accuracy"], "chance": entry["chance"]}
                                    for entry in probe if entry.get("testable")}}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of the probe per class, the head and the validation figure."""
    def spread(values: list[float]) -> dict[str, float]:
        return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                "min": float(np.min(values)), "max": float(np.max(values))}

    labels = sorted({label for r in runs for label in r["probe"]})
    out = {"probe": {label: spread([r["probe"][label]["accuracy"]["value"] for r in runs if label in r["probe"]])
                     for label in labels},
           "validation_balanced_accuracy": spread([r["validation_balanced_accuracy"] for r in runs])}
    if all(r["head"] for r in runs):
        out["head"] = spread([r["head"]["accuracy"] for r in runs])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--n", type=int, default=900, help="phantoms")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    manifest = phantoms(args.n, args.size)
    results: dict[str, Any] = {"phantoms": args.n, "size": args.size, "epochs": args.epochs,
                               "shortcut": "corner marker on every NIH image", "machine": {"cpus": os.cpu_count()},
                               "modes": {}}
    for mode, adversary in MODES.items():
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            folder, seconds = run(f"{mode}-s{seed}-e{args.epochs}", recipe(manifest, adversary, seed, args.epochs,
                                                                           args.size), CACHE)
            runs.append({"seed": seed, "seconds": seconds, **measured(folder, manifest)})
            print(mode, seed, json.dumps(runs[-1]["probe"], default=float), flush=True)
        results["modes"][mode] = {"adversary": adversary, "summary": summary(runs), "runs": runs}
        TARGET.write_text(json.dumps(results, indent=2, default=float) + "\n")
    chance = {label: entry["chance"] for label, entry in results["modes"]["none"]["runs"][0]["probe"].items()}
    results["chance"] = chance
    baseline = results["modes"]["none"]["summary"]["probe"]
    results["lowered"] = {mode: {label: bool(entry["summary"]["probe"][label]["max"] < baseline[label]["min"])
                                 for label in baseline}
                          for mode, entry in results["modes"].items() if mode != "none"}
    TARGET.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(json.dumps(results["lowered"]))


if __name__ == "__main__":
    main()
