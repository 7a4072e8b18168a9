"""Does the out-of-distribution gate refuse what it must, and only that?

For each model: the out-of-scope set (``lungscreen.data.out_of_scope``: uniform and Gaussian noise, blank
films, photographs, chest phantoms with the lungs erased - ``--per-kind`` of each drawn from seeds - and as
many UCSD COVID-CT slices and Cohen lateral films from ``../shared/data``), and the model's own held-out test
images. Reported: the share refused per kind and overall (target 100 %), and the share of test images
refused (target <= 5 %), each with its 95 % interval (Wilson for the out-of-scope kinds; the test share's
resamples whole patients). "Refused" is any image predict does not answer: the gate's "not screened" and the
refusals before it (a blank film, no lungs found).

    nice .venv/bin/python benchmarks/ood.py --run shipped=benchmarks/cache/runs/covid-resnet-cpu-... \\
        --run demo=lungscreen-demo/run [--per-kind 20]

A run trained without a gate (``gate.enabled=false``, as the generalization study's) gets one fitted here
exactly as training's last step fits it (``fit_gate_for``: up to 2,000 training images, the limits on the
validation split of the run's manifest), stored in a copy under ``benchmarks/cache/ood/NAME``.

Writes ``benchmarks/results/ood.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cached_runs import REPOSITORY, shown

HERE = Path(__file__).resolve().parent
TARGET = HERE / "results" / "ood.json"
SHARED = REPOSITORY.parent / "shared" / "data"


def wilson(successes: int, total: int, z: float = 1.96) -> dict[str, float]:
    """A share with its Wilson score interval (exact enough at 0 % and 100 %, where a normal one collapses)."""
    share = successes / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return {"value": share, "low": max(0.0, centre - half), "high": min(1.0, centre + half), "n": total}


def refused(table: pd.DataFrame) -> pd.Series:
    return table["error"].astype(str) != ""


def with_gate(name: str, run: Path, manifest: Path) -> Path:
    """``run`` itself when its best.pt holds a gate, else a copy with the gate training would have fitted."""
    import shutil

    from lungscreen.audit.evaluate import run_task
    from lungscreen.data.manifest import FRONTAL_VIEWS, for_task, load_manifest
    from lungscreen.inference.gate import TARGET as GATE_TARGET
    from lungscreen.inference.predict import Predictor
    from lungscreen.inference.scoring import fit_gate_for, original_images
    from lungscreen.models import load_checkpoint, save_checkpoint

    if Predictor(run).spec.gate is not None:
        return run
    copy = HERE / "cache" / "ood" / name
    if not (copy / "best.pt").exists() or Predictor(copy).spec.gate is None:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy)
        predictor = Predictor(copy)
        views = FRONTAL_VIEWS if predictor.spec.modality == "CXR" else None
        frame = original_images(for_task(load_manifest(manifest), run_task(predictor),
                                         modality=predictor.spec.modality, views=views))
        train = frame[frame["split"] == "train"]
        gate = fit_gate_for(predictor, train.sample(n=min(2000, len(train)), random_state=0),
                            frame[frame["split"] == "val"], target=GATE_TARGET,
                            chosen_on="val split (fitted after training by benchmarks/ood.py)")
        checkpoint = load_checkpoint(copy / "best.pt")
        save_checkpoint(copy / "best.pt", checkpoint.model, spec=checkpoint.spec.with_gate(gate),
                        extra=checkpoint.meta.get("extra"))
    return copy


def measure(run: Path, manifest: Path, per_kind: int) -> dict[str, Any]:
    from lungscreen.audit.evaluate import evaluation_rows
    from lungscreen.data.manifest import load_manifest
    from lungscreen.data.out_of_scope import kind_of, write_out_of_scope
    from lungscreen.evaluation.bootstrap import bootstrap_ci
    from lungscreen.inference.predict import Predictor, predict_paths

    predictor = Predictor(run)
    with tempfile.TemporaryDirectory() as folder:
        paths = write_out_of_scope(Path(folder), shared=SHARED if SHARED.is_dir() else None, per_kind=per_kind)
        table = predict_paths(predictor, paths)
        table["kind"] = [kind_of(Path(p)) for p in table["path"]]
        examples = table.groupby("kind")["error"].first().to_dict()
    kinds = {kind: {**wilson(int(refused(rows).sum()), len(rows)), "example_reason": examples[kind]}
             for kind, rows in table.groupby("kind")}
    test = evaluation_rows(predictor, load_manifest(manifest), "test")
    own = predict_paths(predictor, test["image_path"].tolist())
    patients = test["patient_id"].astype(str).to_numpy()
    share = bootstrap_ci(refused(own).to_numpy(float), seed=0, groups=patients)
    return {"run": shown(run), "gate": predictor.spec.gate.model_dump(exclude={"mean", "components", "variances"})
            if predictor.spec.gate else None,
            "out_of_scope": {"overall": wilson(int(refused(table).sum()), len(table)), "kinds": kinds},
            "test_refused": {**share.as_dict(), "images": len(own),
                             "reasons": own.loc[refused(own), "error"].str.split(":").str[0].value_counts().to_dict()},
            "targets_met": bool(refused(table).all() and share.value <= 0.05)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=RUN_FOLDER (repeatable)")
    parser.add_argument("--manifest", action="append", default=[],
                        help="NAME=MANIFEST whose test split is the run's own (default: the shared manifest)")
    parser.add_argument("--per-kind", type=int, default=20)
    args = parser.parse_args()
    manifests = dict(item.split("=", 1) for item in args.manifest)
    results = json.loads(TARGET.read_text()) if TARGET.exists() else {}
    results.update({"per_kind": args.per_kind, "machine": {"cpus": os.cpu_count()}})
    for item in args.run:
        name, run = item.split("=", 1)
        manifest = Path(manifests.get(name, HERE / "cache" / "shared-manifest.parquet"))
        print(f"== {name}: {run}", flush=True)
        gated = with_gate(name, Path(run), manifest)
        results.setdefault("models", {})[name] = {**measure(gated, manifest, args.per_kind),
                                                  "trained": shown(Path(run).resolve()), "manifest": shown(manifest)}
        TARGET.parent.mkdir(parents=True, exist_ok=True)
        TARGET.write_text(json.dumps(results, indent=2, default=float) + "\n")
        print(json.dumps({k: v for k, v in results["models"][name].items() if k != "gate"}, indent=1, default=float))


if __name__ == "__main__":
    main()
