"""Report pages are single files a researcher opens from disk: every figure embedded, text from data escaped,
nothing fetched; checked in the file and in a real headless Chromium."""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image, ImageStat

from browser import render, unavailable
from lungscreen.audit.plots import (
    confusion_matrix_figure,
    matrix_figure,
    precision_recall_figure,
    reliability_figure,
    roc_figure,
    scatter_figure,
)
from lungscreen.audit.report import Page, format_value
from lungscreen.evaluation.metrics import Estimate

HOSTILE = '<script>alert("x")</script> & co'  # a source name straight from a folder on disk


def full_page() -> Page:
    rng = np.random.default_rng(0)
    page = Page("Evaluation: covid-resnet-cpu", subtitle="test split, 3 sources")
    page.section("Per source")
    page.paragraph(f"Sources: cohen, figure1, {HOSTILE}.")
    frame = pd.DataFrame({
        "source": ["cohen", "figure1", HOSTILE],
        "images": [120, 45, 30],
        "AUC": [{"value": 0.912, "low": 0.87, "high": 0.95}, Estimate(0.8, 0.7, 0.9),
                {"value": float("nan"), "low": float("nan"), "high": float("nan")}],
        "balanced accuracy": [0.8811, 0.75, np.nan],
    }).set_index("source")
    page.table(frame, "Test split per source", highlight={HOSTILE: "single-class source: AUC undefined"},
               highlight_cells={("figure1", "images"): "fewer than 50 images"})
    page.note("Intervals are 95 % patient-bootstrap intervals.")
    page.section("Figures")
    fpr = np.linspace(0, 1, 50)
    matrix = np.array([[50, 3, 2], [4, 30, 6], [0, 0, 0]])  # no covid in the test split: a row of n/a
    page.figure(confusion_matrix_figure(matrix, ["normal", "pneumonia", "covid"]), "Confusion matrix")
    page.figure(roc_figure({"cohen": (fpr, np.sqrt(fpr), Estimate(0.91, 0.87, 0.95)), HOSTILE: (fpr, fpr ** 0.7, 0.6)}),
                "ROC")
    page.figure(precision_recall_figure({"covid": (fpr, 1 - 0.5 * fpr, 0.75)}), "Precision-recall")
    page.figure(reliability_figure(np.linspace(0.05, 0.95, 10), np.linspace(0.1, 0.9, 10),
                                   np.array([0, 3, 5, 8, 13, 21, 34, 55, 89, 144])), "Reliability")
    sources = ["cohen"] * 40 + ["figure1"] * 40 + ["$ cost_"] * 20
    page.figure(scatter_figure(rng.normal(size=(100, 2)), sources, "t-SNE by source"), "t-SNE")
    page.figure(matrix_figure(np.array([[0.9, 0.55], [np.nan, 0.8]]), ["cohen", "figure1"], ["cohen", "figure1"],
                              "Balanced accuracy", row_label="trained on", column_label="tested on"), "Transfer")
    page.section("Images")
    gradient = np.tile(np.linspace(0, 1, 96, dtype=np.float32), (64, 1))
    page.image(gradient, f"{HOSTILE}/chest 01.png")
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(png, format="PNG")
    page.image(png.getvalue(), "from PNG bytes")
    page.verdict("warning", "One test source has a single class", [f"{HOSTILE}: AUC undefined"])
    return page


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    return full_page().write(path)


