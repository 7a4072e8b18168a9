"""Several screening workers on one machine: processes that share the state database, as workers on other
machines do.

Each worker is a spawned process (a fork of a process running torch threads can deadlock) that rebuilds its
own PACS connection, model and state connection from a :class:`Job` and drains the queue; the state's atomic
claims keep them from taking the same instance. A worker prints its per-instance lines and, at its end, a
``worker N: ... time: ...`` line. The parent waits; on Ctrl-C / SIGTERM it passes the signal on, so every
worker finishes the instance under way, and stops with the signal's exit code.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from lungscreen import interrupts
from lungscreen.errors import LungscreenError
from lungscreen.pacs.connection import Credentials, Pacs
from lungscreen.pacs.screener import Options, Screener, Tally
from lungscreen.pacs.state import State


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to rebuild its screener (all plain, picklable values)."""

    url: str
    credentials: Credentials
    ca_bundle: Path | None
    model: str
    state: str
    options: Options
    threads: int = 0
    quiet: bool = False


def build(job: Job) -> Screener:
    """The screener of ``job``: a connection, the model loaded once, the state."""
    from rich.console import Console

    from lungscreen.inference.predict import Predictor

    predictor = Predictor(job.model)
    use_threads(job.threads)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    say = None if job.quiet else (lambda text: console.print(text, markup=False))
    return Screener(Pacs(job.url, job.credentials, ca_bundle=job.ca_bundle), predictor, State(job.state), job.options,
                    say=say)


def use_threads(threads: int) -> None:
    """PyTorch's intra-op threads in this process (0 leaves torch's default); nothing when torch was never
    imported (an ONNX export runs on onnxruntime alone)."""
    torch = sys.modules.get("torch")
    if threads and torch is not None:
        torch.set_num_threads(threads)


def run_workers(job: Job, count: int) -> int:
    """Run ``count`` worker processes on ``job`` (the queue already scanned); the worst exit code among them
    (0 all finished, 2 one stopped on bad input or an unavailable PACS)."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_work, args=(job, number), name=f"lungscreen-pacs-{number}")
                 for number in range(1, count + 1)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except interrupts.Interrupted as stop:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, stop.signum)
        for process in processes:
            process.join()
        raise
    return max((process.exitcode or 0) if (process.exitcode or 0) >= 0 else 1 for process in processes)


def _work(job: Job, number: int) -> None:
    """A worker process's life: drain (and watch), then one timing line; exit codes as the command's."""
    interrupts.install()
    tally = Tally()
    code = 0
    try:
        build(job).run(tally, scan_first=False)
    except interrupts.Interrupted as stop:
        code = stop.exit_code
    except LungscreenError as error:
        print(f"error: worker {number}: {error}", file=sys.stderr)
        code = 2
    done = ", ".join(f"{count} {status}" for status, count in sorted(tally.statuses.items())) or "nothing"
    print(f"worker {number}: {done}; {tally.timing()}", file=sys.stderr, flush=True)
    sys.exit(code)
