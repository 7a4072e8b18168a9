"""MultiCheXNet on the shared data: does one encoder for three tasks beat three, and does it transfer?

Runs (each a run folder under ``benchmarks/cache/multitask/``, reused when finished):

* **protocol**: ``configs/multichexnet-cpu.yaml``, the paper's four stages (classifier, box head, mask
  head, multi-task), wall time against the 30-minute target on 2 cores;
* **single-task baselines**, the same encoder from scratch taught by ONE head (the model's required findings
  head weighs 0 in the loss; no teacher forcing) for as many epochs as that head gets in the protocol:
  findings (the classifier stage), boxes (lung boxes from masks), mask (the ``lungs`` task);
* **filter effect** (the paper's Table 2): the protocol's box and mask heads on the test images with a
  drawn mask (teacher-forced view) and through the findings filter (images it stops get no boxes and an
  empty mask, as at inference);
* **transfer** (the paper's MTL-TL): binary COVID-19 on Cohen's collection (the paper's COVID set) with a
  new output layer, from scratch, from the single-task classifier and from the multi-task model.

Every figure is on the test split with its 95 % patient-bootstrap interval; epochs and best.pt are chosen on
validation inside each run. ``--set`` adds config overrides to every run (``--set stages.0.epochs=1`` style
keys apply to the recipes' own stage lists), e.g. a quick try on a phantom manifest.

    nice .venv/bin/python benchmarks/multitask.py [--manifest M] [--only protocol,baselines,filter,transfer]

Writes ``benchmarks/results/multitask.json`` (updated after every part).
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
CACHE = HERE / "cache" / "multitask"
TARGET = HERE / "results" / "multitask.json"
RECIPE = "multichexnet-cpu"
PARTS = ("protocol", "baselines", "filter", "transfer")
HEAD_FIGURES = ("findings/macro_auc", "findings/auc/pneumonia", "findings/auc/COVID-19", "boxes/map50",
                "boxes/mean_iou", "mask/dice")
TRANSFER_FIGURES = ("findings/auc/COVID-19", "findings/sensitivity/COVID-19", "findings/ppv/COVID-19",
                    "findings/balanced_accuracy")


def recipe(overrides: list[str]) -> dict[str, Any]:
    """The shipped protocol as plain data (stage defaults merged), overrides applied."""
    from lungscreen.training.config import load_config, to_raw

    return to_raw(load_config(RECIPE, overrides))


def test_figures(folder: Path, names: tuple[str, ...]) -> dict[str, Any]:
    figures = json.loads((folder / "summary.json").read_text())["test"]["figures"]
    return {name: figures[name] for name in names if name in figures}


def protocol(base: dict[str, Any], cache: Path) -> dict[str, Any]:
    folder, seconds = run("protocol", base, cache)
    summary = json.loads((folder / "summary.json").read_text())
    stages = [{key: stage.get(key) for key in ("name", "image_size", "epochs_run", "precision", "images_per_s",
                                               "train_seconds")} for stage in summary["stages"]]
    return {"run": shown(folder), "wall_seconds": seconds, "train_seconds": summary["train_seconds"],
            "target_seconds": 1800, "stages": stages, "figures": test_figures(folder, HEAD_FIGURES)}


def baselines(base: dict[str, Any], cache: Path) -> dict[str, Any]:
    """Each head alone: the protocol's stage for it, from scratch, for the epochs it trains in the protocol."""
    stages = {stage["name"]: stage for stage in base["stages"]}
    last = base["stages"][-1]
    plans = {"findings": (stages["classifier"], stages["classifier"]["epochs"]),
             "boxes": (stages["boxes"], stages["boxes"]["epochs"] + last["epochs"]),
             "mask": (stages["mask"], stages["mask"]["epochs"] + last["epochs"])}
    out = {}
    for head, (stage, epochs) in plans.items():
        raw = copy.deepcopy(base)
        raw["name"] = f"{RECIPE}-{head}-alone"
        alone = {**copy.deepcopy(stage), "epochs": epochs, "name": f"{head}-alone", "teacher_forcing": None}
        if head != "findings":  # the model keeps its (required) findings head, but it teaches the encoder nothing
            alone["loss"] = {**(alone.get("loss") or {}), "head_weights": {"findings": 0.0}}
        raw["stages"] = [alone]
        raw["monitor"] = {"metric": {"findings": "val/findings/macro_auc", "boxes": "val/boxes/map50",
                                     "mask": "val/mask/dice"}[head]}
        folder, seconds = run(f"alone-{head}", raw, cache)
        out[head] = {"run": shown(folder), "epochs": epochs, "wall_seconds": seconds,
                     "figures": test_figures(folder, HEAD_FIGURES)}
    return out


