"""Which recipe reads the lungs and not the hospital? The site-robust study that picks the shipped CXR recipe.

Rows: the baseline (``covid-resnet-cpu`` as it was before this study: pipeline ``lungcrop`` with the lung U-Net,
``augment: light``), each lever of site-robust training alone on it, and combinations, named by their levers
joined with ``+`` (``acquisition+simclr``):

==========================  ====================================================================================
row                         recipe change
==========================  ====================================================================================
baseline                    none
balance-exclude             ``data.balance: {method: source_label, partial_sources: exclude}``
balance-weight              ``data.balance: {method: source_label, partial_sources: weight, partial_share: 0.1}``
acquisition                 ``data.augment: acquisition``
spectral                    ``loss.spectral_decoupling: 0.01`` (no search: the middle of Pezeshki et al.'s range)
adversary                   ``adversary: {weight: 1.0, mode: confusion}`` (class-conditional site adversary, Ganin's ramp)
simclr                      a SimCLR stage on every chest X-ray of the run's sources but the test split first
combined                    the levers whose row beat ``baseline`` on the rule below, together
==========================  ====================================================================================

For every row and seed:

* **internal**: the recipe on its 3-class task on every source, tested on the held-out patients of the same
  sources (COVID-19 sensitivity, PPV, balanced accuracy, AUC with 95 % patient-bootstrap intervals), and the
  bias audit of that run (within-class source probe, masking test, verdict);
* **left-out sources**: binary COVID-19 against the rest, each source holding both classes left out in turn
  (Cohen, the Radiography Database; for the baseline and the chosen rows, ``--full``, also Figure 1, too
  small to rank on, and NIH's negatives as a specificity-only row): balanced accuracy, AUC, sensitivity and specificity on the left-out
  source at the threshold chosen on the training sources' validation split (``lungscreen evaluate
  --cross``), and each left-out run's own audit on its training sources' test splits;
* for the baseline and the chosen rows, **AdaBN** (``lungscreen adapt``) on each left-out source's unlabelled
  images, at the source's own case mix and at COVID-19 prevalences 0.1, 0.5 and 0.9 of the adaptation set.

The rule: the best mean left-out balanced accuracy over Cohen and the Radiography Database (the mean over
seeds where a row has several); a row less than a seed standard deviation below the best (both measured with
several seeds) ties with it, and of tied rows the one with the fewest levers is chosen (a lever that adds
nothing beyond the seed spread does not ship). Internal sensitivity and PPV are reported beside it, never
traded against it silently. The left-out sources choose the recipe, so their figures for the chosen row are
optimistic by the choice (ten rows compared, most with one seed); the seeds of the chosen row show how much.

The study runs fit no OOD gate (``gate.enabled=false``: it changes no figure here and costs minutes a run).

Budget: ``--size`` px for ``--epochs`` epochs (defaults 128 and 8; the full recipe is 256 px for 30 epochs,
about 27 minutes a run on two quiet cores, and this study trains about fifty). The chosen recipe is then
run at full budget by ``benchmarks/train.py``.

    nice .venv/bin/python benchmarks/generalization.py [--rows baseline,adversary,acquisition+simclr] [--seeds 0,1,2] [--full]

Writes ``benchmarks/results/generalization.json`` after every run (finished runs are reused from
``benchmarks/cache/generalization/``, an interrupted one resumes). The lung U-Net is the one shipped with
the package (or ``$LUNGSCREEN_LUNG_MODEL``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cached_runs import run, shown

RULE = ("best mean left-out balanced accuracy (Cohen, Radiography Database), mean over seeds; rows less than a seed "
        "standard deviation below the best (both with several seeds) tie with it, and the one with the fewest levers "
        "is chosen")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / "cache" / "generalization"
TARGET = HERE / "results" / "generalization.json"
RECIPE = "covid-resnet-cpu"
RANKED = ("cohen", "covid19-radiography")  # the sources holding both classes in numbers
NEGATIVES_ONLY = "nih-darkcovidnet"
SMALL = "figure1"
PREVALENCES = (0.1, 0.5, 0.9)
SIMCLR_EPOCHS = 4
ADABN_IMAGES = 600  # images of a left-out source scored per AdaBN mix
INTERNAL_FIGURES = ("sensitivity/COVID-19", "ppv/COVID-19", "balanced_accuracy", "auc/COVID-19")

#: The recipe as it was before this study chose a lever (``covid-resnet-cpu`` with ``augment: light``): every row
#: starts from it, whatever the shipped recipe became.
BASELINE = ["data.augment=light"]
#: Each lever as recipe overrides (``--set`` syntax) on the baseline; "simclr" (a stage in front) is built in
#: lever_overrides.
LEVERS: dict[str, list[str]] = {
    "balance-exclude": ["data.balance={method: source_label, partial_sources: exclude}"],
    "balance-weight": ["data.balance={method: source_label, partial_sources: weight, partial_share: 0.1}"],
    "acquisition": ["data.augment=acquisition"],
    "spectral": ["stages.*.loss.spectral_decoupling=0.01"],
    "adversary": ["stages.0.adversary={weight: 1.0, mode: confusion}"],
    "simclr": [],
}


def preprocessed(manifest: Path) -> Path:
    """The shared manifest's chest X-rays through ``lungcrop`` with the U-Net (cached)."""
    import lungscreen.lungs  # noqa: F401  (registers the segment_lungs step)
    from lungscreen.data.manifest import load_manifest
    from lungscreen.preprocessing import get_pipeline, preprocess_manifest

    frame = load_manifest(manifest)
    frame = frame[frame["modality"] == "CXR"]
    pipeline = get_pipeline("lungcrop", {"segment_lungs.method": "unet"})
    return preprocess_manifest(frame, pipeline, CACHE / "preprocessed").manifest_path


