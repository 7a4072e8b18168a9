"""`lungscreen pacs ...`: screen the chest images of a PACS over DICOMweb and store the answers in their studies."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lungscreen.cli.output import stdout_console

app = typer.Typer(help="Screen a PACS's chest images over DICOMweb (QIDO-RS, WADO-RS, STOW-RS).", no_args_is_help=True)
out = stdout_console()
err = Console(stderr=True, highlight=False, soft_wrap=True)

URL_HELP = "The PACS's DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web (Orthanc)."
CREDENTIALS = typer.Option(None, "--credentials", help="File whose first line is USER:PASSWORD (HTTP basic) or "
                           "'Bearer TOKEN'. Without it: $LUNGSCREEN_PACS_TOKEN, or $LUNGSCREEN_PACS_USER and "
                           "$LUNGSCREEN_PACS_PASSWORD. Never put them on the command line.")
CA_BUNDLE = typer.Option(None, "--ca-bundle", exists=True, dir_okay=False,
                         help="PEM file of the certificate authorities to trust (your hospital's); TLS is always verified.")
STATE = typer.Option(None, "--state", envvar="LUNGSCREEN_PACS_STATE", help="Screening state: a SQLite file (default "
                     "lungscreen-pacs.db in the current folder) or a database URL shared by several workers, e.g. "
                     "postgresql://lungscreen@db.example.org/screening (password in ~/.pgpass or $PGPASSWORD). Also "
                     "$LUNGSCREEN_PACS_STATE.")


@app.callback()
def pacs() -> None:
    """Screen the chest images of a PACS over DICOMweb, and write each answer back into its study as a DICOM
    Structured Report and a Secondary Capture heat-map overlay. A research tool, not a diagnostic device.

    Credentials come from `--credentials FILE` or the environment ($LUNGSCREEN_PACS_USER and
    $LUNGSCREEN_PACS_PASSWORD, or $LUNGSCREEN_PACS_TOKEN); output names studies and instances by UID only.
    """


def _since(text: str | None) -> str | None:
    from lungscreen.errors import ConfigError

    if text is None:
        return None
    digits = text.replace("-", "")
    if not re.fullmatch(r"\d{8}", digits):
        raise ConfigError(f"--since: {text!r} is not a date (YYYY-MM-DD)")
    return digits


def _modalities(text: str | None) -> tuple[str, ...]:
    from lungscreen.errors import ConfigError

    if not text:
        return ()
    found = tuple(dict.fromkeys(part.strip().upper() for part in text.split(",") if part.strip()))
    if any(not re.fullmatch(r"[A-Z0-9]{1,16}", modality) for modality in found):
        raise ConfigError(f"--modality: {text!r} must be DICOM modalities separated by commas, e.g. CR,DX,CT")
    return found


def _connect(url: str, credentials: Path | None, ca_bundle: Path | None):
    from lungscreen.pacs import Credentials, Pacs

    return Pacs(url, Credentials.from_environment(credentials), ca_bundle=ca_bundle)


@app.command("query")
def query(
    url: str = typer.Argument(..., help=URL_HELP),
    modality: str | None = typer.Option(None, "--modality", help="Only studies holding one of these modalities, "
                                        "e.g. CR,DX,CT (default: every study)."),
    since: str | None = typer.Option(None, "--since", help="Only studies from this date on (YYYY-MM-DD)."),
    credentials: Path | None = CREDENTIALS,
    ca_bundle: Path | None = CA_BUNDLE,
) -> None:
    """List the studies of the PACS: UIDs, dates, modalities and sizes (never patient names or IDs).

    Example: `lungscreen pacs query http://127.0.0.1:8042/dicom-web --modality CR,DX --since 2024-01-01`
    """
    from lungscreen.pacs.connection import tag

    studies = _connect(url, credentials, ca_bundle).studies(modalities=_modalities(modality), since=_since(since))
    if not studies:
        err.print("no study matches")
        return
    table = Table("study instance UID", "date", "time", "modalities", "series", "instances")
    _whole_uids(table.columns[0], [str(tag(study, "StudyInstanceUID")) for study in studies])
    table.columns[1].no_wrap, table.columns[1].min_width = True, 10
    for study in sorted(studies, key=lambda s: (str(tag(s, "StudyDate", "")), str(tag(s, "StudyTime", "")))):
        values = (study.get("00080061") or {}).get("Value") or []
        table.add_row(tag(study, "StudyInstanceUID"), _date(tag(study, "StudyDate", "")),
                      str(tag(study, "StudyTime", "") or "")[:6], ",".join(map(str, values)),
                      str(tag(study, "NumberOfStudyRelatedSeries", "")), str(tag(study, "NumberOfStudyRelatedInstances", "")))
    out.print(table)
    err.print(f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'}")


@app.command("pull")
def pull(
    url: str = typer.Argument(..., help=URL_HELP),
    study: str = typer.Argument(..., help="The study's StudyInstanceUID (`lungscreen pacs query` lists them)."),
    to: Path = typer.Option(..., "--to", help="Folder to write into, as TO/STUDY/SERIES/INSTANCE.dcm."),
    mkdir: bool = typer.Option(False, "--mkdir", help="Create --to if it does not exist."),
    credentials: Path | None = CREDENTIALS,
    ca_bundle: Path | None = CA_BUNDLE,
) -> None:
    """Write a study's instances as DICOM files (the only command that writes PACS data to disk).

    Example: `lungscreen pacs pull http://127.0.0.1:8042/dicom-web 1.2.840.113619.2.55.3 --to pulled/`
    """
    from lungscreen.errors import ConfigError
    from lungscreen.pacs.connection import check_uid
    from lungscreen.pacs.pull import pull_study
    from lungscreen.progress import progress_bar

    check_uid(study, "STUDY_UID")
    if not to.is_dir():
        if not mkdir:
            raise ConfigError(f"--to: the folder {to} does not exist (create it, or pass --mkdir)")
        to.mkdir(parents=True)
    pacs = _connect(url, credentials, ca_bundle)
    with progress_bar() as bar:
        job = bar.add_task("pulling", total=None)
        written = pull_study(pacs, study, to, progress=lambda done: bar.update(job, completed=done))
    err.print(f"{len(written)} instance(s) of study {study} -> {escape(str(to / study))}")


@app.command("screen")
def screen(
    url: str = typer.Argument(..., help=URL_HELP),
    model: Path = typer.Option(..., "--model", help="Run folder (with best.pt), a checkpoint, or a `lungscreen export` "
                               ".onnx model (no Grad-CAM heat-map then: the overlay shows the lungs only)."),
    watch: bool = typer.Option(False, "--watch", help="Keep going: look for new instances every --interval seconds "
                               "(Ctrl-C or SIGTERM stops after the instance under way)."),
    interval: float = typer.Option(30.0, "--interval", min=0.1, help="Seconds between two looks with --watch."),
    state: str | None = STATE,
    workers: int = typer.Option(1, "--workers", min=1, max=64, help="Worker processes screening at once on this "
                                "machine (they share the state; more machines can share a PostgreSQL state)."),
    modality: str | None = typer.Option(None, "--modality", help="DICOM modalities to search for (default: the "
                                        "model's: CR,DX for a chest X-ray model, CT for a CT model). Instances of "
                                        "another modality in those studies are recorded as skipped."),
    since: str | None = typer.Option(None, "--since", help="Only studies from this date on (YYYY-MM-DD)."),
    lease: float = typer.Option(600.0, "--lease", min=1.0, help="Seconds a worker may hold an instance; after that "
                                "(it died) another worker takes it over."),
    threads: int = typer.Option(0, "--threads", min=0, help="PyTorch threads per worker (0: the cores / --workers). "
                                "On a machine other work keeps busy, 1 is often much faster (threads spin against "
                                "each other); an ONNX export uses onnxruntime's threads."),
    credentials: Path | None = CREDENTIALS,
    ca_bundle: Path | None = CA_BUNDLE,
) -> None:
    """Screen every chest image of the PACS that this model has not screened yet, and store two new series in
    each image's study: a DICOM Structured Report (TID 1500: the probability of each class, the decision at
    the run's operating point and its rule, the out-of-distribution flag, the model's name, version and
    SHA-256, the research-use statement) and a Secondary Capture with the Grad-CAM heat-map and the lung
    contour drawn on the image.

    Instances the model does not take (a lateral film, another modality, another body part, an image unlike
    its training data) are recorded as skipped, unreadable ones as failed, each with the reason (`lungscreen
    pacs status`). The state makes it idempotent and restart-safe: run it again and it adds nothing; stop
    it and it resumes. Exit code 0 when it ran (even if some instances failed), 2 on bad input or an
    unreachable PACS (without --watch; with it, an outage is waited out), 130 / 143 on Ctrl-C / SIGTERM.

    Example: `lungscreen pacs screen http://127.0.0.1:8042/dicom-web --model runs/covid-resnet-cpu --watch`
    """
    from lungscreen import interrupts
    from lungscreen.inference.predict import Predictor
    from lungscreen.pacs import Credentials, Options, Pacs, Screener, State, Tally, state_url
    from lungscreen.pacs.selection import searched_modalities
    from lungscreen.pacs.workers import Job, run_workers, use_threads

    url_state = state_url(state)
    threads = threads or _threads(workers)
    secrets = Credentials.from_environment(credentials)
    pacs = Pacs(url, secrets, ca_bundle=ca_bundle)
    predictor = Predictor(model)
    use_threads(threads)
    searched = _modalities(modality) or searched_modalities(predictor.spec.modality)
    options = Options(modalities=searched, since=_since(since), lease=lease, watch=watch, interval=interval)
    store = State(url_state)
    screener = Screener(pacs, predictor, store, options, say=lambda text: err.print(text, markup=False))
    tally = Tally()
    try:
        tally.found = screener.scan()
        counts = store.counts(screener.key).get(screener.key, {})
        if not watch and not any(counts.get(s, 0) for s in ("pending", "claimed", "done")):
            skipped = counts.get("skipped", 0)
            err.print(f"{pacs.shown} holds no chest image this {predictor.spec.modality} model takes "
                      f"(searched {','.join(searched)})" + (f": {skipped} instance(s) skipped, `lungscreen pacs status` "
                                                            "says why" if skipped else "") + "; nothing to screen")
            return
        err.print(f"{tally.found} new instance(s) found; {counts.get('pending', 0)} to screen with {screener.model.name} "
                  f"(SHA-256 {screener.key[:12]}) on {workers} worker(s)" + (f", watching every {interval:g} s" if watch else ""))
        if workers == 1:
            screener.run(tally, scan_first=False)
            err.print(f"worker 1: {tally.timing()}")
        else:
            job = Job(url, secrets, ca_bundle, str(model), url_state, options, threads=threads)
            code = run_workers(job, workers)
            if code:
                raise typer.Exit(code)
    except interrupts.Interrupted as stop:
        raise interrupts.Interrupted(stop.signum, f"after {tally.screened} instance(s) in this process",
                                     "the instance under way was finished; run the same command to resume") from None
    _summary(store, screener.key, tally, workers)


def _threads(workers: int) -> int:
    import os

    return max(1, (os.cpu_count() or 1) // workers)


def _summary(store, key: str, tally, workers: int) -> None:
    counts = store.counts(key).get(key, {})
    total = ", ".join(f"{counts.get(status, 0)} {status}" for status in ("done", "skipped", "failed", "pending", "claimed")
                      if counts.get(status, 0))
    this = (f"{tally.screened} instance(s) handled here: " +
            ", ".join(f"{n} {s}" for s, n in sorted(tally.statuses.items()))) if workers == 1 else "workers finished"
    err.print(f"{this}; the state now holds {total or 'nothing'} for this model (`lungscreen pacs status` for reasons)")


@app.command("status")
def status(
    state: str | None = STATE,
    limit: int = typer.Option(10, "--limit", min=0, help="How many of the latest failed and skipped instances to list."),
) -> None:
    """Print how many instances are done, failed, skipped, pending and claimed per model, and the latest
    failed and skipped ones with their reasons (UIDs only).

    Example: `lungscreen pacs status --state lungscreen-pacs.db`
    """
    from lungscreen.errors import ConfigError
    from lungscreen.pacs import State, state_url

    url = state_url(state)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"--state: no screening state at {url.removeprefix('sqlite:///')} (run `lungscreen pacs "
                          "screen` first, or give --state)")
    store = State(url)
    names = store.models()
    counts = store.counts()
    if not counts:
        err.print("the state holds no instance yet")
        return
    table = Table("model", "SHA-256", "done", "failed", "skipped", "pending", "claimed")
    for sha, by_status in counts.items():
        name, _ = names.get(sha, ("?", ""))
        table.add_row(name, sha[:12], *(str(by_status[s]) for s in ("done", "failed", "skipped", "pending", "claimed")))
    out.print(table)
    latest = store.latest(("failed", "skipped"), limit)
    if latest:
        reasons = Table("status", "SOP instance UID", "model", "reason", title="latest failed and skipped")
        _whole_uids(reasons.columns[1], [row["sop_instance_uid"] for row in latest])
        for row in latest:
            reasons.add_row(row["status"], row["sop_instance_uid"], row["model"][:12], row["reason"])
        out.print(reasons)


def _whole_uids(column, uids: list[str]) -> None:
    """A UID column is never cut or folded (it is copied into other commands): other columns give way."""
    column.no_wrap = True
    column.min_width = max(map(len, uids), default=10)


def _date(text: str) -> str:
    text = str(text or "")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else text
