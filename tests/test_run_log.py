"""log.txt holds the run's text lines only: no progress-bar redraws, no terminal codes, even in a terminal;
the progress bar counts epochs from 1, as the log does."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from training_fixtures import make_manifest, tiny_recipe, write_recipe

from lungscreen.training.run_folder import _LogLines, _Tee, run_log

EPOCH_LINE = re.compile(r"^\[(head|all)\] epoch \d+  train/loss ")


def plain(text: str) -> str:
    """What ``text`` becomes in log.txt."""
    handle = io.StringIO()
    log = _LogLines(handle)
    log.write(text)
    log.close()
    return handle.getvalue()


def test_colours_and_redraws_leave_the_final_text_only() -> None:
    assert plain("\x1b[1mbold\x1b[0m and \x1b[32mgreen\x1b[0m\n") == "bold and green\n"
    assert plain("\rEpoch 1:  10%|#  |\rEpoch 1: 100%|###|\r\x1b[2Kepoch 1 done\n") == "epoch 1 done\n"
    assert plain("\x1b[?25h\n\n  \nno newline at the end") == "no newline at the end\n"


def test_finished_lines_reach_the_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_text("earlier session\n")
    with path.open("a") as handle:
        log = _LogLines(handle)
        log.write("first\nsecond\npartial")
        assert path.read_text() == "earlier session\nfirst\nsecond\n"  # tail -f follows the run
        log.write(" line\n")
        log.close()
    assert path.read_text() == "earlier session\nfirst\nsecond\npartial line\n"


def test_printing_goes_above_a_tqdm_bar_on_the_terminal() -> None:
    from tqdm import tqdm

    terminal, log_file = io.StringIO(), io.StringIO()
    tee = _Tee(terminal, _LogLines(log_file), terminal)
    with tqdm(total=4, file=terminal, desc="[all] epoch 1/2", ncols=60, mininterval=0) as bar:
        bar.update(1)
        tee.write("[all] epoch 1")
        tee.write("  train/loss 0.5\n")  # print() writes the text and the newline separately
        bar.update(3)
    drawn = terminal.getvalue()
    assert "\n[all] epoch 1  train/loss 0.5\n" in drawn.replace("\r", "\n")  # a line of its own, not glued
    assert log_file.getvalue() == "[all] epoch 1  train/loss 0.5\n"


def test_run_log_copies_prints_and_warnings_as_plain_lines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import warnings

    with run_log(tmp_path / "log.txt"):
        print("\x1b[36mstage 1/2\x1b[0m head")
        print("\rredrawn\r", end="", flush=True)
        # what warnings.showwarning writes (pytest records warnings instead of showing them)
        sys.stderr.write(warnings.formatwarning("a warning the run should keep", UserWarning, "run.py", 1))
        print("[head] epoch 1  done")
    text = (tmp_path / "log.txt").read_text()
    assert "\x1b" not in text and "\r" not in text
    assert text.splitlines()[0] == "stage 1/2 head"
    assert "UserWarning: a warning the run should keep" in text and text.endswith("[head] epoch 1  done\n")
    assert "stage 1/2" in capsys.readouterr().out  # the terminal still gets everything


def _run_in_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``python -m lungscreen ARGS`` in a pseudo-terminal of 100 x 40: (exit code, what it drew)."""
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "40", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lungscreen", *args], stdin=slave, stdout=slave,
                               stderr=slave, cwd=cwd, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return process.wait(timeout=300), b"".join(chunks).decode("utf-8", errors="replace")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_train_in_a_terminal_writes_a_small_plain_log(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path / "synth", per_class=10)
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(manifest))
    code, drawn = _run_in_terminal(["train", str(recipe), "--out", str(tmp_path / "run")], tmp_path)
    assert code == 0, drawn[-3000:]
    # the terminal got the bar, counting from 1 like the log
    assert "[head] epoch 1/1" in drawn and "[all] epoch 2/2" in drawn and "it/s" in drawn

    raw = (tmp_path / "run" / "log.txt").read_bytes()
    text = raw.decode()
    assert b"\x1b" not in raw and b"\r" not in raw
    assert len(raw) < 3000, f"log.txt is {len(raw)} bytes"
    assert "it/s" not in text and "epoch 2/2" not in text and "loading" not in text  # no bar, no frame
    epochs = [line for line in text.splitlines() if EPOCH_LINE.match(line)]
    history = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert len(epochs) == len(history) == 3
    assert [line.split("]")[0] for line in epochs] == ["[head", "[all", "[all"]
    assert "stage 1/2 head" in text and "stage 2/2 all" in text and "test accuracy" in text
