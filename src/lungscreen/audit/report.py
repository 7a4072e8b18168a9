"""Self-contained HTML report pages: one file, every picture embedded, nothing fetched.

``lungscreen evaluate`` (report.html) and ``lungscreen audit`` (audit.html) are opened from disk, on a laptop
with no network, mailed on or printed. So a page carries its style inline, embeds every picture as a
``data:`` URI, has no script, font or stylesheet to load, and its Content-Security-Policy forbids fetching
anything even if a bug let markup through. Every text is escaped: file and source names come from data.

Example:
    >>> page = Page("Evaluation: covid-resnet-cpu")                          # doctest: +SKIP
    >>> page.verdict("warning", "One test source has a single class", ["sirm: AUC undefined"])
    >>> page.section("Per source")
    >>> page.table(frame.set_index("source"), "Test split", highlight={"sirm": "single-class source"})
    >>> page.figure(roc_figure(curves), "ROC per source")
    >>> page.write("runs/x/report.html")
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from PIL import Image

from lungscreen import __version__
from lungscreen.io.files import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Level = Literal["ok", "warning", "fail"]
LEVELS: tuple[str, ...] = ("ok", "warning", "fail")
#: Rows to mark: ``{row label: reason}``, or a function of the row returning a reason or None.
Highlight = Mapping[Hashable, str] | Callable[[pd.Series], str | None]
#: Cells to mark: ``{(row label, column): reason}``.
CellMarks = Mapping[tuple[Hashable, Hashable], str]
#: Footnote symbols for the reasons a table marks rows or cells (then numbers).
_SYMBOLS = ("\u2020", "\u2021", "\u00a7", "\u00b6")
#: Figures are rendered at this dpi and shown at 96 dpi size, so they stay sharp on HiDPI screens and paper.
FIGURE_DPI = 144
#: Arrays are shrunk to this side before embedding: a full-field CXR would add megabytes per picture.
MAX_IMAGE_SIDE = 1024

#: Nothing may be fetched: pictures are data: URIs, the style is inline, there is no script.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_STYLE = """
:root { --ink: #1f2328; --muted: #57606a; --line: #d0d7de; --stripe: #f6f8fa; --mark: #fff1b8;
  --ok: #1a7f37; --ok-bg: #e8f6ec; --warning: #8a5a00; --warning-bg: #fff5d6; --fail: #b42318; --fail-bg: #fdecea; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 66rem; margin: 0 auto; padding: 1.5rem 1.25rem 3rem; }
h1 { font-size: 1.6rem; line-height: 1.25; margin: 0 0 .25rem; }
h2 { font-size: 1.25rem; margin: 2.25rem 0 .75rem; padding-bottom: .25rem; border-bottom: 1px solid var(--line); }
p { max-width: 48rem; }
.subtitle, footer, figcaption, caption, .marks { color: var(--muted); }
footer { margin-top: 3rem; padding-top: .5rem; border-top: 1px solid var(--line); font-size: .85rem; }
.verdict { margin: 1rem 0; padding: .75rem 1rem; border: 1px solid; border-left-width: 6px; border-radius: 6px; }
.verdict .level { font-weight: 700; letter-spacing: .05em; margin-right: .5rem; }
.verdict .headline { font-weight: 600; }
.verdict ul { margin: .4rem 0 0; padding-left: 1.25rem; }
.verdict.ok { border-color: var(--ok); background: var(--ok-bg); } .verdict.ok .level { color: var(--ok); }
.verdict.warning { border-color: var(--warning); background: var(--warning-bg); }
.verdict.warning .level { color: var(--warning); }
.verdict.fail { border-color: var(--fail); background: var(--fail-bg); } .verdict.fail .level { color: var(--fail); }
.note { max-width: 48rem; margin: 1rem 0; padding: .4rem .8rem; border-left: 4px solid var(--line);
  background: var(--stripe); font-size: .93rem; }
nav.contents ol { margin: .25rem 0; padding-left: 1.5rem; }
nav.contents a { color: inherit; }
.table { margin: 1rem 0 1.25rem; overflow-x: auto; }
table { border-collapse: collapse; font-size: .9rem; }
caption { caption-side: top; text-align: left; padding-bottom: .35rem; }
th, td { padding: .3rem .65rem; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
thead th { border-bottom: 2px solid #8c959f; white-space: nowrap; }
tbody th { font-weight: 600; white-space: nowrap; }
td { overflow-wrap: break-word; }
.num { text-align: right; font-variant-numeric: tabular-nums; overflow-wrap: normal; }
.num, .ci { white-space: nowrap; }
td.num:has(.ci) { white-space: normal; }
tbody tr:nth-child(even) { background: var(--stripe); }
tbody tr.marked, tbody td.marked { background: var(--mark); }
.ci { color: var(--muted); font-size: .88em; }
sup.mark { font-weight: 700; color: var(--warning); padding-left: .1em; line-height: 0; }
.marks { margin: .35rem 0 0; font-size: .85rem; }
figure { margin: 1.25rem 0; max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; }
figure.image { display: inline-block; vertical-align: top; margin: .75rem 1rem .75rem 0; }
figcaption { margin-top: .35rem; font-size: .88rem; max-width: 48rem; }
@media print {
  body { font-size: 10.5pt; } main { max-width: none; padding: 0; }
  .verdict, tr.marked, td.marked, .note { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  figure, .verdict, tr, .note { break-inside: avoid; } h2 { break-after: avoid; }
  .table { overflow: visible; } nav.contents { display: none; }
}
@page { margin: 14mm; }
""".strip()


class Page:
    """One HTML page built top to bottom: verdicts first, then sections of text, tables and pictures.

    Verdicts always render right under the title (in the order given), so a report can decide its verdict
    after it has laid out the evidence. Content added before the first :meth:`section` goes above it.
    """

    def __init__(self, title: str, *, subtitle: str | None = None) -> None:
        self.title = title
        self.subtitle = subtitle
        self._verdicts: list[str] = []
        self._sections: list[tuple[str | None, list[str]]] = [(None, [])]

    # -- content ---------------------------------------------------------------------------------------
    def verdict(self, level: Level, headline: str, items: Iterable[str] = ()) -> None:
        """A coloured box at the top: ``ok``, ``warning`` or ``fail``; the level is spelled out too, so it
        survives greyscale printing."""
        if level not in LEVELS:
            raise ValueError(f"verdict level must be one of {LEVELS}, not {level!r}")
        listed = "".join(f"<li>{_text(item)}</li>" for item in items)
        self._verdicts.append(
            f'<div class="verdict {level}" role="status"><span class="level">{level.upper()}</span>'
            f'<span class="headline">{_text(headline)}</span>{f"<ul>{listed}</ul>" if listed else ""}</div>')

    def section(self, title: str) -> None:
        """Start a new titled section; later content goes into it."""
        self._sections.append((title, []))

    def paragraph(self, text: str) -> None:
        self._add(f"<p>{_text(text)}</p>")

    def note(self, text: str) -> None:
        """A side remark set apart from the text (a caveat, how a figure was computed)."""
        self._add(f'<p class="note">{_text(text)}</p>')

    def table(self, data: pd.DataFrame | Sequence[Mapping[str, Any]], caption: str | None = None, *,
              highlight: Highlight | None = None, highlight_cells: CellMarks | None = None,
              digits: int = 3) -> None:
        """A table of a DataFrame (or of rows as dicts), numbers formatted to ``digits`` decimals.

        A cell holding an estimate (``{"value", "low", "high"}`` or an :class:`~lungscreen.evaluation.metrics.
        Estimate`) reads ``0.912 [0.870, 0.950]``. ``highlight`` marks whole rows (by index label, or a
        function of the row) and ``highlight_cells`` single cells (by ``(row label, column)``); each reason
        becomes a footnote symbol, so the mark survives printing. The index is shown unless it is 0..n-1.
        """
        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(list(data))
        self._add(_table_html(frame, caption, highlight, dict(highlight_cells or {}), digits))

    def figure(self, figure: Figure, caption: str | None = None, *, dpi: int = FIGURE_DPI) -> None:
        """Embed a matplotlib figure as PNG; the figure is closed if pyplot manages it (bare
        :class:`~matplotlib.figure.Figure` objects, as :mod:`lungscreen.audit.plots` makes, need no closing)."""
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor="white",
                       metadata={"Software": None})  # no version string: the same figure gives the same bytes
        _close(figure)
        self._picture(buffer.getvalue(), "image/png", caption, scale=96 / dpi, kind="plot")

    def image(self, picture: np.ndarray | bytes, caption: str | None = None, *,
              channels: Literal["rgb", "bgr"] = "rgb", max_side: int = MAX_IMAGE_SIDE) -> None:
        """Embed a picture: an array (grey, RGB or RGBA; uint8, uint16, bool or float in [0, 1]) or the bytes
        of a PNG or JPEG file. ``channels="bgr"`` for OpenCV-ordered arrays (``lungs.overlay`` writes BGR).
        Pictures larger than ``max_side`` are shrunk so a page with many of them stays small."""
        if isinstance(picture, (bytes, bytearray, memoryview)):
            encoded, mime = _encoded_picture(bytes(picture), max_side)
        else:
            encoded, mime = _png(_to_pil(np.asarray(picture), channels), max_side), "image/png"
        self._picture(encoded, mime, caption, scale=1.0, kind="image")

    # -- output ----------------------------------------------------------------------------------------
    def html(self) -> str:
        """The whole page as one string."""
        titled = [(i, title) for i, (title, _) in enumerate(self._sections) if title is not None]
        contents = ""
        if len(titled) >= 3:
            links = "".join(f'<li><a href="#section-{i}">{_text(title)}</a></li>' for i, title in titled)
            contents = f'<nav class="contents"><strong>Contents</strong><ol>{links}</ol></nav>'
        body = "\n".join(_section_html(i, title, parts) for i, (title, parts) in enumerate(self._sections)
                         if title is not None or parts)
        subtitle = f'<p class="subtitle">{_text(self.subtitle)}</p>' if self.subtitle else ""
        written = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="lungscreen {_text(__version__)}">
<title>{_text(self.title)}</title>
<link rel="icon" href="data:,">
<style>
{_STYLE}
</style>
</head>
<body>
<main>
<header><h1>{_text(self.title)}</h1>{subtitle}</header>
{"".join(self._verdicts)}
{contents}
{body}
<footer>Written by lungscreen {_text(__version__)} on {written}. This page is self-contained: its pictures are
embedded and it loads nothing from the network.</footer>
</main>
</body>
</html>
"""

    def write(self, path: str | Path) -> Path:
        """Write the page atomically (a reader never sees half a page) and return its path."""
        text = self.html()
        with atomic_path(path) as temporary:
            temporary.write_text(text, encoding="utf-8")
        return Path(path)

    # -- helpers ---------------------------------------------------------------------------------------
    def _add(self, fragment: str) -> None:
        self._sections[-1][1].append(fragment)

    def _picture(self, encoded: bytes, mime: str, caption: str | None, *, scale: float, kind: str) -> None:
        width, height = (round(side * scale) for side in _picture_size(encoded))
        source = f"data:{mime};base64,{base64.b64encode(encoded).decode('ascii')}"
        alt = _text(caption or kind)
        caption_html = f"<figcaption>{_text(caption)}</figcaption>" if caption else ""
        style = f' style="width:{max(width, 160)}px"' if kind == "image" else ""
        self._add(f'<figure class="{kind}"{style}><img src="{source}" width="{width}" height="{height}" '
                  f'alt="{alt}">{caption_html}</figure>')


# -- formatting ----------------------------------------------------------------------------------------------
def format_value(value: Any, digits: int = 3) -> str:
    """Plain text of a table cell or legend entry: numbers to ``digits`` decimals, missing ones ``n/a``;
    estimates with their interval, worded as :class:`~lungscreen.evaluation.metrics.Estimate` prints them
    (``undefined`` on the test set, ``[no interval]`` when no resample defined it)."""
    estimate = _estimate(value)
    if estimate is not None:
        return _estimate_text(estimate, digits, interval=lambda low, high: f"[{low}, {high}]")
    if value is None or value is pd.NA or value is pd.NaT:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return "n/a"
        if number != 0 and abs(number) < 0.5 * 10 ** -digits:
            return f"{number:.{max(digits - 1, 1)}e}"  # a tiny p-value must not print as 0.000
        return f"{number:.{digits}f}"
    return str(value)


def _estimate(value: Any) -> tuple[Any, Any, Any] | None:
    if isinstance(value, Mapping):
        return (value["value"], value["low"], value["high"]) if {"value", "low", "high"} <= value.keys() else None
    if all(hasattr(value, name) for name in ("value", "low", "high")):
        return value.value, value.low, value.high
    return None


def _is_number(value: Any) -> bool:
    return _estimate(value) is not None or (isinstance(value, numbers.Number) and not isinstance(value, bool))


def _estimate_text(estimate: tuple[Any, Any, Any], digits: int, interval: Callable[[str, str], str]) -> str:
    middle, low, high = (format_value(part, digits) for part in estimate)
    if middle == "n/a":
        return "undefined"
    return f"{middle} {interval(low, high) if 'n/a' not in (low, high) else '[no interval]'}"


def _cell_html(value: Any, digits: int) -> str:
    estimate = _estimate(value)
    if estimate is None:
        return _text(format_value(value, digits))
    return _estimate_text(estimate, digits, lambda low, high: f'<span class="ci">[{low}, {high}]</span>')


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


# -- tables ----------------------------------------------------------------------------------------------
class _Footnotes:
    """Reasons for marks, each given a symbol in order of first use, listed under the table."""

    def __init__(self) -> None:
        self.symbols: dict[str, str] = {}

    def mark(self, reason: str | None) -> str:
        if not reason:
            return ""
        count = len(self.symbols)
        symbol = self.symbols.setdefault(reason, _SYMBOLS[count] if count < len(_SYMBOLS) else str(count + 1))
        return f'<sup class="mark" title="{_text(reason)}">{_text(symbol)}</sup>'

    def html(self) -> str:
        lines = "<br>".join(f"{_text(symbol)} {_text(reason)}" for reason, symbol in self.symbols.items())
        return f'<p class="marks">{lines}</p>' if lines else ""


def _table_html(frame: pd.DataFrame, caption: str | None, highlight: Highlight | None,
                cells: CellMarks, digits: int) -> str:
    show_index = frame.index.name is not None or not frame.index.equals(pd.RangeIndex(len(frame)))
    numeric = {column: _numeric_column(frame[column]) for column in frame.columns}
    row_marks = _row_marks(frame, highlight)
    _check_labels(frame, row_marks, cells)
    notes = _Footnotes()
    head = [f"<th>{_text(frame.index.name or '')}</th>"] if show_index else []
    head += [f"<th{_classes(num=numeric[c])}>{_text(_column_name(c))}</th>" for c in frame.columns]
    rows = []
    for label, row in frame.iterrows():
        reason = row_marks.get(label)
        parts = [f"<th>{_text(format_value(label, digits))}{notes.mark(reason)}</th>"] if show_index else []
        for position, column in enumerate(frame.columns):
            cell_reason = cells.get((label, column))
            row_mark = notes.mark(reason) if position == 0 and not show_index else ""  # the row's mark, once
            parts.append(f"<td{_classes(num=numeric[column], marked=bool(cell_reason))}>"
                         f"{_cell_html(row[column], digits)}{row_mark}{notes.mark(cell_reason)}</td>")
        marked = f' class="marked" title="{_text(reason)}"' if reason else ""
        rows.append(f"<tr{marked}>{''.join(parts)}</tr>")
    caption_html = f"<caption>{_text(caption)}</caption>" if caption else ""
    return (f'<div class="table"><table>{caption_html}<thead><tr>{"".join(head)}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>{notes.html()}</div>')


def _classes(**wanted: bool) -> str:
    names = " ".join(name for name, on in wanted.items() if on)
    return f' class="{names}"' if names else ""


def _numeric_column(column: pd.Series) -> bool:
    """Right-align a column of numbers or estimates (missing cells allowed), not one of text."""
    values = list(column)
    return any(map(_is_number, values)) and all(_is_number(v) or _missing(v) for v in values)


def _row_marks(frame: pd.DataFrame, highlight: Highlight | None) -> dict[Hashable, str]:
    if highlight is None:
        return {}
    if callable(highlight):
        found = ((label, highlight(row)) for label, row in frame.iterrows())
        return {label: reason for label, reason in found if reason}
    return dict(highlight)


def _check_labels(frame: pd.DataFrame, rows: Mapping[Hashable, str], cells: CellMarks) -> None:
    """A mark for a row that is not there is a typo that would silently drop a warning: say so."""
    labels = set(frame.index)
    unknown = [label for label in rows if label not in labels]
    unknown += [key for key in cells if key[0] not in labels or key[1] not in frame.columns]
    if unknown:
        raise KeyError(f"marks for rows or cells not in the table: {unknown} (rows are {list(frame.index)[:10]})")


def _column_name(column: Hashable) -> str:
    return " / ".join(map(str, column)) if isinstance(column, tuple) else str(column)


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _section_html(number: int, title: str | None, parts: list[str]) -> str:
    heading = f'<h2 id="section-{number}">{_text(title)}</h2>' if title is not None else ""
    return f"<section>{heading}{''.join(parts)}</section>"


# -- pictures ----------------------------------------------------------------------------------------------
def _close(figure: Figure) -> None:
    """Free a pyplot-managed figure (pyplot keeps it alive otherwise); a bare Figure is freed with its last
    reference. pyplot is imported only when the figure came from it, i.e. it is imported already."""
    if getattr(figure.canvas, "manager", None) is not None:
        import matplotlib.pyplot as plt

        plt.close(figure)


def _to_pil(array: np.ndarray, channels: str) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"a picture must be grey (H, W) or colour (H, W, 3|4), not shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        array = np.round(np.clip(np.nan_to_num(array), 0.0, 1.0) * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 3 and channels == "bgr":
        array = np.concatenate([array[:, :, 2::-1], array[:, :, 3:]], axis=2)
    return Image.fromarray(np.ascontiguousarray(array))


def _png(image: Image.Image, max_side: int) -> bytes:
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _encoded_picture(data: bytes, max_side: int) -> tuple[bytes, str]:
    """PNG or JPEG bytes as they are when small enough; otherwise shrunk and re-encoded as PNG."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:  # Pillow raises several types for bad bytes
        raise ValueError(f"picture bytes are not a readable image: {error}") from error
    if image.format in ("PNG", "JPEG") and max(image.size) <= max_side:
        return data, f"image/{image.format.lower()}"
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
        image = image.convert("RGB")  # CMYK, YCbCr, ...: PNG cannot hold them
    return _png(image, max_side), "image/png"


def _picture_size(encoded: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(encoded)) as image:
        return image.size
