"""Open a written HTML page in a real headless Chromium and report what a researcher's browser would see.

Report pages must work from disk with no network, so the check fails on any console error, uncaught page
error, script element, broken picture, or request other than ``file:``/``data:`` (those are blocked, never
sent). It uses Debian's Chromium through Playwright's Python API and never downloads a browser
(no ``playwright install``). Callers skip with :func:`unavailable`'s reason where either is missing.

Example:
    >>> reason = unavailable()                                   # doctest: +SKIP
    >>> if reason: pytest.skip(reason)
    >>> assert render(tmp_path / "report.html", tmp_path / "report.png") == []
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

#: Debian's package; CI installs it (.ci/run).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
#: Schemes a self-contained page may load.
LOCAL_SCHEMES = ("file:", "data:", "about:")
TIMEOUT_MS = 60_000  # generous: the machine may be busy (tests run under nice)


def chromium_path() -> str | None:
    """The Chromium executable, or None: Debian's /usr/bin/chromium, else ``chromium`` on PATH."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    return shutil.which("chromium")


def unavailable() -> str | None:
    """Why a browser check cannot run here, or None when it can."""
    if importlib.util.find_spec("playwright") is None:
        return "Playwright (Python) is not installed: pip install -e '.[dev]'"
    if chromium_path() is None:
        return f"Chromium not found at {CHROMIUM} or on PATH: apt-get install -y chromium (.ci/run does)"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served(app) -> Iterator[str]:  # noqa: ANN001 - an ASGI application
    """Run ``app`` with uvicorn on a free loopback port in a thread, as `lungscreen serve` runs it; yield its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def render(path: str | Path, screenshot_path: str | Path, *, expect_text: Iterable[str] = (),
           width: int = 1280) -> list[str]:
    """Load ``path`` in headless Chromium, take a full-page screenshot, return the problems seen (empty: fine).

    ``expect_text``: strings the page must show as visible text (e.g. markup from data, shown not run).
    """
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise FileNotFoundError(unavailable())
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS)
        try:
            context = browser.new_context(viewport={"width": width, "height": 900})
            context.route(lambda url: not url.startswith(LOCAL_SCHEMES), lambda route: route.abort("blockedbyclient"))
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.on("console", lambda message: message.type == "error" and problems.append(
                f"console error: {message.text}"))
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("request", lambda request: request.url.startswith(LOCAL_SCHEMES) or problems.append(
                f"request beyond file:/data: {request.url[:200]}"))
            page.on("requestfailed", lambda request: problems.append(
                f"request failed: {request.url[:200]} ({request.failure})"))
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            problems += _page_problems(page, list(expect_text))
            page.screenshot(path=str(screenshot_path), full_page=True)
        finally:
            browser.close()
    return list(dict.fromkeys(problems))  # a blocked request is reported once, not as request + failure


def _page_problems(page, expect_text: list[str]) -> list[str]:
    """What the DOM says: scripts present, pictures that did not decode, expected text not shown."""
    found = page.evaluate("""() => ({
        scripts: document.scripts.length,
        broken: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
        text: document.body ? document.body.innerText : "",
    })""")
    problems = [f"{found['scripts']} script element(s) on a page that must have none"] if found["scripts"] else []
    problems += [f"picture did not load: {alt!r}" for alt in found["broken"]]
    problems += [f"text not shown: {text!r}" for text in expect_text if text not in found["text"]]
    return problems