def lever_overrides(levers: list[str], size: int, epochs: int, seed: int, threads: int | None = None) -> list[str]:
    """The study recipe (the baseline at the study budget) with ``levers`` put in: a SimCLR stage goes first,
    ``data.*`` changes apply to the whole recipe, the others to the (last) supervised stage."""
    common = [f"seed={seed}", "gate.enabled=false", *BASELINE, *([f"threads={threads}"] if threads else [])]
    budget = [f"stages.0.image_size={size}", f"stages.0.epochs={epochs}"]
    changes = [item for lever in levers for item in LEVERS[lever]]
    if "simclr" not in levers:
        return [*common, *budget, *changes]
    from lungscreen.training.config import load_config, to_raw

    fine_tune = to_raw(load_config(RECIPE, [*common, *budget, *changes]))["stages"][0]
    simclr = {"name": "simclr", "objective": "simclr", "image_size": size, "epochs": SIMCLR_EPOCHS, "train": "all",
              "optimizer": {"name": "adamw", "lr": 1.0e-3, "weight_decay": 1.0e-4}, "schedule": {"name": "one_cycle"},
              "loss": {}, "data": {"balance": {"method": "none"}}}
    return [*common, *(c for c in changes if c.startswith("data.")), f"stages={json.dumps([simclr, fine_tune])}"]


def levers_of(row: str) -> list[str]:
    """A row's levers: its name split at '+' (``acquisition+simclr``), 'baseline' for none."""
    levers = [] if row == "baseline" else row.split("+")
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown:
        raise SystemExit(f"unknown lever(s) {', '.join(unknown)}: rows are 'baseline', 'combined' or levers "
                         f"joined by '+' ({', '.join(LEVERS)})")
    return levers


