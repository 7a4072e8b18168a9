"""The PACS layer's parts that need no PACS: the state's claims and leases (on SQLite and on a real
PostgreSQL), which headers a model takes, where credentials come from, the result UIDs and the SR text."""

from __future__ import annotations

import time

import pytest

from lungscreen.errors import ConfigError
from lungscreen.pacs.connection import Credentials, Pacs
from lungscreen.pacs.documents import ResultUids, figures_line
from lungscreen.pacs.selection import verdict
from lungscreen.pacs.state import MAX_ATTEMPTS, Found, State, state_url
from pacs_fixtures import postgres  # noqa: F401  (fixture)


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request, tmp_path) -> State:
    if request.param == "sqlite":
        store = State(state_url(str(tmp_path / "state.db")))
    else:
        server = request.getfixturevalue("postgres")
        store = State(state_url(server.url))
        store.tables["metadata"].drop_all(store.engine)  # one database per module: start each test empty
        store.tables["metadata"].create_all(store.engine)
    yield store
    store.close()


def found(count: int) -> list[Found]:
    return [Found("1.2.3", "1.2.3.1", f"1.2.3.1.{i}") for i in range(count)]


def test_claims_are_exclusive_and_new_instances_are_recorded_once(state):
    assert state.add("m", found(3)) == 3 and state.add("m", found(4)) == 1
    claims = [state.claim("m", f"w{i}", lease=60) for i in range(5)]
    taken = [c.instance for c in claims if c is not None]
    assert sorted(taken) == [f"1.2.3.1.{i}" for i in range(4)] and claims[4] is None
    assert state.counts("m")["m"]["claimed"] == 4
    assert state.add("other", found(1)) == 1  # another model's state is its own


def test_an_expired_lease_is_taken_over_and_a_poison_instance_gives_up(state):
    state.add("m", found(1))
    for attempt in range(1, MAX_ATTEMPTS + 1):
        claim = state.claim("m", "w", lease=0.01)
        assert claim is not None and claim.attempts == attempt
        time.sleep(0.05)  # the worker "died": its lease runs out
    assert state.claim("m", "w", lease=60) is None
    row = state.rows("m")[0]
    assert row["status"] == "failed" and f"stopped {MAX_ATTEMPTS} times" in row["reason"]


def test_finish_release_and_what_status_reads(state):
    state.add("m", [*found(2), Found("1.2.3", "1.2.3.2", "1.2.3.2.1", "skipped", "lateral view (ViewPosition LL)")])
    first = state.claim("m", "w", lease=60)
    state.finish(first, "done", report="2.25.1", overlay="2.25.2")
    second = state.claim("m", "w", lease=60)
    state.release(second)  # the PACS went away: back to pending, the try not counted
    again = state.claim("m", "w", lease=60)
    assert again.instance == second.instance and again.attempts == 1
    state.finish(again, "failed", "DICOM has no pixel data")
    state.finish(first, "failed", "late")  # a done instance stays done
    counts = state.counts()["m"]
    assert (counts["done"], counts["failed"], counts["skipped"], counts["pending"]) == (1, 1, 1, 0)
    reasons = {row["status"]: row["reason"] for row in state.latest(("failed", "skipped"), 10)}
    assert reasons == {"failed": "DICOM has no pixel data", "skipped": "lateral view (ViewPosition LL)"}
    state.scanned("m", "1.2.3", 5)
    state.scanned("m", "1.2.3", 7)
    assert state.study_size("m", "1.2.3") == 7 and state.study_size("m", "9.9") is None


def test_state_urls():
    assert state_url("postgresql://lungscreen@db/screening") == "postgresql+psycopg://lungscreen@db/screening"
    assert state_url(None).startswith("sqlite:///") and state_url(None).endswith("/lungscreen-pacs.db")
    with pytest.raises(ConfigError, match="does not exist"):
        state_url("/no/such/folder/state.db")
    with pytest.raises(ConfigError, match="not a database URL"):
        State("nosuchdialect://x/y")


def header(**tags: str) -> dict:
    from pydicom.datadict import tag_for_keyword

    return {f"{tag_for_keyword(k):08X}": {"vr": "CS", "Value": [v]} for k, v in tags.items()}


