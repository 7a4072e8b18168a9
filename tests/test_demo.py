"""`lungscreen demo` proves its point: its model learns the phantoms (validation balanced accuracy >= 0.90), and
the audit flags the same recipe trained on phantoms with a planted shortcut (red) and passes the clean one
(green). The demo's one heavy test: it runs the whole demo, minutes on two cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_the_demo_learns_and_its_audit_tells_the_shortcut_from_the_clean_model(tmp_path):
    workdir = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "lungscreen", "demo", "--workdir", str(workdir)],
                            capture_output=True, text=True, timeout=3600, env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    clean, shortcut = workdir / "clean", workdir / "shortcut"
    best = json.loads((clean / "run" / "best.json").read_text())
    assert best["figures"]["val/balanced_accuracy"] >= 0.90, best
    for folder in (clean, shortcut):
        assert json.loads((folder / "run" / "summary.json").read_text())["learned"] is True
    verdicts = {folder.name: json.loads((folder / "audit" / "audit.json").read_text())["verdict"]
                for folder in (clean, shortcut)}
    assert verdicts == {"clean": "no shortcut found", "shortcut": "shortcut suspected"}, verdicts
    assert "the audit caught the planted shortcut and passed the clean model" in result.stdout
    assert (clean / "evaluation" / "report.html").is_file() and list((clean / "explanations").glob("*.png"))