def internal(manifest: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    """The recipe on its own task on every source, tested on held-out patients, and its audit."""
    from lungscreen.training.config import load_config, to_raw

    raw = to_raw(load_config(RECIPE, [*overrides, f"data.manifest={manifest}"]))
    folder, seconds = run(f"internal-{name}", raw, CACHE)
    summary = json.loads((folder / "summary.json").read_text())
    return {**tested(folder, summary, INTERNAL_FIGURES), "seconds": seconds, "learned": summary.get("learned"),
            "audit": audited(folder, manifest, split="test")}


def tested(folder: Path, summary: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A run's test step as the study reports it: ``keys`` of its figures, its image count and operating point."""
    figures = summary["test"]["figures"]
    return {"run": shown(folder), "test_images": summary["test"]["images"],
            "figures": {key: figures[key] for key in keys if key in figures},
            "operating_point": summary.get("operating_point")}


def full_budget(run: Path, manifest: Path) -> dict[str, Any]:
    """The chosen recipe's full-budget run (``benchmarks/train.py``): its internal test figures and its audit
    (cached: the audit costs minutes)."""
    cached = CACHE / "full-budget" / f"{run.name}.json"
    if not cached.exists():
        summary = json.loads((run / "summary.json").read_text())
        entry = {**tested(run, summary, (*INTERNAL_FIGURES, "macro_auc")), "audit": audited(run, manifest, split="test")}
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(entry, indent=2, default=float))
    return json.loads(cached.read_text())


def audited(run: Path, manifest: Path, *, split: str, sources: list[str] | None = None) -> dict[str, Any]:
    """The bias audit of ``run`` on ``split`` (of ``sources``): probe per class, masking, verdict."""
    from lungscreen.audit.bias import audit
    from lungscreen.audit.evaluate import evaluation_rows
    from lungscreen.data.manifest import load_manifest
    from lungscreen.inference.predict import Predictor

    predictor = Predictor(run)
    frame = load_manifest(manifest)
    if sources is not None:
        frame = frame[frame["source"].isin(sources)]
    result = audit(predictor, evaluation_rows(predictor, frame, split), max_images=300, seed=0)
    probe = {entry["label"]: {"accuracy": entry["accuracy"], "chance": entry["chance"]}
             for entry in result.probe if entry.get("testable")}
    return {"verdict": "shortcut suspected" if result.flagged else "no shortcut found", "source_probe": probe,
            "masking": result.masking, "warnings": result.warnings}


def left_out(manifest: Path, name: str, overrides: list[str], held_out: list[str], *,
             audit: bool = True) -> dict[str, Any]:
    """Binary COVID-19 against the rest, each of ``held_out`` left out of training in turn (each run audited
    on its training sources' test splits unless ``audit`` is False)."""
    from lungscreen.audit.cross import cross_dataset

    folder = CACHE / f"cross-{name}"
    result = cross_dataset(RECIPE, manifest, folder, held_out=held_out, overrides=[*overrides, "data.task=binary"],
                           quiet=True)
    cells = {cell["left_out"]: cell for cell in result.cells if not cell["same_source"]}
    out: dict[str, Any] = {"sources": {}}
    for source, cell in cells.items():
        run = Path(result.runs[source])
        training = sorted({c["tested"] for c in result.cells if c["left_out"] == source and c["same_source"]})
        out["sources"][source] = {"run": shown(run), "images": cell["images"], "patients": cell["patients"],
                                  "single_class": cell["single_class"], "figures": cell["figures"]}
        if audit:
            out["sources"][source]["audit"] = audited(run, manifest, split="test", sources=training)
    return with_mean(out["sources"])


def with_mean(sources: dict[str, Any]) -> dict[str, Any]:
    """The left-out sources' entries and the rule's figure: their mean balanced accuracy over RANKED."""
    ranked = [sources[s]["figures"]["balanced_accuracy"]["value"] for s in RANKED if s in sources]
    return {"sources": sources,
            "mean_left_out_balanced_accuracy": float(np.mean(ranked)) if len(ranked) == len(RANKED) else None}


def adabn(manifest: Path, cross: dict[str, Any], name: str) -> dict[str, Any]:
    """AdaBN on each ranked left-out source, unadapted ("none"), at the source's own case mix and at the set
    prevalences, scored on up to ADABN_IMAGES of the source's images (a class-stratified sample).

    The BatchNorm statistics are re-estimated as ``lungscreen adapt`` does (``adapt_batchnorm``); each
    image goes through the run's pipeline once and every adapted copy scores the same samples, since the
    lung U-Net, not the classifier, is what costs minutes here. Unlike ``adapt``, the copies keep the run's
    intensity reference (the study runs have no OOD gate, so it changes no figure)."""
    from lungscreen.audit.cross import left_out_rows
    from lungscreen.data.manifest import for_task, load_manifest
    from lungscreen.errors import LungscreenError
    from lungscreen.evaluation.tables import figures_of
    from lungscreen.inference.adapt import adapt_batchnorm
    from lungscreen.inference.predict import Predictor
    from lungscreen.inference.scoring import original_images, score_rows, scored
    from lungscreen.io.images import read_image

    rows = for_task(load_manifest(manifest), "binary")
    out = {}
    for source in RANKED:
        run = ROOT / cross["sources"][source]["run"]
        tested = original_images(left_out_rows(rows, source)).reset_index(drop=True)
        if len(tested) > ADABN_IMAGES:
            tested = tested.groupby("target_name", group_keys=False).sample(frac=ADABN_IMAGES / len(tested),
                                                                           random_state=0).reset_index(drop=True)
        base = Predictor(run)
        prepared = {}
        for path in tested["image_path"].astype(str):
            try:
                prepared[path] = base.prepare(read_image(path).pixels)
            except LungscreenError:
                continue
        positives, negatives = tested[tested["target_name"] == "COVID-19"], tested[tested["target_name"] != "COVID-19"]
        mixes: dict[str, pd.DataFrame | None] = {"none": None, "own": tested}
        for prevalence in PREVALENCES:  # the adaptation set at this COVID-19 share, as large as the sample allows
            size = int(min(len(positives) / prevalence, len(negatives) / (1 - prevalence)))
            mixes[f"{prevalence:.1f}"] = pd.concat([positives.sample(round(size * prevalence), random_state=0),
                                                     negatives.sample(size - round(size * prevalence), random_state=0)])
        entry = {}
        for mix, frame in mixes.items():
            predictor = Predictor(run)
            if frame is not None:
                adapt_batchnorm(predictor, [prepared[p] for p in frame["image_path"].astype(str) if p in prepared])
            table = scored(score_rows(predictor, tested, prepared=prepared))
            figures = figures_of(table, ["non-COVID", "COVID-19"], n_resamples=1000)
            entry[mix] = {"adaptation_images": 0 if frame is None else len(frame),
                          "covid_share": None if frame is None else
                          round(float((frame["target_name"] == "COVID-19").mean()), 3),
                          **{key: figures[key if key == "balanced_accuracy" else f"{key}/COVID-19"].as_dict()
                             for key in ("balanced_accuracy", "auc", "sensitivity", "specificity")}}
        out[source] = {"scored_images": len(tested), "mixes": entry}
    return out


def winner(results: dict[str, Any]) -> dict[str, Any]:
    """The rule of the module docstring, over the rows with a left-out figure."""
    ranking = []
    for row, entry in results["rows"].items():
        values = [seed["left_out"]["mean_left_out_balanced_accuracy"] for seed in entry["seeds"].values()
                  if seed.get("left_out", {}).get("mean_left_out_balanced_accuracy") is not None]
        if values:
            ranking.append({"row": row, "levers": len(entry["levers"]),
                            "mean_left_out_balanced_accuracy": float(np.mean(values)),
                            "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None, "seeds": len(values)})
    ranking.sort(key=lambda item: -item["mean_left_out_balanced_accuracy"])
    chosen = chosen_row(ranking)
    return {"rule": RULE, "ranking": ranking, "chosen": chosen,
            "goal_0.80_on_every_left_out_source": goal_met(results, chosen) if chosen else None}


def chosen_row(ranking: list[dict[str, Any]]) -> str | None:
    """The best mean; rows within a seed spread of it (both with several seeds) are a tie, which the row with
    the fewest levers wins."""
    if not ranking:
        return None
    top = ranking[0]

    def tied(item: dict[str, Any]) -> bool:
        spreads = [entry["sd"] for entry in (top, item) if entry["sd"] is not None]
        return item is top or (len(spreads) == 2 and top["mean_left_out_balanced_accuracy"]
                                - item["mean_left_out_balanced_accuracy"] < max(spreads))

    return min((item for item in ranking if tied(item)), key=lambda item: item["levers"])["row"]


def goal_met(results: dict[str, Any], row: str) -> bool:
    seeds = results["rows"][row]["seeds"].values()
    return all(seed["left_out"]["sources"][s]["figures"]["balanced_accuracy"]["value"] >= 0.80
               for seed in seeds if "left_out" in seed for s in RANKED)


def measure(results: dict[str, Any], manifest: Path, row: str, levers: list[str], seed: int, args: argparse.Namespace,
            held_out: list[str]) -> None:
    name = f"{row}-s{seed}"
    overrides = lever_overrides(levers, args.size, args.epochs, seed, args.threads)
    entry = results["rows"].setdefault(row, {"levers": levers, "overrides": overrides, "seeds": {}})
    entry["overrides"] = lever_overrides(levers, args.size, args.epochs, 0)
    measured = entry["seeds"].setdefault(str(seed), {})
    print(f"== {name}", flush=True)
    started = time.perf_counter()
    if "internal" not in measured and args.internal:
        measured["internal"] = internal(manifest, name, overrides)
        save(results)
    done = measured.get("left_out", {}).get("sources", {})
    missing = [source for source in held_out if source not in done]
    if missing:  # only the sources not left out yet: the others' runs and cells stand
        added = left_out(manifest, name, overrides, missing, audit=args.left_out_audits)
        measured["left_out"] = with_mean({**done, **added["sources"]})
        save(results)
    measured.setdefault("seconds", round(time.perf_counter() - started, 1))
    results["winner"] = winner(results)
    save(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=HERE / "cache" / "shared-manifest.parquet")
    parser.add_argument("--rows", default=",".join(["baseline", *LEVERS]),
                        help="rows to run: 'baseline', a lever, levers joined by '+', or 'combined'")
    parser.add_argument("--seeds", default="0", help="seeds for the rows run (the baseline and chosen rows: 0,1,2)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the recipe's)")
    parser.add_argument("--no-internal", dest="internal", action="store_false",
                        help="run the left-out sources only (the rule's figure), no internal run and audit")
    parser.add_argument("--no-left-out-audits", dest="left_out_audits", action="store_false",
                        help="audit only the internal run of each row (the left-out runs' audits cost minutes each)")
    parser.add_argument("--full", action="store_true", help="also leave NIH's negatives (a specificity-only row) "
                        "and Figure 1 (too small to rank on) out; the baseline and the chosen rows")
    parser.add_argument("--adabn", action="store_true", help="AdaBN on the left-out sources of the rows run")
    parser.add_argument("--full-budget", type=Path, default=None, metavar="RUN",
                        help="record the chosen recipe's full-budget run (benchmarks/train.py): test figures, audit")
    args = parser.parse_args()
    if (HERE / "cache" / "lung_unet.pt").exists():  # the U-Net shipped with the package, trained here
        os.environ.setdefault("LUNGSCREEN_LUNG_MODEL", str(HERE / "cache" / "lung_unet.pt"))
    results = json.loads(TARGET.read_text()) if TARGET.exists() else {}
    if "rows" not in results:  # the preprocessing-pipeline study of the earlier sessions is kept apart
        results = {"pipeline_study": {**results, "manifest": "benchmarks/cache/shared-manifest.parquet"}} \
            if results else {}
    results.update({"recipe": RECIPE, "study_budget": {"size": args.size, "epochs": args.epochs},
                    "manifest": shown(args.manifest), "machine": {"cpus": os.cpu_count()}})
    results.setdefault("rows", {})
    manifest = preprocessed(args.manifest.resolve())
    held_out = [*RANKED, *([NEGATIVES_ONLY, SMALL] if args.full else [])]
    if args.full_budget:
        results["full_budget"] = full_budget(args.full_budget.resolve(), manifest)
        save(results)
    for row in filter(None, args.rows.split(",")):
        levers = combined_levers(results) if row == "combined" else levers_of(row)
        row = "+".join(levers) or "baseline"
        for seed in (int(s) for s in args.seeds.split(",")):
            measure(results, manifest, row, levers, seed, args, held_out)
            if args.adabn:
                entry = results["rows"][row]["seeds"][str(seed)]
                entry["adabn"] = adabn(manifest, entry["left_out"], f"{row}-s{seed}")
                save(results)
    print(json.dumps(results.get("winner"), indent=2))


def combined_levers(results: dict[str, Any]) -> list[str]:
    """The single levers whose row beat the baseline on the rule."""
    ranking = {item["row"]: item["mean_left_out_balanced_accuracy"] for item in winner(results)["ranking"]}
    baseline = ranking.get("baseline")
    levers = [row for row, value in ranking.items() if row in LEVERS and baseline is not None and value > baseline]
    if "balance-exclude" in levers and "balance-weight" in levers:  # one balancing at a time: the better one
        levers.remove(min(("balance-exclude", "balance-weight"), key=lambda r: ranking[r]))
    if not levers:
        raise SystemExit("no lever beat the baseline: nothing to combine")
    return sorted(levers)


def save(results: dict[str, Any]) -> None:
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