@pytest.mark.parametrize(("tags", "model", "reason"), [
    ({"Modality": "CR", "ViewPosition": "PA", "BodyPartExamined": "CHEST"}, "CXR", ""),
    ({"Modality": "DX"}, "CXR", ""),  # no view, no body part: the model's own check decides
    ({"Modality": "DX", "ViewPosition": "LL"}, "CXR", "lateral view (ViewPosition LL)"),
    ({"Modality": "CR", "ViewPosition": "RAO"}, "CXR", "not a frontal view (ViewPosition RAO)"),
    ({"Modality": "CR", "BodyPartExamined": "HAND"}, "CXR", "body part HAND, not the chest"),
    ({"Modality": "CT"}, "CXR", "modality CT (CT): the model reads CXR images"),
    ({"Modality": "MR"}, "CXR", "modality MR: the model reads CXR images"),
    ({"Modality": "CT", "BodyPartExamined": "CHEST"}, "CT", ""),
    ({"Modality": "CR"}, "CT", "modality CR (CXR): the model reads CT images"),
])
def test_which_headers_a_model_takes(tags, model, reason):
    assert verdict(header(**tags), model) == reason


def test_credentials_from_the_environment_or_a_file(monkeypatch, tmp_path):
    for variable in ("LUNGSCREEN_PACS_USER", "LUNGSCREEN_PACS_PASSWORD", "LUNGSCREEN_PACS_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    assert Credentials.from_environment() == Credentials()
    monkeypatch.setenv("LUNGSCREEN_PACS_USER", "reader")
    monkeypatch.setenv("LUNGSCREEN_PACS_PASSWORD", "pw:with:colons")
    assert Credentials.from_environment() == Credentials(user="reader", password="pw:with:colons")
    monkeypatch.setenv("LUNGSCREEN_PACS_TOKEN", "abc")
    assert Credentials.from_environment() == Credentials(token="abc")
    file = tmp_path / "credentials"
    file.write_text("Bearer xyz\n")
    assert Credentials.from_environment(file) == Credentials(token="xyz")
    file.write_text("alice:secret\n")
    assert Credentials.from_environment(file) == Credentials(user="alice", password="secret")
    file.write_text("no colon here\n")
    with pytest.raises(ConfigError, match="USER:PASSWORD"):
        Credentials.from_environment(file)


def test_addresses_a_pacs_connection_refuses():
    with pytest.raises(ConfigError, match="credentials in the address"):
        Pacs("https://alice:secret@pacs.example.org/dicom-web")
    with pytest.raises(ConfigError, match="not an http"):
        Pacs("ftp://pacs.example.org/dicom-web")
    session = Pacs("https://pacs.example.org/dicom-web").client._session
    assert session.verify is True  # TLS verified unless a CA bundle is given, never off
    retry = session.get_adapter("https://pacs.example.org").max_retries
    assert retry.is_retry("GET", 503) and retry.is_retry("POST", 502)
    assert not retry.is_retry("GET", 401) and not retry.is_retry("GET", 404) and not retry.is_retry("GET", 429)


def test_result_uids_are_fixed_by_instance_and_model():
    first = ResultUids.of("1.2.3", "1.2.3.4", "a" * 64)
    assert first == ResultUids.of("1.2.3", "1.2.3.4", "a" * 64)
    assert first != ResultUids.of("1.2.3", "1.2.3.4", "b" * 64) and first.sr != ResultUids.of("1.2.3", "1.2.3.5", "a" * 64).sr
    assert first.sr_series == ResultUids.of("1.2.3", "1.2.3.5", "a" * 64).sr_series  # one report series per study
    assert all(uid.startswith("2.25.") and len(uid) <= 64 for uid in vars(first).values())


def test_the_reports_test_figures_line():
    report = {"split": "test", "images": 112, "patients": 40, "figures": {
        "sensitivity/COVID-19": {"value": 0.91, "low": 0.8, "high": 0.97},
        "specificity/COVID-19": {"value": 0.85, "low": 0.77, "high": 0.91},
        "accuracy": {"value": 0.7, "low": 0.6, "high": 0.8}, "ppv/COVID-19": {"value": None, "low": None, "high": None}}}
    line = figures_line(report)
    assert line == ("on its test split (112 images, 40 patients): sensitivity/COVID-19 0.910 [0.800, 0.970]; "
                    "specificity/COVID-19 0.850 [0.770, 0.910]")
    assert figures_line(None) == "" and figures_line({"figures": {}}) == ""
