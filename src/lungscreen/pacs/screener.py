"""``pacs screen``: find the instances a model has not screened, screen each once, store the answer in its study.

One cycle is a *scan* (QIDO-RS: the studies holding the searched modalities, then the headers of the series
of every study whose instance count changed since the last scan; new instances go into the state as
pending, or skipped with the reason when their header already says the model does not take them) and a
*drain* (claim an instance, retrieve it with WADO-RS, screen it with :func:`~lungscreen.audit.screening.screen_image`
at the run's own operating point, store a Structured Report and a Secondary Capture overlay with STOW-RS,
then mark it done). ``--watch`` repeats the cycle every ``interval`` seconds.

Never twice, never lost: the result is stored *before* the instance is marked done, and the results' UIDs
derive from the instance and the model (:class:`~lungscreen.pacs.documents.ResultUids`), so before
screening a claimed instance the worker asks the study for its report; one found there (a worker killed
between storing and marking) is taken as done. An instance that cannot be read is marked failed with the
reason and the queue goes on; a refusal by the model (another modality, a lateral view, an image unlike its
training data: ``not screened: ...``) is marked skipped with the reason. When the PACS itself is unavailable
(unreachable, 5xx after the retries) the instance is given back untouched: a watching screener waits for
the next cycle, a single run stops with one line.

Ctrl-C / SIGTERM: the instance under way is finished and recorded, then the command stops (130 / 143).
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lungscreen import interrupts
from lungscreen.audit.screening import screen_image
from lungscreen.errors import ImageReadError, LungscreenError
from lungscreen.inference.predict import Predictor
from lungscreen.io.images import read_image
from lungscreen.pacs.connection import Pacs, PacsError, PacsUnavailable, tag
from lungscreen.pacs.documents import ResultUids, describe_model, overlay_image, referenced_instance, structured_report
from lungscreen.pacs.selection import is_candidate, verdict
from lungscreen.pacs.state import Claim, Found, State, worker_name

#: The phases a screened instance's time is split into (``Outcome.seconds``).
PHASES = ("check", "retrieve", "screen", "document", "store")


@dataclass(frozen=True)
class Options:
    """What to screen and how: the DICOM ``modalities`` searched, studies from ``since`` (YYYYMMDD) on, the
    claim ``lease`` (s), and ``watch`` every ``interval`` s."""

    modalities: tuple[str, ...]
    since: str | None = None
    lease: float = 600.0
    watch: bool = False
    interval: float = 30.0


@dataclass
class Outcome:
    """What became of one claimed instance (``status`` done, failed or skipped), with the time per phase."""

    instance: str
    status: str
    reason: str = ""
    prediction: str = ""
    probability: float | None = None
    report: str = ""
    overlay: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        """One log line: UIDs, the decision or the reason; never a patient's name or ID."""
        if self.status == "done" and self.prediction:
            return (f"done     {self.instance}: {self.prediction} {self.probability:.3f} -> report {self.report}, "
                    f"overlay {self.overlay}")
        if self.status == "done":
            return f"done     {self.instance}: {self.reason}"
        return f"{self.status:<8} {self.instance}: {self.reason}"


@dataclass
class Tally:
    """What one worker did: outcomes by status, instances found by scans, seconds per phase."""

    statuses: dict[str, int] = field(default_factory=dict)
    found: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def add(self, outcome: Outcome) -> None:
        self.statuses[outcome.status] = self.statuses.get(outcome.status, 0) + 1
        for phase, seconds in outcome.seconds.items():
            self.seconds[phase] += seconds

    @property
    def screened(self) -> int:
        return sum(self.statuses.values())

    def timing(self) -> str:
        """Seconds per phase over this worker's instances, one line (what the benchmark reads)."""
        return "time: " + ", ".join(f"{phase} {self.seconds[phase]:.2f} s" for phase in PHASES)


