"""Fast CPU inference: eager fp32 against the fast path, per model, side by side in one run.

Models (each trained here into ``benchmarks/cache/predict/`` unless given, reused when finished):

* **resnet50**: paper 000's ResNet-50 (1 channel, MLP head) at 224 px, trained briefly on the shared CXR
  pool (the covid-resnet-cpu recipe with the model swapped and 2 epochs: weights that give real, non-uniform
  answers, so agreement means something; its accuracy is not the point);
* **covid-resnet-cpu**: the shipped CXR recipe's model and pipeline (ResNet-18 width 32, 256 px, lungcrop:
  the lung U-Net, then the crop), trained with ``--cxr-epochs`` (default 10 of the recipe's 30, to fit the
  session; ``benchmarks/results/train.json`` holds the full run's accuracy);
* **light-ct-cpu**: paper 002's light CT CNN (squeezenet_ct, 160 px), its full recipe on UCSD COVID-CT.

For each, on its test split prepared once through the run's own input path:

* model-only ms per image (batches of 32, median of ``--repeats`` passes after a warm-up) for eager fp32,
  channels-last + bf16 autocast, ``torch.compile``, onnxruntime fp32 (all graph optimisations, 2 threads) and
  onnxruntime int8 (static QDQ, per-channel weights, calibrated on 128 validation images);
* against eager fp32: the largest probability difference, the share of unchanged predictions (most
  probable class), and test accuracy with its 95 % patient-bootstrap interval per variant;
* the **fast path** kept per model: the fastest variant whose predictions agree with eager fp32 on >= 99 %
  of the VALIDATION images (chosen there, reported on test).

End to end for the CXR model: images/s from PNG/JPEG files to probabilities (decode, U-Net, crop,
classifier) through ``predict_paths``, the PyTorch run against its ONNX export (fp32 and int8 classifier).

    nice .venv/bin/python benchmarks/predict.py [--manifest M] [--only resnet50,covid-resnet-cpu,light-ct-cpu]

Writes ``benchmarks/results/predict.json`` (updated after every model).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cached_runs import run, shown

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "predict"
TARGET = HERE / "results" / "predict.json"
MODELS = ("resnet50", "covid-resnet-cpu", "light-ct-cpu")
BATCH = 32
AGREEMENT = 0.99


def recipe(name: str, manifest: Path, cxr_epochs: int) -> dict[str, Any]:
    """The run each benchmarked model comes from, as plain recipe data."""
    from lungscreen.training.config import load_config, to_raw

    if name == "resnet50":
        raw = to_raw(load_config("covid-resnet-cpu", [f"data.manifest={manifest}"]))
        raw.update(name="resnet50-brief", model={"name": "resnet50", "options": {}})
        raw["data"]["pipeline"] = "none"
        raw["stages"] = [{**raw["stages"][0], "name": "all-224", "image_size": 224, "epochs": 2}]
        return raw
    raw = to_raw(load_config(name, [f"data.manifest={manifest}"]))
    if name == "covid-resnet-cpu":
        raw["stages"] = [{**raw["stages"][0], "epochs": cxr_epochs}]
    return raw


def prepared(predictor, manifest: Path, split: str, limit: int | None = None) -> dict[str, np.ndarray]:
    """A split's images through the run's input path: inputs (N, C, S, S) float32, targets, patients, paths."""
    from lungscreen.audit.evaluate import evaluation_rows
    from lungscreen.data.manifest import load_manifest
    from lungscreen.inference.predict import load_file
    from lungscreen.preprocessing.model_input import to_array

    rows = evaluation_rows(predictor, load_manifest(manifest), split)
    if limit:
        rows = rows.sample(n=min(limit, len(rows)), random_state=0).reset_index(drop=True)
    listed = len(rows)
    loaded = [load_file(predictor, Path(path))[0] for path in rows["image_path"]]
    keep = [index for index, item in enumerate(loaded) if not item.error]  # refused images: counted below
    pictures = [loaded[index].sample.image for index in keep]
    rows = rows.iloc[keep].reset_index(drop=True)
    return {"inputs": to_array(pictures, predictor.spec.input), "targets": rows["target"].to_numpy(),
            "patients": rows["patient_id"].astype(str).to_numpy(), "paths": rows["image_path"].to_numpy(),
            "refused": listed - len(keep)}


def variants(checkpoint, folder: Path, calibration: np.ndarray) -> dict[str, Any]:
    """name -> a function (N, C, S, S) float32 -> logits (N, classes) float32, and the seconds it took to build."""
    from lungscreen.models.onnx import OnnxModel, export_checkpoint, quantize_int8

    model = checkpoint.model.eval()
    head = checkpoint.spec.head().name
    out: dict[str, Any] = {}

    def eager(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).float().numpy()

    out["eager-fp32"] = (eager, 0.0)
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def bf16(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return fast(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)).float().numpy()

    out["channels-last-bf16"] = (bf16, 0.0)
    try:
        start = time.perf_counter()
        compiled = torch.compile(copy.deepcopy(model).to(memory_format=torch.channels_last))

        def compiled_fp32(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return compiled(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)).float().numpy()

        compiled_fp32(calibration[:BATCH])  # compiles
        out["torch-compile"] = (compiled_fp32, time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001 - reported, not fatal
        out["torch-compile"] = (None, f"failed: {type(error).__name__}: {str(error)[:200]}")
    onnx_path = folder / "model.onnx"
    start = time.perf_counter()
    export_checkpoint(checkpoint, onnx_path)
    ort = OnnxModel(onnx_path, threads=2)
    out["onnxruntime-fp32"] = (lambda batch: ort(batch)[head], time.perf_counter() - start)
    start = time.perf_counter()
    quantize_int8(onnx_path, folder / "model.int8.onnx",
                  (calibration[i:i + 16] for i in range(0, len(calibration), 16)))
    int8 = OnnxModel(folder / "model.int8.onnx", threads=2)
    out["onnxruntime-int8"] = (lambda batch: int8(batch)[head], time.perf_counter() - start)
    return out


def in_batches(forward, inputs: np.ndarray) -> np.ndarray:
    return np.concatenate([forward(inputs[i:i + BATCH]) for i in range(0, len(inputs), BATCH)])


def ms_per_image(forward, inputs: np.ndarray, repeats: int) -> dict[str, float]:
    """Median model-only milliseconds per image over ``repeats`` passes of ``inputs`` (after one warm-up)."""
    forward(inputs[:BATCH])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        in_batches(forward, inputs)
        times.append((time.perf_counter() - start) * 1000 / len(inputs))
    return {"ms_per_image": round(statistics.median(times), 3), "min": round(min(times), 3),
            "max": round(max(times), 3), "images": len(inputs), "repeats": repeats}


def accuracy(probabilities: np.ndarray, data: dict[str, np.ndarray]) -> dict[str, float]:
    from lungscreen.evaluation.bootstrap import bootstrap_ci

    correct = (probabilities.argmax(axis=1) == data["targets"]).astype(float)
    estimate = bootstrap_ci(correct, groups=data["patients"], n_resamples=1000)
    return {"value": round(float(correct.mean()), 4), "low": round(estimate.low, 4), "high": round(estimate.high, 4)}


def measure_model(name: str, folder: Path, manifest: Path, repeats: int) -> dict[str, Any]:
    from lungscreen.inference.predict import Predictor

    predictor = Predictor(folder)
    spec = predictor.spec
    test = prepared(predictor, manifest, "test")
    val = prepared(predictor, manifest, "val", limit=400)
    calibration = val["inputs"][:128]  # int8 calibration: validation images (no labels used; never test images)
    built = variants(predictor.checkpoint, folder, calibration)
    reference = {split: spec.probabilities(in_batches(built["eager-fp32"][0], data["inputs"]))
                 for split, data in (("test", test), ("val", val))}
    timing_inputs = test["inputs"][:128]
    out: dict[str, Any] = {"run": shown(folder), "model": predictor.checkpoint.meta["name"],
                           "input": {"size": spec.input.size, "pipeline": spec.input.pipeline["name"]},
                           "test_images": len(test["targets"]), "test_images_refused": test["refused"],
                           "val_images_for_the_choice": len(val["targets"]),
                           "variants": {}}
    for variant, (forward, build) in built.items():
        if forward is None:
            out["variants"][variant] = {"error": build}
            continue
        figures: dict[str, Any] = {"build_seconds": round(build, 1), **ms_per_image(forward, timing_inputs, repeats)}
        for split, data in (("val", val), ("test", test)):
            probabilities = spec.probabilities(in_batches(forward, data["inputs"]))
            same = float((probabilities.argmax(1) == reference[split].argmax(1)).mean())
            figures[split] = {"max_probability_difference": round(float(np.abs(probabilities - reference[split]).max()), 6),
                              "predictions_unchanged": round(same, 4)}
            if split == "test":
                figures[split]["accuracy"] = accuracy(probabilities, data)
        out["variants"][variant] = figures
        print(f"  {name} {variant}: {figures['ms_per_image']} ms/image, test unchanged "
              f"{figures['test']['predictions_unchanged']:.4f}", flush=True)
    eager = out["variants"]["eager-fp32"]["ms_per_image"]
    agreeing = {v: f for v, f in out["variants"].items() if "val" in f and f["val"]["predictions_unchanged"] >= AGREEMENT}
    fastest = min(agreeing, key=lambda v: agreeing[v]["ms_per_image"])
    out["fast_path"] = {"variant": fastest, "chosen_on": f"val (>= {AGREEMENT:.0%} predictions unchanged)",
                        "ms_per_image": agreeing[fastest]["ms_per_image"],
                        "speedup_over_eager_fp32": round(eager / agreeing[fastest]["ms_per_image"], 2),
                        "test": agreeing[fastest]["test"]}
    return out


def end_to_end(folder: Path, manifest: Path, images: int) -> dict[str, Any]:
    """Images/s from files to probabilities through predict_paths: the run, its ONNX export, the int8 export."""
    from lungscreen.audit.evaluate import evaluation_rows
    from lungscreen.data.manifest import load_manifest
    from lungscreen.inference.export import export_run
    from lungscreen.inference.predict import Predictor, predict_paths

    predictor = Predictor(folder)
    rows = evaluation_rows(predictor, load_manifest(manifest), "test")
    paths = list(rows["image_path"].sample(n=min(images, len(rows)), random_state=0))
    calibration = list(evaluation_rows(predictor, load_manifest(manifest), "val")["image_path"].head(128))
    export = export_run(folder, folder / "export" / "covid.onnx", calibration=calibration)
    out: dict[str, Any] = {"images": len(paths), "pipeline": predictor.spec.input.pipeline["name"]}
    for name, model in (("pytorch-eager", folder), ("onnx-fp32", export.model), ("onnx-int8", export.int8)):
        loaded = Predictor(model)
        predict_paths(loaded, paths[:8])  # warm-up: lazy loads (lung model, sessions)
        start = time.perf_counter()
        frame = predict_paths(loaded, paths)
        seconds = time.perf_counter() - start
        out[name] = {"images_per_second": round(len(paths) / seconds, 1), "failed": int((frame["error"] != "").sum())}
        print(f"  end to end {name}: {out[name]['images_per_second']} images/s", flush=True)
    out["target_images_per_second"] = 40
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=HERE / "cache" / "shared-manifest.parquet")
    parser.add_argument("--only", default=",".join(MODELS), help=f"comma-separated of {', '.join(MODELS)}")
    parser.add_argument("--cxr-epochs", type=int, default=10, help="epochs of the covid-resnet-cpu run trained here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--end-to-end-images", type=int, default=300)
    parser.add_argument("--train-only", action="store_true", help="train the runs (on a busy machine), measure later")
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.update({"manifest": shown(args.manifest), "batch": BATCH,
                    "machine": {"cpus": os.cpu_count(), "torch": torch.__version__}})
    results.setdefault("models", {})
    for name in args.only.split(","):
        folder, seconds = run(name, recipe(name, args.manifest.resolve(), args.cxr_epochs), CACHE)
        print(f"{name}: run {folder} ({'trained in %.0f s' % seconds if seconds else 'reused'})", flush=True)
        if args.train_only:
            continue
        results["models"][name] = measure_model(name, folder, args.manifest, args.repeats)
        if name == "covid-resnet-cpu":
            results["models"][name]["end_to_end"] = end_to_end(folder, args.manifest, args.end_to_end_images)
        results["load_average"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2)[:6000])


if __name__ == "__main__":
    main()