def test_page_is_self_contained(written):
    text = written.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    sources = re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]*)""", text, flags=re.IGNORECASE)
    assert len(sources) == 8 and all(src.startswith("data:image/") for src in sources), sources
    assert not re.search(r"<(script|link rel=\"stylesheet\"|iframe|object|embed)\b", text, flags=re.IGNORECASE)
    assert text.count("<style>") == 1 and "@import" not in text and "url(" not in text
    assert not list(written.parent.glob(".*.tmp")), "atomic write left its temporary file"


def test_text_from_data_is_escaped(written):
    text = written.read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in text
    assert "<script" not in text.lower()


def test_verdict_sits_above_the_sections_and_estimates_read_with_intervals(written):
    text = written.read_text(encoding="utf-8")
    assert text.index('class="verdict warning"') < text.index("<h2")
    assert '0.912 <span class="ci">[0.870, 0.950]</span>' in text
    assert re.search(r'<tr class="marked" title="single-class source: AUC undefined"><th>&lt;script', text)
    assert '<td class="num marked">45<sup class="mark"' in text
    legend = re.search(r'<p class="marks">(.*?)</p>', text).group(1)
    assert legend == "\u2020 fewer than 50 images<br>\u2021 single-class source: AUC undefined"  # in order of use


def test_format_value():
    assert format_value(Estimate(0.9123, 0.87, 0.95)) == "0.912 [0.870, 0.950]"
    assert format_value({"value": float("nan"), "low": float("nan"), "high": float("nan")}) == "undefined"
    assert format_value(Estimate(0.8, float("nan"), float("nan"))) == "0.800 [no interval]"  # as Estimate says
    assert [format_value(v) for v in (None, float("nan"), 7, True)] == ["n/a", "n/a", "7", "yes"]
    assert format_value(0.00001) == "1.00e-05"


def test_marks_for_missing_rows_are_refused():
    with pytest.raises(KeyError, match="cohenn"):
        Page("x").table(pd.DataFrame({"n": [1]}, index=["cohen"]), highlight={"cohenn": "typo"})


def test_bad_verdict_level_and_picture_shape_are_refused():
    page = Page("x")
    with pytest.raises(ValueError, match="verdict level"):
        page.verdict("bad", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        page.image(np.zeros((2, 3, 5)))


def test_figures_leave_no_pyplot_state():
    import sys

    page = Page("x")
    page.figure(Figure(), "empty")
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()


def test_page_renders_in_headless_chromium(written, tmp_path):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    screenshot = tmp_path / "report.png"
    problems = render(written, screenshot, expect_text=[HOSTILE, "WARNING", "0.912 [0.870, 0.950]", "undefined", "n/a"])
    assert problems == []
    with Image.open(screenshot) as picture:
        assert picture.height > 900, "full-page screenshot expected"
        grey = picture.convert("L")
        assert ImageStat.Stat(grey).var[0] > 100, "screenshot looks blank"
        dark = sum(grey.histogram()[:128])
        assert dark > 0.01 * grey.width * grey.height, "hardly any text or lines on the screenshot"


def test_browser_check_catches_a_page_that_fetches_or_runs_script(tmp_path):
    """The check itself must fail on what it guards against, or a passing page proves nothing."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    leaky = tmp_path / "leaky.html"
    leaky.write_text('<!DOCTYPE html><html><body><p>hello</p><img src="http://example.invalid/x.png" alt="remote">'
                     '<script>console.error("boom")</script></body></html>', encoding="utf-8")
    problems = "\n".join(render(leaky, tmp_path / "leaky.png", expect_text=["absent words"]))
    for expected in ("request beyond file:/data: http://example.invalid/x.png", "script element",
                     "console error: boom", "picture did not load: 'remote'", "text not shown: 'absent words'"):
        assert expected in problems


def test_a_wide_per_source_table_never_breaks_a_source_name_inside_a_word(tmp_path):
    """The evaluation report's per-source table (ten columns, intervals in six) on a laptop-wide window: each
    source name stays whole on one line, and the class list wraps between words only (the cells used to break
    anywhere, even mid-word)."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    from browser import CHROMIUM_ARGS, chromium_path

    estimate = {"value": 0.912, "low": 0.870, "high": 0.950}
    names = ["covid19-radiography", "nih-chestxray14", "figure1", "cohen"]
    frame = pd.DataFrame([{"source": name, "images": 120, "patients": 80, "classes": "normal, pneumonia, COVID-19",
                           **{figure: estimate for figure in ("balanced_accuracy", "sensitivity/COVID-19",
                                                               "specificity/COVID-19", "auc/COVID-19", "accuracy",
                                                               "macro_auc")}} for name in names]).set_index("source")
    page = Page("Evaluation")
    page.section("Per source")
    page.table(frame, caption="Each source on its own")
    written = page.write(tmp_path / "report.html")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            view = browser.new_page(viewport={"width": 1280, "height": 900})
            view.goto(written.resolve().as_uri())
            lines = view.evaluate("""() => Array.from(document.querySelectorAll('tbody th, tbody td')).map(cell => {
                const range = document.createRange();
                range.selectNodeContents(cell.firstChild);
                const tops = new Set(Array.from(range.getClientRects()).map(r => Math.round(r.top)));
                return [cell.firstChild.textContent, tops.size];
            })""")
        finally:
            browser.close()
    for text, count in lines:
        if text in names:
            assert count == 1, f"{text!r} is broken over {count} lines"
        if text.startswith("normal"):
            assert count <= 3, f"{text!r} is broken inside a word ({count} lines for 3 words)"
