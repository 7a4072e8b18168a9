"""Load on the web viewer: many uploads at once, every one answered, memory that does not creep.

Starts ``lungscreen serve RUN`` on 127.0.0.1 in a subprocess (the model loaded once), then sends
``--requests`` uploads ``--concurrency`` at a time with httpx, each a real radiograph from the shared
manifest's test split (cycled), and writes the errors (target: 0), p50 / p95 / p99 latency, throughput, and
the server's resident memory before and after (bound: it may grow by at most ``--rss-bound-mb``, the
allocator's working set for the concurrent requests, not a leak). Every request gets the full screening:
the run's preprocessing, the lung segmenter, the classifier and a Grad-CAM heat-map.

    nice .venv/bin/python benchmarks/serve_load.py [--run RUN] [--requests 500 --concurrency 16]

Writes ``benchmarks/results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TARGET = HERE / "results" / "serve_load.json"


def shipped_run() -> Path:
    """The shipped CXR recipe's run recorded by benchmarks/train.py."""
    recorded = json.loads((HERE / "results" / "train.json").read_text())["covid-resnet-cpu"]["run"]
    return HERE.parent / recorded


def test_images(manifest: Path, count: int, run: Path) -> tuple[list[Path], list[str]]:
    """The first ``count`` test radiographs the run can take, and the ones it refuses (with why): a refused
    image is answered 422 by design (e.g. no lungs found), which is the input's fault, not the server's, so
    the load is made of images the run scores and the refusals are reported beside it."""
    import pandas as pd

    from lungscreen.inference.predict import Predictor, load_file

    frame = pd.read_parquet(manifest)
    frame = frame[(frame["split"] == "test") & (frame["modality"] == "CXR")]
    predictor = Predictor(run)
    kept, refused = [], []
    for path in frame["image_path"]:
        error = load_file(predictor, Path(path))[0].error
        if error:
            refused.append(f"{Path(path).name}: {error}")
            continue
        kept.append(Path(path))
        if len(kept) == count:
            break
    return kept, refused


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def hammer(url: str, images: list[bytes], requests: int, concurrency: int) -> tuple[list[float], list[str]]:
    """Send ``requests`` uploads, at most ``concurrency`` in flight; latencies (s) and errors."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors: list[str] = []

    async def one(client: httpx.AsyncClient, index: int) -> None:
        async with gate:
            started = time.perf_counter()
            try:
                response = await client.post(url, files={"file": (f"{index}.png", images[index % len(images)], "image/png")})
                if response.status_code != 200 or "probabilities" not in response.json():
                    errors.append(f"{response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as error:
                errors.append(repr(error))
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(one(client, i) for i in range(requests)))
    return latencies, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="run folder (default: the shipped CXR recipe's run)")
    parser.add_argument("--manifest", type=Path, default=HERE / "cache" / "shared-manifest.parquet")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--images", type=int, default=50, help="distinct test images to cycle through")
    parser.add_argument("--rss-bound-mb", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args()
    run = (args.run or shipped_run()).resolve()
    paths, refused = test_images(args.manifest, args.images, run)
    images = [path.read_bytes() for path in paths]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lungscreen", "serve", str(run), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        asyncio.run(hammer(f"{base}/predict", images, 4, 4))  # warm-up: first-call allocations, lazy imports
        before = rss_mb(server.pid)
        load = os.getloadavg()
        started = time.perf_counter()
        latencies, errors = asyncio.run(hammer(f"{base}/predict", images, args.requests, args.concurrency))
        wall = time.perf_counter() - started
        after = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    seconds = np.asarray(latencies)
    result = {
        "benchmark": "serve_load", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_average_before": load,
                    "load_average_after": os.getloadavg()},
        "run": str(run.relative_to(HERE.parent)) if run.is_relative_to(HERE.parent) else str(run),
        "requests": args.requests, "concurrency": args.concurrency, "distinct_images": len(images),
        "refused_before_the_load": refused,
        "errors": len(errors), "first_errors": errors[:5], "wall_seconds": round(wall, 2),
        "throughput_per_second": round(args.requests / wall, 2),
        "latency_seconds": {name: round(float(np.percentile(seconds, q)), 3) for name, q in
                            (("p50", 50), ("p95", 95), ("p99", 99))} | {"max": round(float(seconds.max()), 3)},
        "server_rss_mb": {"before": round(before, 1), "after": round(after, 1), "growth": round(after - before, 1),
                          "bound": args.rss_bound_mb, "within_bound": bool(after - before <= args.rss_bound_mb)},
        "per_request": "full screening: preprocessing, lung segmenter, classifier, Grad-CAM, two PNGs",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
