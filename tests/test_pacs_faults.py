"""`lungscreen pacs screen` under faults, against the real servers: Orthanc SIGKILLed in the middle of a
``--watch`` run and restarted on its storage; a worker SIGKILLed between storing its results and recording
them; two worker processes sharing one PostgreSQL state, and two sharing a SQLite state, interrupted with
SIGINT and resumed. In the end every frontal instance has exactly one report and one overlay."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from lungscreen.io.files import file_sha256
from lungscreen.pacs.documents import ResultUids
from lungscreen.pacs.state import State, state_url
from pacs_fixtures import (  # noqa: F401  (fixtures)
    Made,
    lungscreen,
    orthanc,
    postgres,
    results_in,
    start_lungscreen,
    synthetic,
    synthetic_batch,
)
from servers import ORTHANC_PASSWORD, ORTHANC_USER, Orthanc, orthanc_missing

pytestmark = pytest.mark.slow
ENV = {"LUNGSCREEN_PACS_USER": ORTHANC_USER, "LUNGSCREEN_PACS_PASSWORD": ORTHANC_PASSWORD}
PRIVATE = ("Zebulon", "ZQ-90210")


def wait_for(condition: Callable[[], bool], timeout: float, what: str, *, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def statuses(state: str) -> Counter:
    store = State(state_url(state))
    try:
        return Counter(row["status"] for row in store.rows())
    finally:
        store.close()


def assert_exactly_one_result_each(server: Orthanc, made: list[Made], model: Path) -> None:
    """Each instance's report and overlay (their UIDs follow from instance and model) once in its study, and
    nothing else of ours there."""
    sha = file_sha256(model / "best.pt")
    for study in {m.study for m in made}:
        found = results_in(server, study)
        expected = [ResultUids.of(study, m.instance, sha) for m in made if m.study == study]
        reports = Counter(item["00080018"]["Value"][0] for item in found["SR"])
        overlays = Counter(item["00080018"]["Value"][0] for item in found["OT"])
        assert reports == Counter(uids.sr for uids in expected), study
        assert overlays == Counter(uids.overlay for uids in expected), study


def stop(process: subprocess.Popen, signum: int, log: Path) -> None:
    """Send ``signum``: the command finishes the instance under way and ends with 128 + signum and one line
    saying so, last (killed if it does not within two minutes)."""
    try:
        process.send_signal(signum)
        assert process.wait(timeout=120) == 128 + signum
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert f"interrupted ({signal.Signals(signum).name})" in text.splitlines()[-1], text


def done_lines(*logs: Path) -> list[str]:
    return [line.split()[1].rstrip(":") for log in logs for line in log.read_text().splitlines()
            if line.startswith("done ")]


def no_private_data(*logs: Path) -> None:
    for log in logs:
        text = log.read_text()
        assert "Traceback" not in text, text
        for secret in PRIVATE:
            assert secret not in text


def test_orthanc_killed_mid_watch_and_restarted(synthetic, tmp_path):
    if reason := orthanc_missing():
        pytest.skip(reason)
    run, films = synthetic
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        made = synthetic_batch(films, 12, per_study=3)
        for item in made:
            server.upload(item.data)
        state, log = str(tmp_path / "state.db"), tmp_path / "watch.log"
        watcher = start_lungscreen("pacs", "screen", server.dicomweb, "--model", run, "--watch", "--interval", "1",
                                   "--state", state, "--threads", "1", env=ENV, log=log)
        try:
            wait_for(lambda: Path(state).exists() and statuses(state)["done"] >= 3, 240, "3 instances screened")
            server.kill()
            time.sleep(2)
            server.start()
            late = synthetic_batch(films[12:], 2)  # arriving after the restart: the watch finds them too
            for item in late:
                server.upload(item.data)
            made += late
            wait_for(lambda: statuses(state)["done"] == len(made), 300, f"all {len(made)} instances screened")
        finally:
            stop(watcher, signal.SIGTERM, log)
        no_private_data(log)
        assert sorted(done_lines(log)) == sorted(m.instance for m in made)
        assert_exactly_one_result_each(server, made, run)
    finally:
        server.stop()


def test_a_worker_killed_between_storing_and_marking(orthanc, synthetic, tmp_path):
    """The test holds the SQLite state's write lock while a worker screens an instance: the worker stores its
    report and overlay in Orthanc, then waits for the lock to mark the instance done, and is SIGKILLed there.
    A later run takes the instance over when the lease has run out, finds both results in the study, and
    marks it done without storing anything again."""
    run, films = synthetic
    orthanc.wipe()
    made = synthetic_batch(films, 4)
    for item in made:
        orthanc.upload(item.data)
    state, first_log = tmp_path / "state.db", tmp_path / "first.log"
    worker = start_lungscreen("pacs", "screen", orthanc.dicomweb, "--model", run, "--state", state, "--lease", "5",
                              env=ENV, log=first_log)
    lock = None
    try:
        def claimed() -> tuple[str, str] | None:
            if not state.exists():
                return None
            with sqlite3.connect(state, timeout=30) as reader:
                try:
                    return reader.execute("SELECT sop_instance_uid, study_instance_uid FROM pacs_instances "
                                          "WHERE status = 'claimed'").fetchone()
                except sqlite3.OperationalError:  # the worker has not created its tables yet
                    return None

        wait_for(lambda: claimed() is not None, 240, "a claimed instance", poll=0.01)
        lock = sqlite3.connect(state, timeout=30, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # the worker may no longer write: it stops before marking
        instance, study = lock.execute("SELECT sop_instance_uid, study_instance_uid FROM pacs_instances "
                                       "WHERE status = 'claimed'").fetchone()
        uids = ResultUids.of(study, instance, file_sha256(run / "best.pt"))
        wait_for(lambda: bool(orthanc.instances(study, SOPInstanceUID=uids.sr))
                 and bool(orthanc.instances(study, SOPInstanceUID=uids.overlay)), 120, "the results stored")
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
        if lock is not None:
            lock.execute("ROLLBACK")
            lock.close()
    row = next(r for r in State(state_url(str(state))).rows() if r["sop_instance_uid"] == instance)
    assert row["status"] == "claimed" and row["attempts"] == 1
    time.sleep(max(0.0, row["lease_until"] - time.time()) + 0.5)
    second = lungscreen("pacs", "screen", orthanc.dicomweb, "--model", run, "--state", state, env=ENV)
    assert second.returncode == 0, second.stderr
    assert f"done     {instance}: its report and overlay were already in the study" in second.stderr
    rows = {r["sop_instance_uid"]: r for r in State(state_url(str(state))).rows()}
    assert {r["status"] for r in rows.values()} == {"done"} and rows[instance]["attempts"] == 2
    assert rows[instance]["report_uid"] == uids.sr and rows[instance]["overlay_uid"] == uids.overlay
    assert_exactly_one_result_each(orthanc, made, run)


def test_two_worker_processes_share_one_postgresql_state(orthanc, postgres, synthetic, tmp_path):
    run, films = synthetic
    orthanc.wipe()
    made = synthetic_batch(films, 40, per_study=4)
    for item in made:
        orthanc.upload(item.data)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [start_lungscreen("pacs", "screen", orthanc.dicomweb, "--model", run, "--state", postgres.url,
                                env=ENV, log=log) for log in logs]
    for worker in workers:
        assert worker.wait(timeout=600) == 0
    no_private_data(*logs)
    rows = State(state_url(postgres.url)).rows()
    assert len(rows) == 40 and {r["status"] for r in rows} == {"done"}
    assert {r["attempts"] for r in rows} == {1}, "an instance was claimed twice"
    done = done_lines(*logs)
    assert sorted(done) == sorted(m.instance for m in made)  # each screened once, by one of the two
    assert all(done_lines(log) for log in logs), "one worker did nothing"
    assert_exactly_one_result_each(orthanc, made, run)


def test_two_workers_on_sqlite_stop_on_sigint_and_resume(orthanc, synthetic, tmp_path):
    run, films = synthetic
    orthanc.wipe()
    made = synthetic_batch(films, 40, per_study=4)
    for item in made:
        orthanc.upload(item.data)
    state, first_log = str(tmp_path / "state.db"), tmp_path / "first.log"
    command = ("pacs", "screen", orthanc.dicomweb, "--model", run, "--state", state, "--workers", "2")
    first = start_lungscreen(*command, env=ENV, log=first_log)
    try:
        wait_for(lambda: Path(state).exists() and statuses(state)["done"] >= 6, 300, "6 instances screened")
    finally:
        stop(first, signal.SIGINT, first_log)
    after_stop = statuses(state)
    assert after_stop["claimed"] == 0, "a worker stopped without recording the instance under way"
    assert after_stop["done"] < 40, "nothing left to resume: interrupt earlier"
    second = lungscreen(*command, env=ENV)
    assert second.returncode == 0, second.stderr
    second_log = tmp_path / "second.log"
    second_log.write_text(second.stderr)
    no_private_data(first_log, second_log)
    rows = State(state_url(state)).rows()
    assert len(rows) == 40 and {r["status"] for r in rows} == {"done"} and {r["attempts"] for r in rows} == {1}
    assert sorted(done_lines(first_log, second_log)) == sorted(m.instance for m in made)
    assert_exactly_one_result_each(orthanc, made, run)
