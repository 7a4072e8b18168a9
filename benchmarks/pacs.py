"""Screening from a PACS, end to end through a real Orthanc on loopback: instances per second and where the
time goes, for the PyTorch run and its ONNX export, with 1 and 2 worker processes.

The model is the shipped CXR recipe (covid-resnet-cpu: ResNet-18 width 32, 256 px) trained on the shared
manifest with ``--epochs`` epochs and pipeline ``none`` (the pipeline of the run train.json records), cached
in ``benchmarks/cache/pacs/``, and its ONNX export. The PACS is Orthanc with its DICOMweb plugin (Debian's
packages; started from ``tests/servers.py``, authentication on) holding ``--instances`` test-split chest
radiographs of the shared manifest as CR DICOM (16 bit, MONOCHROME2; the shared copies are downscaled to
at most 512 px). For each model and worker count: a fresh state, every instance uploaded again, and one
``lungscreen pacs screen URL --model M --workers W`` command timed from start to exit (process start, model
load and the scan included), which stores a report and an overlay per instance.

* ``instances_per_s``: instances / the command's wall seconds;
* the PyTorch run with 1 worker twice: the default threads (the 2 cores) and ``--threads 1``,
  because on a machine other work keeps busy two threads spin against each other (measured: 6x slower
  per image here); worker processes take cores / workers threads each;
* ``load_average_1min``: the machine's load before and after the command (this machine is shared);
* ``shares``: the workers' own time per phase (their ``time:`` lines): ``retrieval`` (WADO-RS and decoding),
  ``inference`` and ``grad_cam`` (the screening, split by the share Grad-CAM takes of ``screen_image`` on
  20 of the same images in this process, explained vs not), ``storage`` (making the SR and the Secondary
  Capture, and STOW-RS) and ``check`` (QIDO-RS for results stored before).

    nice .venv/bin/python benchmarks/pacs.py [--manifest M] [--instances 100] [--epochs 3]

Writes ``benchmarks/results/pacs.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cached_runs import REPOSITORY, run, shown

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "pacs"
TARGET = HERE / "results" / "pacs.json"
KEPT_FIGURES = ("accuracy", "macro_auc", "sensitivity/COVID-19", "specificity/COVID-19")
sys.path.insert(0, str(REPOSITORY / "tests"))  # the real-server fixtures and the DICOM maker the tests use


def recipe(manifest: Path, epochs: int) -> dict[str, Any]:
    from lungscreen.training.config import load_config, to_raw

    raw = to_raw(load_config("covid-resnet-cpu", [f"data.manifest={manifest}", "data.pipeline=none"]))
    for stage in raw["stages"]:
        stage["epochs"] = epochs
    return raw


def test_radiographs(manifest: Path, count: int) -> list[Path]:
    import pandas as pd

    frame = pd.read_parquet(manifest)
    frame = frame[(frame["split"] == "test") & (frame["modality"] == "CXR") & (frame["view"] != "Lateral")]
    return [Path(p) for p in frame["image_path"].head(count)]


def gradcam_fraction(model: Path, images: list[Path]) -> float:
    """The share of ``screen_image``'s time that Grad-CAM takes, on these images in this process, with one
    torch thread (as a worker of the fastest rows has), each image screened with and without it in turn (so
    the load other work puts on the machine falls on both alike)."""
    import torch

    from lungscreen.audit.explain import lung_segmenter
    from lungscreen.audit.screening import screen_image
    from lungscreen.inference.predict import Predictor
    from lungscreen.io.images import read_image

    predictor = Predictor(model)
    segmenter = lung_segmenter(predictor)
    decoded = [read_image(path) for path in images]
    torch.set_num_threads(1)
    screen_image(predictor, decoded[0], segmenter=segmenter)  # warm-up
    seconds = {True: 0.0, False: 0.0}
    for image in decoded:
        for explain in (True, False):
            started = time.perf_counter()
            screen_image(predictor, image, segmenter=segmenter, explain=explain)
            seconds[explain] += time.perf_counter() - started
    return max(0.0, 1.0 - seconds[False] / seconds[True])


def measure(server: Any, model: Path, made: list[Any], workers: int, folder: Path, grad_cam: float,
            threads: int | None = None) -> dict[str, Any]:
    """One ``pacs screen`` command on a freshly filled PACS; ``threads``: its ``--threads`` (torch's threads per
    worker; by default cores / workers)."""
    server.wipe()
    for item in made:
        server.upload(item.data)
    state = folder / f"state-{model.name}-{workers}-{threads}.db"
    env = {**os.environ, "LUNGSCREEN_PACS_USER": server.auth[0], "LUNGSCREEN_PACS_PASSWORD": server.auth[1]}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    command = [sys.executable, "-m", "lungscreen", "pacs", "screen", server.dicomweb, "--model", str(model),
               "--state", str(state), "--workers", str(workers), *(["--threads", str(threads)] if threads else [])]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"pacs screen failed ({done.returncode}):\n{done.stderr[-3000:]}")
    phases: dict[str, float] = {}
    for line in done.stderr.splitlines():
        if "time:" in line:
            for phase, seconds in re.findall(r"(\w+) ([0-9.]+) s", line.split("time:", 1)[1]):
                phases[phase] = phases.get(phase, 0.0) + float(seconds)
    screened = sum(1 for line in done.stderr.splitlines() if line.startswith("done "))
    busy = sum(phases.values()) or 1.0
    share = {"retrieval": phases.get("retrieve", 0.0) / busy,
             "inference": phases.get("screen", 0.0) * (1 - grad_cam) / busy,
             "grad_cam": phases.get("screen", 0.0) * grad_cam / busy,
             "storage": (phases.get("document", 0.0) + phases.get("store", 0.0)) / busy,
             "check": phases.get("check", 0.0) / busy}
    torch_threads = threads or max(1, (os.cpu_count() or 1) // workers)
    return {"workers": workers, "torch_threads_per_worker": torch_threads, "instances": len(made),
            "screened": screened, "wall_s": round(wall, 2), "load_average_1min": [round(load_before, 2),
                                                                                  round(os.getloadavg()[0], 2)],
            "instances_per_s": round(len(made) / wall, 3),
            "worker_seconds": {k: round(v, 2) for k, v in phases.items()},
            "shares": {k: round(v, 3) for k, v in share.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=HERE / "cache" / "shared-manifest.parquet")
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    from lungscreen.inference.export import export_run
    from pacs_fixtures import dicom_from, gray
    from servers import Orthanc, orthanc_missing

    if reason := orthanc_missing():
        raise SystemExit(reason)
    folder, train_seconds = run(f"covid-resnet-cpu-{args.epochs}ep", recipe(args.manifest, args.epochs), CACHE)
    onnx = CACHE / f"covid-resnet-cpu-{args.epochs}ep.onnx"
    if not onnx.exists():
        export_run(folder, onnx)
    images = test_radiographs(args.manifest, args.instances)
    made = [dicom_from(gray(path), modality="CR", bits=16, number=i + 1) for i, path in enumerate(images)]
    fractions = {"pytorch": gradcam_fraction(folder, images[:20]), "onnx": 0.0}
    rows = []
    with tempfile.TemporaryDirectory(prefix="lungscreen-pacs-bench-") as temporary:
        server = Orthanc(Path(temporary) / "orthanc").start()
        try:
            for name, model, workers, threads in (("pytorch", folder, 1, None), ("pytorch", folder, 1, 1),
                                                  ("pytorch", folder, 2, None), ("onnx", onnx, 1, None),
                                                  ("onnx", onnx, 2, None)):
                row = {"model": name, **measure(server, model, made, workers, Path(temporary), fractions[name],
                                                threads)}
                if name == "onnx":  # onnxruntime takes its own threads: every core, in each worker
                    row["onnxruntime_threads_per_worker"] = os.cpu_count()
                    del row["torch_threads_per_worker"]
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            server.stop()
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {}
    result = {
        "command": f"nice .venv/bin/python benchmarks/pacs.py --instances {args.instances} --epochs {args.epochs}",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_at_end": os.getloadavg()},
        "model": {"run": shown(folder), "onnx": shown(onnx), "recipe": "covid-resnet-cpu", "pipeline": "none",
                  "epochs": args.epochs, "train_seconds": train_seconds, "reused_from_cache": train_seconds is None,
                  "test": {"images": (summary.get("test") or {}).get("images"),
                           "figures": {k: v for k, v in ((summary.get("test") or {}).get("figures") or {}).items()
                                       if k in KEPT_FIGURES}},
                  "note": "a short training of the shipped recipe on the shared manifest, for timing: its accuracy "
                          "is not the point"},
        "pacs": "Orthanc 1.10 + DICOMweb plugin (Debian 12), loopback, authentication on",
        "instances": {"count": len(made), "kind": "test-split chest radiographs of the shared manifest as CR DICOM, "
                      "16 bit, at the shared copies' size (at most 512 px)"},
        "grad_cam_share_of_screening": {k: round(v, 3) for k, v in fractions.items()},
        "rows": rows,
    }
    TARGET.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {TARGET.relative_to(REPOSITORY)}")


if __name__ == "__main__":
    main()
