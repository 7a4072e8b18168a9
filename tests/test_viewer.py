"""The viewer page as a person uses it, in Debian's Chromium: a good upload shows the answer with the decision
in words and the model's own test figures; every bad upload after it (a truncated JPEG, a file over the
limit, a CT DICOM, a PNG of noise) leaves no trace of the previous answer and names the file it refuses;
a keyboard alone can upload.

The run is trained here (seconds, on synthetic films), so best.pt holds what training writes: the
operating point chosen on validation, the test figures with their intervals and the in-distribution
reference; the good uploads are films of the same kind.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import CHROMIUM_ARGS, chromium_path, served, unavailable
from lungscreen.inference.predict import Predictor
from lungscreen.lungs.segmenter import ClassicalSegmenter
from lungscreen.serve import create_app
from pacs_fixtures import dicom_from, gray, train_tiny
from training_fixtures import make_manifest

playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright (Python) is not installed")
expect, sync_playwright = playwright_api.expect, playwright_api.sync_playwright

LIMIT = 256 * 1024  # the server's upload limit in these tests
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("viewer")
    return train_tiny(make_manifest(root / "train", per_class=20), root / "run")  # enough images for a gate


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good and bad uploads, each under a name the page must repeat."""
    folder = tmp_path_factory.mktemp("uploads")
    films = sorted(make_manifest(folder / "films", per_class=2, seed=5).parent.glob("*.png"))
    film = gray(films[-1])
    made = {"good-film.png": films[-1].read_bytes(),
            "good-film.dcm": dicom_from(film, modality="CR").data,
            "ct-slice.dcm": dicom_from(film, modality="CT", view=None).data,
            "over-the-limit.png": _png(np.random.default_rng(0).integers(0, 256, (700, 700), dtype=np.uint8)),
            "noise.png": _png(np.random.default_rng(1).integers(0, 256, (256, 256), dtype=np.uint8))}
    jpeg = io.BytesIO()
    Image.fromarray((film * 255).astype(np.uint8)).save(jpeg, format="JPEG", quality=90)
    made["truncated.jpg"] = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]
    assert len(made["over-the-limit.png"]) > LIMIT > len(made["good-film.dcm"])
    paths = {}
    for name, data in made.items():
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    return paths


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def url(run):
    with served(create_app(Predictor(run), segmenter=ClassicalSegmenter(), max_upload=LIMIT)) as address:
        yield address


@pytest.fixture(scope="module")
def browser():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, timeout=60_000)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, url):
    """The viewer, loaded, its model described; console errors and requests elsewhere fail the test."""
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("request", lambda request: request.url.startswith((url, "data:")) or problems.append(request.url))
    page.goto(url, wait_until="load")
    expect(page.locator("#model")).to_contain_text("squeezenet1_1")  # (the page's CSP forbids wait_for_function)
    yield page
    page.close()
    assert problems == []


def upload(page, path: Path) -> str:
    """Choose ``path`` in the page's file input and wait for its answer or its refusal: 'answer' or 'error'."""
    page.set_input_files("#file", str(path))
    expect(page.locator("#status")).to_have_text(re.compile("^" + re.escape(path.name) + ":"))
    return "answer" if page.is_visible("#result") else "error"


def answer_on_page(page) -> dict[str, object]:
    return page.evaluate("""() => ({
        result: !document.getElementById('result').hidden,
        original: document.getElementById('original').getAttribute('src'),
        overlay: document.getElementById('overlay').getAttribute('src'),
        prediction: document.getElementById('prediction').textContent,
        decision: document.getElementById('decision').textContent,
        rows: document.querySelectorAll('#probabilities tbody tr').length,
        notes: document.getElementById('notes').textContent,
    })""")


def test_a_good_upload_shows_the_decision_in_words_and_the_model_s_test_figures(page, files, run):
    assert upload(page, files["good-film.png"]) == "answer"
    shown = answer_on_page(page)
    assert shown["rows"] == 3 and shown["original"].startswith("data:image/png")
    assert page.inner_text("#result-file") == "Answer for good-film.png"
    predictor = Predictor(run)
    point = predictor.spec.operating_point
    assert point is not None, "the tiny run should have an operating point on COVID-19 (chosen on validation)"
    assert re.fullmatch(r"COVID-19 (flagged: probability [\d.]+ is above|not flagged: probability [\d.]+ is below) the "
                        r"threshold [\d.]+ chosen for 95 % sensitivity on the val split; .+", shown["decision"]), shown
    assert "classical fallback" in shown["notes"]  # this server draws the lungs with the classical fallback
    test = predictor.test_report
    summary = page.inner_text("#test-summary")
    assert f"{test['images']} images of {test['patients']} patients" in summary
    figures = page.inner_text("#test-figures")
    sensitivity = test["figures"]["sensitivity/COVID-19"]
    assert f"sensitivity for COVID-19\t{sensitivity['value']:.2f}\t[{sensitivity['low']:.2f}, " in figures
    assert "specificity for COVID-19" in figures


@pytest.mark.parametrize("bad", ["truncated.jpg", "over-the-limit.png", "ct-slice.dcm", "noise.png"])
def test_a_bad_upload_after_a_good_one_leaves_no_previous_answer(page, files, bad):
    assert upload(page, files["good-film.png"]) == "answer"
    assert answer_on_page(page)["decision"]
    assert upload(page, files[bad]) == "error", f"{bad} was screened: {answer_on_page(page)['decision']}"
    shown = answer_on_page(page)
    assert shown == {"result": False, "original": None, "overlay": None, "prediction": "", "decision": "", "rows": 0,
                     "notes": ""}
    assert page.is_visible("#error")
    assert page.inner_text("#error-title") == f"{bad}: not screened"
    reason = page.inner_text("#error-reason")
    expected = {"truncated.jpg": "does not decode", "over-the-limit.png": "larger than",
                "ct-slice.dcm": "DICOM modality CT", "noise.png": "not screened"}[bad]
    assert expected in reason and "HTTP 4" in reason
    assert page.inner_text("#status").startswith(f"{bad}: not screened")


def test_a_dicom_upload_shows_its_study_series_and_instance_uids(page, files):
    from pydicom import dcmread

    dataset = dcmread(files["good-film.dcm"])
    assert upload(page, files["good-film.dcm"]) == "answer"
    assert page.is_visible("#identity")
    assert page.inner_text("#study-uid") == dataset.StudyInstanceUID
    assert page.inner_text("#series-uid") == dataset.SeriesInstanceUID
    assert page.inner_text("#sop-uid") == dataset.SOPInstanceUID
    assert upload(page, files["good-film.png"]) == "answer"
    assert page.is_hidden("#identity") and page.inner_text("#sop-uid") == "", "a PNG has no DICOM identity"


def test_an_upload_with_the_keyboard_alone(page, files):
    """Tab to the file control and press Enter: the file chooser opens and the answer appears (no mouse)."""
    chosen = []
    # Listen before any key is pressed: Playwright subscribes to file choosers without waiting for the answer.
    page.on("filechooser", lambda chooser: chosen.append(chooser) or chooser.set_files(str(files["good-film.png"])))
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "choose":
            break
    assert page.evaluate("document.activeElement.id") == "choose", "no focusable upload control"
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_have_text("good-film.png: screened")
    assert len(chosen) == 1 and answer_on_page(page)["decision"]