def filter_effect(folder: Path, base: dict[str, Any]) -> dict[str, Any]:
    """The protocol's dense heads on the test images with a mask: all of them, then through the filter."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from lungscreen.data.manifest import load_manifest
    from lungscreen.models import load_checkpoint
    from lungscreen.preprocessing.model_input import spec_pipeline
    from lungscreen.training.config import from_dict
    from lungscreen.training.data import ImageStore, ManifestDataset, collate
    from lungscreen.training.objectives import build_objective
    from lungscreen.training.prepare import stage_views, task_rows
    from lungscreen.training.recipe_checks import resolve_task
    from lungscreen.training.testing import test_report

    config = from_dict(base)
    data = config.stage_data(len(config.stages) - 1)
    task = resolve_task(data.task, "data.task")
    checkpoint = load_checkpoint(folder / "best.pt")
    rows = task_rows(load_manifest(data.manifest), task, modality=data.modality, views=stage_views(data))
    rows = rows[(rows["split"] == data.test_split) & (rows["target/mask"] >= 0)].reset_index(drop=True)
    store = ImageStore(rows, spec_pipeline(checkpoint.spec.input), [checkpoint.spec.input.size], with_masks=True)
    store.load_all()
    dataset = ManifestDataset(store, checkpoint.spec.input.size, checkpoint.spec.input, task)
    model = checkpoint.model.eval()
    objective = build_objective(task, config.stages[-1].loss, grid=model.grid)
    views: dict[str, list[dict[str, np.ndarray]]] = {"every image with a mask": [], "through the filter": []}
    passed_count = 0
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=32, collate_fn=collate):
            outputs = model(batch["image"])
            passed = torch.sigmoid(outputs["findings"].float()).max(dim=1).values >= 0.5
            passed_count += int(passed.sum())
            stopped = {"boxes": outputs["boxes"].clone(), "mask": outputs["mask"].clone()}
            per = model.grid.per_anchor
            stopped["boxes"].view(len(passed), -1, per, *stopped["boxes"].shape[-2:])[~passed, :, 4] = -30.0
            stopped["mask"][~passed] = -30.0
            for view, dense in (("every image with a mask", outputs), ("through the filter", {**outputs, **stopped})):
                views[view].append(objective.keep(dense, batch))
    patients = store.frame["patient_id"].astype(str).to_numpy()
    out: dict[str, Any] = {"images": len(store.frame), "passed_by_filter": passed_count, "filter_threshold": 0.5}
    for view, kept in views.items():
        merged = {key: np.concatenate([k[key] for k in kept]) for key in kept[0]}
        report = test_report(objective, merged, patients)
        out[view] = {name: report[name] for name in ("boxes/map50", "boxes/mean_iou", "mask/dice") if name in report}
    return out


def transfer(base: dict[str, Any], starts: dict[str, Path | None], source: str, cache: Path) -> dict[str, Any]:
    """Binary COVID-19 on one source's images (Cohen's, as the paper) with a new output layer, from each
    starting point; the classifier stage's settings with four more epochs."""
    out = {}
    for name, start in starts.items():
        raw = copy.deepcopy(base)
        raw["name"] = f"{RECIPE}-transfer-{name}"
        raw["data"].update(task={"heads": {"findings": "binary"}}, sources=[source])
        stage = copy.deepcopy(base["stages"][0])
        stage.update(name=f"covid-{name}", epochs=stage["epochs"] + 4, data={})
        raw["stages"] = [stage]
        raw["model"]["init_from"] = str(start / "best.pt") if start else None
        raw["model"]["reset_head"] = start is not None
        raw["monitor"] = {"metric": "val/findings/auc/COVID-19"}
        folder, seconds = run(f"transfer-{name}", raw, cache)
        out[name] = {"run": shown(folder), "init_from": shown(start) if start else None,
                     "wall_seconds": seconds, "figures": test_figures(folder, TRANSFER_FIGURES)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=HERE / "cache" / "shared-manifest.parquet")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override for every run")
    parser.add_argument("--transfer-source", default="cohen", help="the COVID-19 set of the transfer runs")
    parser.add_argument("--cache", type=Path, default=CACHE, help="folder of the runs")
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args()
    cache = args.cache
    overrides = [f"data.manifest={args.manifest.resolve()}", *args.overrides]
    base = recipe(overrides)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.update({"recipe": RECIPE, "manifest": shown(args.manifest), "overrides": args.overrides,
                    "machine": {"cpus": os.cpu_count()}})
    parts = args.only.split(",")
    if "protocol" in parts:
        results["protocol"] = protocol(base, cache)
        _save(results, args.out)
    if "baselines" in parts:
        results["baselines"] = baselines(base, cache)
        _save(results, args.out)
    if "filter" in parts:
        results["filter_effect"] = filter_effect(cache / "protocol", base)
        _save(results, args.out)
    if "transfer" in parts:
        starts = {"scratch": None, "single-task classifier": cache / "alone-findings", "multi-task": cache / "protocol"}
        results["transfer"] = transfer(base, starts, args.transfer_source, cache)
        _save(results, args.out)
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2)[:4000])


def _save(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