class Screener:
    """One worker: a PACS connection, a loaded model and the shared state (see the module docstring).

    Args:
        say: where the per-instance lines go (a console's print; silent when None).
        segmenter: the lung segmenter, loaded once (default: the run's own).
    """

    def __init__(self, pacs: Pacs, predictor: Predictor, state: State, options: Options, *,
                 say: Callable[[str], None] | None = None, segmenter: Any = None) -> None:
        from lungscreen.audit.explain import lung_segmenter

        self.pacs, self.predictor, self.state, self.options = pacs, predictor, state, options
        self.model = describe_model(predictor)
        self.key = self.model.sha256
        self.say = say or (lambda text: None)
        self.segmenter = segmenter or lung_segmenter(predictor)
        self.worker = worker_name()
        state.register_model(self.model.sha256, self.model.name, self.model.version)

    # ----- scan ------------------------------------------------------------------------------------

    def scan(self) -> int:
        """Record the instances not seen before; how many were new."""
        new = 0
        for study in self.pacs.studies(modalities=self.options.modalities, since=self.options.since):
            uid = tag(study, "StudyInstanceUID")
            size = tag(study, "NumberOfStudyRelatedInstances")
            size = int(size) if size is not None else -1
            if size >= 0 and self.state.study_size(self.key, uid) == size:
                continue
            new += self.state.add(self.key, self._new_in(uid))
            self.state.scanned(self.key, uid, size)
        return new

    def _new_in(self, study: str) -> Iterator[Found]:
        known = self.state.known(self.key, study)
        ours = ResultUids.of(study, "", self.key)
        for series in self.pacs.series(study):
            uid = tag(series, "SeriesInstanceUID")
            if uid in (ours.sr_series, ours.overlay_series) or not is_candidate(series):
                continue
            for item in self.pacs.metadata(study, uid):
                instance = tag(item, "SOPInstanceUID")
                if instance in known or not is_candidate(item):
                    continue
                reason = verdict(item, self.model.modality)
                yield Found(study, uid, instance, "skipped" if reason else "pending", reason)

    # ----- drain -----------------------------------------------------------------------------------

    def drain(self, tally: Tally) -> None:
        """Screen claimed instances until none is left; a signal stops it after the instance under way."""
        while True:
            claim = self.state.claim(self.key, self.worker, self.options.lease)
            if claim is None:
                return
            with interrupts.deferred():  # a signal now waits until this instance is stored and recorded
                try:
                    outcome = self.screen(claim)
                except PacsUnavailable:
                    self.state.release(claim)
                    raise
                self.state.finish(claim, outcome.status, outcome.reason, report=outcome.report,
                                  overlay=outcome.overlay)
                tally.add(outcome)
                self.say(outcome.line())

    def screen(self, claim: Claim) -> Outcome:
        """Screen one claimed instance and store its results (or say why not)."""
        uids = ResultUids.of(claim.study, claim.instance, self.key)
        seconds: dict[str, float] = {}
        with _timed(seconds, "check"):
            stored = self._stored(claim, uids)
        if stored:
            return Outcome(claim.instance, "done", "its report and overlay were already in the study", report=uids.sr,
                           overlay=uids.overlay, seconds=seconds)
        try:
            with _timed(seconds, "retrieve"):
                data = self.pacs.retrieve(claim.study, claim.series, claim.instance)
                image = read_image(data, name=f"{claim.instance}.dcm")
            with _timed(seconds, "screen"):
                screening = screen_image(self.predictor, image, segmenter=self.segmenter)
        except ImageReadError as error:
            return Outcome(claim.instance, "failed", error.reason, seconds=seconds)
        except PacsUnavailable:
            raise
        except PacsError as error:  # e.g. deleted from the PACS since the scan
            return Outcome(claim.instance, "failed", str(error), seconds=seconds)
        except LungscreenError as error:  # the model's refusal: another modality, not frontal, unlike its data
            return Outcome(claim.instance, "skipped", str(error), seconds=seconds)
        with _timed(seconds, "document"):
            documents = self._documents(data, screening, image.pixels, uids)
        if isinstance(documents, str):
            return Outcome(claim.instance, "failed", documents, seconds=seconds)
        try:
            with _timed(seconds, "store"):
                self.pacs.store(documents)
        except PacsUnavailable:
            raise
        except PacsError as error:
            return Outcome(claim.instance, "failed", f"the PACS refused the results: {error}", seconds=seconds)
        index = screening.class_names.index(screening.prediction) if screening.prediction in screening.class_names else 0
        return Outcome(claim.instance, "done", prediction=screening.prediction,
                       probability=float(screening.probabilities[index]), report=uids.sr, overlay=uids.overlay,
                       seconds=seconds)

    def _stored(self, claim: Claim, uids: ResultUids) -> bool:
        """Whether the study already holds this instance's report (referencing it) and overlay."""
        if not self.pacs.instances(claim.study, SOPInstanceUID=uids.overlay):
            return False
        if not self.pacs.instances(claim.study, SOPInstanceUID=uids.sr):
            return False
        import pydicom

        report = pydicom.dcmread(io.BytesIO(self.pacs.retrieve(claim.study, uids.sr_series, uids.sr)))
        return referenced_instance(report) == claim.instance

    def _documents(self, data: bytes, screening: Any, pixels: Any, uids: ResultUids) -> list[Any] | str:
        """The report and overlay datasets, or why they could not be made (the source header broke a rule)."""
        import pydicom

        source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        try:
            return [structured_report(source, screening, self.model, uids),
                    overlay_image(source, screening, pixels, uids)]
        except (ValueError, TypeError, AttributeError) as error:  # values in the message may be a patient's: not kept
            return f"its header does not allow a valid DICOM report ({type(error).__name__} in highdicom)"

    # ----- cycles ----------------------------------------------------------------------------------

    def run(self, tally: Tally, *, scan_first: bool = True) -> None:
        """Scan and drain once, or (``watch``) every ``interval`` seconds until stopped. In watch mode an
        unavailable PACS is waited out; otherwise it ends the run (:class:`PacsUnavailable`)."""
        first = True
        while True:
            try:
                if scan_first or not first:
                    tally.found += self.scan()
                self.drain(tally)
            except PacsUnavailable as error:
                if not self.options.watch:
                    raise
                self.say(f"{error}; trying again in {self.options.interval:g} s")
            first = False
            if not self.options.watch:
                return
            time.sleep(self.options.interval)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - started
