"""Canonical labels and the task maps that turn a manifest row into a training target.

Every adapter maps its source's wording onto one *canonical* label (below) and keeps the original detail
(organism, "COVID-19, ARDS", ...) as ``fine_label``. A *task* then maps the value of one manifest column
onto its classes; a value a task does not know is left out of that task, never guessed. Three kinds:

* ``multiclass`` (the papers' tasks ``covidx``, ``covid-resnet``, ``binary``): a label -> one class;
* ``multilabel`` (``findings``): a label -> the set of findings it implies (a COVID-19 pneumonia is a
  pneumonia too);
* ``segmentation`` (``lungs``): a row's ``mask_convention`` -> the output channel its mask teaches;
  ``nested`` pairs say one channel's region lies inside another's, which gives partial targets for the
  other channel (see :meth:`Task.segmentation_targets`).

Example:
    >>> canonical_from_finding("Pneumonia/Bacterial/Streptococcus")
    ('bacterial', 'Streptococcus')
    >>> TASKS["covidx"].class_of("bacterial")
    'pneumonia'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

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

HEART_EXCLUDED = "heart-excluded"
BEHIND_HEART = "behind-heart-included"
#: ``mask_convention`` value -> which lungs the masks draw (public mask sets disagree; see lungscreen.lungs).
MASK_CONVENTIONS = {
    HEART_EXCLUDED: "visible lung fields only; heart and mediastinum left out (OpenIST, Montgomery, Shenzhen, "
                    "COVID-19 Radiography Database masks)",
    BEHIND_HEART: "whole lungs including the region behind the heart, down to the diaphragm (v7labs)",
}


TaskKind = Literal["multiclass", "multilabel", "segmentation", "detection"]
TASK_KINDS: tuple[str, ...] = ("multiclass", "multilabel", "segmentation", "detection")


@dataclass(frozen=True)
class Task:
    """A target: its class names, in order, and what each value of the task's manifest column becomes.

    Attributes:
        name: task name.
        classes: output names in order (classes, labels or mask channels).
        mapping: column value -> class (multiclass, segmentation) or tuple of classes (multilabel).
        description: one line for tables.
        kind: ``multiclass``, ``multilabel``, ``segmentation`` or ``detection`` (boxes: of findings, from the
            ``boxes`` column, on the rows with such boxes and on normal images; of the lungs when ``column``
            is ``mask_convention``, drawn around the mask's lungs).
        column: the manifest column the mapping reads (``label``; ``mask_convention`` for segmentation).
        nested: (inner, outer) channel pairs whose regions nest (segmentation).
    """

    name: str
    classes: tuple[str, ...]
    mapping: dict[str, Any]
    description: str = ""
    kind: TaskKind = "multiclass"
    column: str = "label"
    nested: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain data (stored in a checkpoint's inference spec, so a run is evaluated on its own task)."""
        return {"name": self.name, "classes": list(self.classes), "kind": self.kind, "column": self.column,
                "mapping": {k: list(v) if isinstance(v, tuple) else v for k, v in self.mapping.items()},
                "nested": [list(pair) for pair in self.nested], "description": self.description}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        kind = data.get("kind", "multiclass")
        mapping = {str(k): tuple(v) if kind == "multilabel" else str(v) for k, v in data["mapping"].items()}
        return cls(str(data["name"]), tuple(data["classes"]), mapping, str(data.get("description", "")), kind,
                   str(data.get("column", "label")), tuple(tuple(pair) for pair in data.get("nested", [])))

    def class_of(self, value: str) -> Any:
        """The task's class (or classes) for a column value, or None when the task leaves that value out."""
        return self.mapping.get(value)

    @property
    def combinations(self) -> list[tuple[str, ...]]:
        """Multi-label: the distinct class sets the mapping produces, in mapping order."""
        return list(dict.fromkeys(tuple(v) for v in self.mapping.values()))

    def index_of(self, value: str) -> int | None:
        """The integer target of a value: its class index, or (multi-label) the index of its class set in
        :attr:`combinations`, which is what class balancing counts. None when left out."""
        target = self.class_of(value)
        if target is None:
            return None
        return self.combinations.index(tuple(target)) if self.kind == "multilabel" else self.classes.index(target)

    def multi_hot(self, index: int) -> np.ndarray:
        """float32 (classes,) with 1 for every class of combination ``index`` (multi-label)."""
        hot = np.zeros(len(self.classes), np.float32)
        for name in self.combinations[index]:
            hot[self.classes.index(name)] = 1.0
        return hot

    def segmentation_targets(self, channel: int, lung: np.ndarray, ignore: np.ndarray | None = None
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(target, known, labelled) for a mask that draws channel ``channel``.

        ``target`` and ``known`` are float32 (classes, H, W); ``labelled`` bool (classes,) marks the channel
        the mask fully teaches. ``ignore`` pixels are unknown everywhere. For each nested pair, a mask of the
        inner region makes its pixels known-positive in the outer channel, and a mask of the outer region
        makes the pixels outside it known-negative in the inner channel; the rest of the other channel stays
        unknown (no loss, no gradient).
        """
        lung = np.asarray(lung, bool)
        valid = ~np.asarray(ignore, bool) if ignore is not None else np.ones_like(lung)
        target = np.zeros((len(self.classes), *lung.shape), np.float32)
        known = np.zeros_like(target)
        labelled = np.zeros(len(self.classes), bool)
        target[channel], known[channel], labelled[channel] = lung, valid, True
        for inner, outer in self.nested:
            i, o = self.classes.index(inner), self.classes.index(outer)
            if channel == i:
                target[o] = known[o] = lung & valid
            elif channel == o:
                known[i] = ~lung & valid
        return target, known, labelled


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
    "findings": Task(
        "findings",
        ("pneumonia", "COVID-19"),
        {NORMAL: (), BACTERIAL: ("pneumonia",), VIRAL: ("pneumonia",), FUNGAL: ("pneumonia",), PNEUMONIA: ("pneumonia",),
         COVID: ("pneumonia", "COVID-19")},
        "multi-label findings (CheXNet style, paper 001): pneumonia, and COVID-19 as a pneumonia",
        kind="multilabel",
    ),
    "lesion-boxes": Task(
        "lesion-boxes",
        ("opacity",),
        {label: "opacity" for label in (NORMAL, BACTERIAL, VIRAL, FUNGAL, PNEUMONIA, COVID, OTHER)},
        "finding boxes (MultiCheXNet's detection head, paper 001): rows with boxes of findings (lung boxes left "
        "out), and normal images as images without any",
        kind="detection",
    ),
    "lung-boxes": Task(
        "lung-boxes",
        ("lung",),
        {HEART_EXCLUDED: "lung", BEHIND_HEART: "lung"},
        "one box per lung, drawn around each lung of the reference mask after augmentation (paper 001's joint "
        "training: boxes from masks)",
        kind="detection", column="mask_convention",
    ),
    "lungs": Task(
        "lungs",
        (HEART_EXCLUDED, BEHIND_HEART),
        {HEART_EXCLUDED: HEART_EXCLUDED, BEHIND_HEART: BEHIND_HEART},
        "lung masks, one channel per mask convention (heart-excluded lies inside behind-heart-included)",
        kind="segmentation", column="mask_convention", nested=((HEART_EXCLUDED, BEHIND_HEART),),
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
