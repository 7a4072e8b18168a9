"""Benchmark the model zoo on the CPU: size, MACs, latency and throughput in fp32 and bf16.

For every registered model (or those matching ``--models``), at the paper's input size, one input channel
and 3 classes, in eval mode under ``torch.inference_mode``:

- parameters, and MACs counted by :func:`lungscreen.models.complexity` (torch's FlopCounterMode);
- latency: median wall time of a forward pass on a batch of 1;
- throughput: images per second on a batch of 32 (median of the repeats);
- both in fp32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)``, plus the largest absolute
  difference between the two sets of logits (what bf16 costs in precision).

Writes ``benchmarks/results/models.json`` with the machine's load average before and after (other jobs
on the cores inflate the times). Run it on a quiet machine, gently when it is shared::

    nice -n 10 /work/venv/bin/python benchmarks/models.py --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from lungscreen.io.files import write_atomic
from lungscreen.models import complexity, create, list_models, model_info

RESULTS = Path(__file__).resolve().parent / "results" / "models.json"


def timed_runs(run, *, warmup: int, repeats: int, budget_s: float) -> list[float]:
    """Seconds per call of ``run()``: ``warmup`` calls discarded, then ``repeats`` (fewer past the budget)."""
    for _ in range(warmup):
        run()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats and (len(times) < 2 or time.perf_counter() - started < budget_s):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return times


def precision(dtype: str):
    """Context of one precision: nothing for fp32, CPU autocast for bf16."""
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bench_model(name: str, *, repeats: int, budget_s: float) -> dict:
    info = model_info(name)
    side = info.input_size
    cost = complexity(name, num_classes=3, in_channels=1)
    torch.manual_seed(0)
    model = create(name, num_classes=3, in_channels=1).eval()
    single = torch.rand(1, 1, side, side)
    batch = torch.rand(32, 1, side, side)
    row = {"name": name, "paper": info.paper, "input_size": side, "parameters": cost.parameters, "macs": cost.macs}
    logits = {}
    for dtype in ("fp32", "bf16"):
        with torch.inference_mode(), precision(dtype):
            logits[dtype] = model(single).float()
            latency = timed_runs(lambda: model(single), warmup=2, repeats=repeats * 3, budget_s=budget_s)
            batch_times = timed_runs(lambda: model(batch), warmup=1, repeats=repeats, budget_s=budget_s)
        row[dtype] = {
            "latency_ms_batch1": round(1000 * statistics.median(latency), 2),
            "images_per_s_batch32": round(32 / statistics.median(batch_times), 2),
            "runs_batch1": len(latency),
            "runs_batch32": len(batch_times),
        }
    row["bf16_max_abs_logit_difference"] = float((logits["bf16"] - logits["fp32"]).abs().max())
    return row


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="*", help="shell-style pattern of model names (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batch-32 runs per precision (x3 at batch 1)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per timing before cutting repeats")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON to write (default {RESULTS})")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    for name in list_models(args.models):
        started = time.perf_counter()
        row = bench_model(name, repeats=args.repeats, budget_s=args.budget)
        rows.append(row)
        print(f"{name:22s} {row['parameters'] / 1e6:8.2f} M {row['macs'] / 1e9:7.3f} G @{row['input_size']:4d}  "
              f"fp32 {row['fp32']['latency_ms_batch1']:8.1f} ms {row['fp32']['images_per_s_batch32']:7.1f} im/s  "
              f"bf16 {row['bf16']['latency_ms_batch1']:8.1f} ms {row['bf16']['images_per_s_batch32']:7.1f} im/s  "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    report = {
        "benchmark": "lungscreen model zoo, CPU forward pass (eval, inference_mode)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "load_average_1_5_15min": {"before": [round(x, 2) for x in load_before],
                                   "after": [round(x, 2) for x in os.getloadavg()]},
        "mac_counter": "torch.utils.flop_counter.FlopCounterMode (MACs = FLOPs / 2; conv and matmul only)",
        "settings": {"num_classes": 3, "in_channels": 1, "input": "each paper's input size, square",
                     "latency": "median seconds of batch-1 forwards", "throughput": "32 / median batch-32 time",
                     "bf16": "torch.autocast('cpu', dtype=torch.bfloat16)"},
        "models": rows,
    }
    def write(path: Path) -> None:
        path.write_text(json.dumps(report, indent=2) + "\n")
        path.chmod(0o644)  # the atomic temporary file is created private (0600)

    write_atomic(args.out, write)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
