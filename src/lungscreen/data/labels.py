"""Canonical labels and the three task label maps the papers use.

Every adapter maps its source's wording onto one *canonical* label (below) and keeps the original detail
(organism, "COVID-19, ARDS", ...) as ``fine_label``. A *task* then maps canonical labels onto its class
names; a canonical label a task does not know is left out of that task, never guessed.

Example:
    >>> canonical_from_finding("Pneumonia/Bacterial/Streptococcus")
    ('bacterial', 'Streptococcus')
    >>> TASKS["covidx"].class_of("bacterial")
    'pneumonia'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lungscreen.errors import ManifestError

NORMAL = "normal"
BACTERIAL = "bacterial"
VIRAL = "viral"
FUNGAL = "fungal"
PNEUMONIA = "pneumonia"  # pneumonia of unstated cause (RSNA opacity, NIH "Pneumonia", Kermany "PNEUMONIA")
COVID = "COVID-19"
OTHER = "other"  # a finding that is not pneumonia (ARDS alone, lipoid, tuberculosis, ...)
UNKNOWN = "unknown"  # blank or pending: not normal, not anything

CANONICAL_LABELS = (NORMAL, BACTERIAL, VIRAL, FUNGAL, PNEUMONIA, COVID, OTHER, UNKNOWN)


@dataclass(frozen=True)
class Task:
    """A classification task: its class names, in order, and the canonical labels each one takes."""

    name: str
    classes: tuple[str, ...]
    mapping: dict[str, str]
    description: str

    def class_of(self, canonical: str) -> str | None:
        """The task's class for a canonical label, or None when the task leaves that label out."""
        return self.mapping.get(canonical)

    def index_of(self, canonical: str) -> int | None:
        """The class index for a canonical label, or None when left out."""
        name = self.class_of(canonical)
        return None if name is None else self.classes.index(name)


TASKS: dict[str, Task] = {
    "covidx": Task(
        "covidx",
        ("normal", "pneumonia", "COVID-19"),
        {NORMAL: "normal", BACTERIAL: "pneumonia", VIRAL: "pneumonia", FUNGAL: "pneumonia", PNEUMONIA: "pneumonia", COVID: "COVID-19"},
        "COVIDx 3-class (COVID-Net, paper 004): normal / non-COVID pneumonia / COVID-19",
    ),
    "covid-resnet": Task(
        "covid-resnet",
        ("normal", "bacterial", "viral", "COVID-19"),
        {NORMAL: "normal", BACTERIAL: "bacterial", VIRAL: "viral", COVID: "COVID-19"},
        "COVID-ResNet 4-class (paper 003): normal / bacterial / viral / COVID-19",
    ),
    "binary": Task(
        "binary",
        ("non-COVID", "COVID-19"),
        {NORMAL: "non-COVID", BACTERIAL: "non-COVID", VIRAL: "non-COVID", FUNGAL: "non-COVID", PNEUMONIA: "non-COVID",
         OTHER: "non-COVID", COVID: "COVID-19"},
        "binary COVID+/- (papers 000, 002): COVID-19 against everything else",
    ),
}


def get_task(name: str) -> Task:
    """Look a task up by name with a clear error."""
    try:
        return TASKS[name]
    except KeyError:
        raise ManifestError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


# Organisms and findings as they are spelt in Cohen's metadata (old and new versions), Kermany and others.
_BACTERIA = {
    "streptococcus", "klebsiella", "legionella", "mycoplasma", "e.coli", "e. coli", "escherichia coli",
    "chlamydophila", "staphylococcus", "staphylococcus aureus", "mrsa", "nocardia", "bacterial",
    "mycoplasma bacterial pneumonia", "haemophilus influenzae", "pseudomonas", "bacteria",
}
_VIRUSES = {"sars", "mers", "mers-cov", "influenza", "varicella", "herpes", "viral", "virus", "h1n1", "rsv", "adenovirus"}
_FUNGI = {"pneumocystis", "aspergillosis", "histoplasmosis", "fungal", "pcp"}
_NORMAL = {"no finding", "normal", "no findings", "no_findings", "healthy"}
_UNKNOWN = {"", "todo", "unknown", "pending", "nan", "none"}
_OTHER = {"ards", "lipoid", "tuberculosis", "other"}
_COVID = re.compile(r"covid|sars-cov-2|2019-ncov", re.IGNORECASE)


def canonical_from_finding(finding: object) -> tuple[str, str]:
    """Map a free-text finding onto (canonical label, fine label).

    Handles Cohen's June-2020 wording ("COVID-19, ARDS", "Streptococcus") and the newer hierarchy
    ("Pneumonia/Viral/COVID-19", "Pneumonia/Bacterial/Streptococcus"). Blank means pending: ``unknown``.
    """
    text = "" if finding is None or (isinstance(finding, float) and finding != finding) else str(finding).strip()
    lowered = text.lower()
    if lowered in _UNKNOWN:
        return UNKNOWN, text
    if _COVID.search(text):
        return COVID, text
    parts = [part.strip().lower() for part in re.split(r"[/,]", lowered) if part.strip()]
    fine = text.split("/")[-1].strip() if "/" in text else text
    if lowered in _NORMAL:
        return NORMAL, text
    for part in reversed(parts):  # the most specific word decides
        if part in _FUNGI:
            return FUNGAL, fine
        if part in _VIRUSES:
            return VIRAL, fine
        if part in _BACTERIA or part.split()[0] in _BACTERIA:
            return BACTERIAL, _organism(fine)
    if parts and parts[-1] in _OTHER:
        return OTHER, fine
    if "pneumonia" in lowered or "opacity" in lowered:  # RSNA / Radiography "Lung Opacity" = pneumonia (COVIDx)
        return PNEUMONIA, fine
    return OTHER, fine


def _organism(fine: str) -> str:
    """'Mycoplasma Bacterial Pneumonia' -> 'Mycoplasma'; organism names pass through."""
    words = fine.split()
    return words[0] if len(words) > 1 and words[1].lower() == "bacterial" else fine
