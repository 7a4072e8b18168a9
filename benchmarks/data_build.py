"""Benchmark: build a manifest over 100,000 synthetic images; report rows/s and peak memory.

The phantoms are written once into benchmarks/cache/ (git-ignored) and reused; only the build is timed.

    python benchmarks/data_build.py [--rows 100000] [--workers 2]

Writes benchmarks/results/data_build.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

from lungscreen.data.build import build_manifest
from lungscreen.data.manifest import save_manifest
from lungscreen.data.synth import synthesize
from lungscreen.io.files import atomic_path

HERE = Path(__file__).resolve().parent


def peak_megabytes(who: int) -> float:
    """Peak resident memory (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(who).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=256, help="phantom side in pixels")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    cache = HERE / "cache" / f"synth-{args.rows}-{args.size}"
    start = time.perf_counter()
    synthesize(cache, n=args.rows, size=args.size, seed=0, workers=args.workers)
    synth_seconds = time.perf_counter() - start

    start = time.perf_counter()
    result = build_manifest([cache], seed=0, workers=args.workers)
    build_seconds = time.perf_counter() - start
    start = time.perf_counter()
    save_manifest(result.manifest, HERE / "cache" / "manifest-100k")
    save_seconds = time.perf_counter() - start

    rows = len(result.manifest)
    report = {
        "benchmark": "data_build",
        "rows": rows,
        "image_size": args.size,
        "workers": args.workers,
        "build_seconds": round(build_seconds, 2),
        "rows_per_second": round(rows / build_seconds, 1),
        "seconds_per_step": {step: round(value, 2) for step, value in result.seconds.items()},
        "save_seconds": round(save_seconds, 2),
        "peak_memory_mb": {"main_process": round(peak_megabytes(resource.RUSAGE_SELF), 1),
                           "largest_worker": round(peak_megabytes(resource.RUSAGE_CHILDREN), 1)},
        "near_duplicate_pairs": len(result.duplicates),
        "skipped": len(result.skips),
        "phantoms_cached": synth_seconds < 60,
        "synth_seconds": round(synth_seconds, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    target = HERE / "results" / "data_build.json"
    with atomic_path(target) as temporary:
        temporary.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
