"""Benchmark lung segmentation: Dice per source on held-out patients, and segmentation throughput.

* **Training** (``--train``): the shipped recipe ``configs/lung-unet-cpu.yaml`` through the training engine
  (``lungscreen lungs train``), its wall time and best validation Dice; without ``--train`` the model at
  ``--model`` is measured.

* **Dice / IoU** per (source, mask convention) on the test split of the shared mask sets (held-out
  patients), with patient-bootstrap 95 % intervals, for the trained U-Net and for the classical fallback
  on the same images (``lungscreen.lungs.evaluate``).
* **Throughput** in images per second on the CPU (``--threads`` torch threads), 256 px:
  ``segmentation``: images already decoded and at 256 x 256 in memory; the timed part is what the
  segmenter does per image (equalization, U-Net forward in batches of ``--batch``, threshold, two largest
  regions, hole filling). ``from_files``: reading each test image from disk, segmenting it and bringing
  the mask back to the image's size. Both are medians over ``--repeats`` passes.

The manifest defaults to one built from ``../shared/data`` into ``benchmarks/cache/`` (``lungscreen data
build``), the model to the default lung model path. Gently, on a shared machine::

    nice -n 10 .venv/bin/python benchmarks/lungs.py --train --model /tmp/lung_unet.pt --threads 2

Writes ``benchmarks/results/lungs.json`` with the load average before and after (other jobs on the
cores inflate the times).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from cached_runs import shown

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"


def shared_manifest() -> Path:
    """The shared data's manifest, built once into benchmarks/cache/."""
    from lungscreen.data.build import build_manifest
    from lungscreen.data.manifest import save_manifest

    target = HERE / "cache" / "shared-manifest.parquet"
    if not target.exists():
        if not (SHARED / "README.md").is_file():
            raise SystemExit(f"no manifest given and no shared data at {SHARED}")
        save_manifest(build_manifest([SHARED], seed=0, workers=2).manifest, target)
    return target


def throughput(segment, images: list[np.ndarray], repeats: int) -> dict[str, float]:
    """Median images/s of ``segment(images)`` over ``repeats`` passes (after one warm-up pass)."""
    segment(images[: min(len(images), 16)])
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        segment(images)
        rates.append(len(images) / (time.perf_counter() - start))
    return {"images_per_second": statistics.median(rates), "min": min(rates), "max": max(rates),
            "images": len(images), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=None, help="manifest with lung-mask rows and splits")
    parser.add_argument("--model", type=Path, default=None, help="lung model checkpoint (default: the default path)")
    parser.add_argument("--train", action="store_true", help="train the model (recipe lung-unet-cpu) into --model first")
    parser.add_argument("--run-dir", type=Path, default=HERE / "cache" / "lung-unet-run", help="run folder of --train")
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lungs.json")
    args = parser.parse_args()

    import torch

    from lungscreen.data.manifest import load_manifest
    from lungscreen.io.files import atomic_path
    from lungscreen.io.images import read_image
    from lungscreen.lungs.evaluate import evaluate_segmenter, evaluation_rows
    from lungscreen.lungs.segmenter import (
        ClassicalSegmenter,
        UNetSegmenter,
        default_model_path,
    )
    from lungscreen.preprocessing.transforms import resize_image

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model_path = args.model or default_model_path()
    manifest = args.manifest or shared_manifest()
    training = None
    if args.train:
        from lungscreen.cli.lungs import train_lung_model

        started = time.perf_counter()
        best = train_lung_model(manifest, model_path, run_dir=args.run_dir, overrides=[f"threads={args.threads}"])
        training = {"recipe": "lung-unet-cpu", "wall_seconds": round(time.perf_counter() - started, 1),
                    "best": {**best, "installed": shown(best["installed"])} if "installed" in best else best,
                    "run": shown(args.run_dir)}
        print(f"trained in {training['wall_seconds']:.0f} s: validation Dice {best['value']:.4f}")
    rows = evaluation_rows(load_manifest(manifest), args.split)
    unet = UNetSegmenter.from_checkpoint(model_path)
    unet.batch_size = args.batch
    classical = ClassicalSegmenter()

    quality = {}
    for segmenter in (unet, classical):
        report = evaluate_segmenter(segmenter, rows, n_resamples=args.resamples, progress=False, split=args.split)
        quality[segmenter.method] = report.as_dict()
        print(f"{segmenter.method}: Dice {report.overall['dice']} (mean of sources {report.macro_dice:.3f})")
        for group in report.groups:
            print(f"  {group.source:<22} {group.convention:<22} n={group.images:<4} Dice {group.dice}  IoU {group.iou}")

    paths = rows["image_path"].tolist()
    originals = [read_image(path).pixels for path in paths]
    at_256 = [resize_image(image, 256, 256) for image in originals]
    speed = {
        "unet_segmentation": throughput(unet.segment_batch, at_256, args.repeats),
        "unet_from_files": throughput(lambda chosen: unet.segment_batch([read_image(p).pixels for p in chosen]),
                                      paths, max(1, args.repeats - 1)),
        "classical_segmentation": throughput(classical.segment_batch, at_256, 1),
    }
    for name, figures in speed.items():
        print(f"{name}: {figures['images_per_second']:.1f} images/s")

    if training is None:
        training = _earlier_training(args.out, unet.weights_sha256)
    result = {
        "benchmark": "lungs",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": args.threads, "platform": platform.platform(),
                    "torch": torch.__version__, "load_average_before": load_before,
                    "load_average_after": os.getloadavg()},
        "manifest": shown(manifest),
        "model": {"path": shown(model_path), "sha256": unet.weights_sha256, "input_size": unet.input_size,
                  "kwargs": unet.checkpoint.meta.get("kwargs"), "spec": unet.spec.model_dump(mode="json"),
                  "best": unet.checkpoint.meta.get("extra", {}).get("best")},
        "training": training,
        "split": args.split,
        "dice": quality,
        "throughput": {**speed, "input_size": 256, "batch": args.batch},
    }
    with atomic_path(args.out) as temporary:
        temporary.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def _earlier_training(out: Path, sha256: str) -> dict | None:
    """The training record of an earlier result for the same weights, so re-measuring speed keeps it."""
    try:
        earlier = json.loads(out.read_text())
    except (OSError, ValueError):
        return None
    return earlier.get("training") if earlier.get("model", {}).get("sha256") == sha256 else None


if __name__ == "__main__":
    main()
