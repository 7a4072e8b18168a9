"""CT screening, step by step: what each lever adds on the UCSD COVID-CT patient-level test split.

Rows, for each of the two CT recipes (``light-ct-cpu``: paper 002's light CNN; ``resnet`` variant: a
width-32 ResNet-18 at the same size), each adding one lever to the row above:

1. ``scratch``: the recipe as shipped, pipeline ``none`` (today's figure);
2. ``+ctcrop``: the CT body crop and percentile window (``pipeline: ctcrop``);
3. ``+simclr``: self-supervised pre-training on every CT slice (test split excluded) before fine-tuning
   (``light-ct-simclr-cpu``'s first stage in front of the recipe);
4. ``+cxr``: the fine-tuning starts from the same network trained on the shared chest X-ray pool
   (binary COVID-19, the CXR run made here once per backbone).

Tuned rates (``lungscreen tune light-ct-cpu --trials 30``) enter as a row when ``--study`` names a finished
study's best parameters (JSON), since the search alone costs hours on two cores.

Every row: accuracy, AUC, COVID-19 sensitivity, specificity and F1 on the UCSD test split with 95 %
patient-bootstrap intervals (from the run's own test step, at its validation-chosen operating point),
and the same on a second source, Cohen's CT images (small: read its intervals); train seconds on 2 cores.
best.pt is chosen on validation inside each run; the test split is reported, never used to choose.

    nice .venv/bin/python benchmarks/ct.py [--manifest M] [--only light,resnet] [--set key=value ...]

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
    from lungscreen.training.config import load_config, to_raw

    raw = to_raw(load_config("light-ct-cpu", overrides))
    raw["model"] = {**raw["model"], **copy.deepcopy(BACKBONES[backbone])}
    raw["name"] = f"ct-{backbone}"
    return raw


def simclr_stage(overrides: list[str]) -> dict[str, Any]:
    from lungscreen.training.config import load_config, to_raw

    return to_raw(load_config("light-ct-simclr-cpu", overrides))["stages"][0]


def cxr_run(backbone: str, base: dict[str, Any], cache: Path, epochs: int) -> Path:
    """The backbone trained on the chest X-ray pool (binary COVID-19), the start of the transfer rows."""
    raw = copy.deepcopy(base)
    raw["name"] = f"cxr-{backbone}"
    raw["data"].update(modality="CXR", sources=None, pipeline="none", augment="light")
    raw["stages"] = [{**copy.deepcopy(base["stages"][0]), "name": "cxr", "epochs": epochs,
                      "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4},
                      "schedule": {"name": "one_cycle"}}]
    raw["monitor"] = {"metric": "val/auc/COVID-19"}
    return run(f"cxr-{backbone}", raw, cache)[0]


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
    return {"row": name, "run": shown(folder),
            "train_seconds": summary["train_seconds"], "wall_seconds": seconds,
            "test_images": test.get("images"), "operating_point": summary.get("operating_point"),
            "ucsd_test": {k: test.get("figures", {}).get(k) for k in FIGURES},
            "cohen_ct": second_source(folder, manifest)}


def rows_for(backbone: str, manifest: Path, overrides: list[str], cache: Path, study: dict | None,
             cxr_epochs: int) -> list[dict]:
    base = recipe(backbone, overrides)
    variants: list[tuple[str, dict[str, Any]]] = [("scratch", copy.deepcopy(base))]
    cropped = copy.deepcopy(base)
    cropped["data"]["pipeline"] = "ctcrop"
    variants.append(("+ctcrop", cropped))
    if study:
        tuned = copy.deepcopy(cropped)
        tuned["stages"][0]["optimizer"].update({k.rsplit(".", 1)[-1]: v for k, v in study.items()})
        variants.append(("+tuned", tuned))
    pretrained = copy.deepcopy(variants[-1][1])
    pretrained["stages"] = [simclr_stage(overrides), *pretrained["stages"]]
    variants.append(("+simclr", pretrained))
    transfer = copy.deepcopy(variants[-1][1])
    transfer["stages"] = transfer["stages"][-1:]
    transfer["model"]["init_from"] = str(cxr_run(backbone, base, cache, cxr_epochs))
    transfer["model"]["reset_head"] = True
    variants.append(("+cxr", transfer))
    out = []
    for name, raw in variants:
        folder, seconds = run(f"{backbone}{name.replace('+', '-')}", raw, cache)
        out.append(row(name, folder, seconds, manifest))
        print(f"{backbone} {name}: {json.dumps(out[-1]['ucsd_test'].get('accuracy'))}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=HERE / "cache" / "shared-manifest.parquet")
    parser.add_argument("--only", default=",".join(BACKBONES))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--study", type=Path, default=None, help="JSON of a finished tune study's best parameters")
    parser.add_argument("--cxr-epochs", type=int, default=8, help="epochs of the chest X-ray run behind +cxr")
    parser.add_argument("--cache", type=Path, default=HERE / "cache" / "ct")
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args()
    overrides = [f"data.manifest={args.manifest.resolve()}", *args.overrides]
    study = json.loads(args.study.read_text()) if args.study else None
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.update({"manifest": str(args.manifest), "overrides": args.overrides, "machine": {"cpus": os.cpu_count()},
                    "targets": {"accuracy": 0.83, "auc/COVID-19": 0.90, "minutes": 30}})
    for backbone in args.only.split(","):
        results[backbone] = rows_for(backbone, args.manifest, overrides, args.cache, study, args.cxr_epochs)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
