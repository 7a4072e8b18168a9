"""``lungscreen audit``: does the model read the lungs, or the hospital?

Papers 000 and 004 warn that a COVID-19 model can score well by recognising where an image comes from
(a source's text markers, exposure, borders, children's chests) instead of the disease. The audit looks
for that four ways, on held-out images, and states a verdict with the thresholds it used:

(a) **Features by source and label**: a t-SNE map (scikit-learn) of the model's embedding, coloured by
    source and by label. Clusters by source within one label are a warning sign to look at.
(b) **Source probe**: a logistic regression predicting the source from the embedding, cross-validated
    *within each label* (so the label cannot explain it), reported as accuracy above the within-label
    chance level (the largest source's share), with a 95 % bootstrap interval over the images.
(c) **Lung attention**: the share of the raw Grad-CAM mass inside the lung mask divided by the share of
    the input the lungs cover (:func:`lungscreen.audit.cams.lung_attention_ratio`), for the map of each
    image's true class, per class and per source: 1 means the model looks everywhere alike, below 1 that
    it looks elsewhere. The verdict reads the disease class (COVID-19 where the task has it): the class
    whose evidence should sit in the lungs.
(d) **Masking test**: the same images with everything outside the lungs replaced by the image's mean, and
    with the lungs replaced instead. A model reading the lungs keeps its skill without the background and
    loses it without the lungs; one that keeps its skill when the lungs are gone reads the background.
    Skill is the macro AUC above chance (0.5): it needs no threshold, so an operating point chosen for a
    high sensitivity on a small validation split cannot hide what the model knows.

Lung masks come from the lung segmenter (the trained U-Net when installed, else the classical fallback,
as the report says), drawn on the original image and carried through the run's own preprocessing, so
they cover the same pixels as the model's input. Each lung is then replaced by its convex hull: a dense
consolidation looks like tissue, not air, and segmenters often cut it out of the lung; hiding "the lungs"
must hide the opacity inside them too, or the masking test would measure the segmenter's misses.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungscreen.errors import ConfigError, LungscreenError
from lungscreen.evaluation.metrics import bootstrap_ci, classification_figures
from lungscreen.inference.predict import Predictor
from lungscreen.io.files import atomic_path
from lungscreen.io.images import read_image
from lungscreen.preprocessing import Sample
from lungscreen.preprocessing.model_input import prepare, to_tensor

#: Key of the audit's lung mask in a sample (drawn on the original image, moved by preprocessing).
AUDIT_LUNGS = "audit_lungs"


@dataclass(frozen=True)
class Thresholds:
    """When each check fires, and why these values (stated in the report).

    Attributes:
        probe_margin: the source probe fires when its within-label accuracy exceeds chance by at least
            this much *and* the interval's lower bound exceeds chance: acquisition differences leave some
            trace in any embedding, so a small excess is expected; a large one means the model encodes
            the source.
        attention_ratio: the attention check fires when the median lung-attention ratio is below this: 1
            is a map spread evenly, so a model that puts less than its fair share on the lungs looks
            elsewhere.
        retained_skill: the masking check fires when, with the lungs hidden, the model keeps at least this
            share of its skill above chance (the focus class's AUC minus 0.5, else the macro AUC's); reading
            the lungs, it should lose most of it. The focus class, as for lung attention: a shortcut for
            COVID-19 alone is diluted to a third in a three-class macro AUC.
        min_skill: below this macro AUC above chance the model has too little skill to test by masking (the
            report says so instead of judging).
    """

    probe_margin: float = 0.2
    attention_ratio: float = 1.0
    retained_skill: float = 0.5
    min_skill: float = 0.1


@dataclass
class AuditData:
    """What the audit measures on: one row per image, its embedding, model input and lung mask."""

    table: pd.DataFrame
    features: np.ndarray
    inputs: list[np.ndarray]
    lungs: list[np.ndarray]
    lung_method: str


@dataclass
class AuditResult:
    """Every measurement of an audit, and the verdict."""

    data: AuditData
    classes: list[str]
    embedding: np.ndarray
    probe: list[dict[str, Any]]
    attention: pd.DataFrame
    masking: dict[str, Any]
    thresholds: Thresholds
    focus: str | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unjudged: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        """A check fired: a shortcut is suspected."""
        return bool(self.warnings)

    @property
    def verdict(self) -> str:
        """``shortcut suspected`` (a check fired), ``not enough skill to judge`` (none fired, but one or more
        could not be judged: a model without skill, or data that cannot test it) or ``no shortcut found``
        (every check judged, none fired). Never the last while a check is missing."""
        if self.warnings:
            return "shortcut suspected"
        return "not enough skill to judge" if self.unjudged else "no shortcut found"

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict,
                "warnings": self.warnings, "notes": self.notes, "unjudged": self.unjudged,
                "thresholds": self.thresholds.__dict__,
                "images": int(len(self.data.table)), "lung_masks": self.data.lung_method,
                "source_probe": self.probe, "attention": _attention_summary(self.attention),
                "masking": self.masking}


# ---------------------------------------------------------------------------------------------------------
# Collecting
# ---------------------------------------------------------------------------------------------------------

def lung_region(mask: np.ndarray) -> np.ndarray:
    """Each connected lung replaced by its convex hull (consolidations and holes included)."""
    from skimage.morphology import convex_hull_object

    return convex_hull_object(mask, connectivity=2) if mask.any() else mask


def sample_rows(rows: pd.DataFrame, max_images: int, seed: int = 0) -> pd.DataFrame:
    """At most ``max_images`` rows, the same share of every (source, class) cell, chosen by seed."""
    if len(rows) <= max_images:
        return rows.reset_index(drop=True)
    share = max_images / len(rows)
    picked = [cell.sample(max(1, round(len(cell) * share)), random_state=seed)
              for _, cell in rows.groupby(["source", "target"], sort=True)]
    return pd.concat(picked).sort_index().reset_index(drop=True)


def collect(predictor: Predictor, rows: pd.DataFrame, *, batch_size: int = 32,
            progress: Callable[[int], None] | None = None, segmenter: Any = None) -> AuditData:
    """Prepare every row with its lung mask (drawn by ``segmenter``, else the run's own), and compute its
    embedding and probabilities."""
    import torch

    from lungscreen.audit.explain import lung_segmenter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        segmenter = segmenter or lung_segmenter(predictor)
    lung_method = getattr(segmenter, "method", "unknown")
    if caught:
        lung_method += " (no trained lung model installed)"
    pipeline, spec = predictor.pipeline, predictor.spec
    kept, inputs, lungs, errors = [], [], [], []
    for index, row in enumerate(rows.itertuples(index=False)):
        try:
            pixels = read_image(row.image_path).pixels
            mask = lung_region(np.asarray(segmenter.segment(pixels), bool))
            sample = prepare(Sample(pixels, {AUDIT_LUNGS: mask}), spec.input, pipeline)
        except LungscreenError as error:  # a bad image is left out with its reason, the rest go on
            errors.append((row.image_path, str(error)))
        else:
            kept.append(index)
            inputs.append(sample.image)
            lungs.append(sample.masks[AUDIT_LUNGS])
        if progress is not None:
            progress(index + 1)
    if not kept:
        raise ConfigError(f"no image could be prepared for the audit (e.g. {errors[0][1]})" if errors
                          else "no image to audit")
    table = rows.iloc[kept].reset_index(drop=True).copy()
    table["truth"] = table["target_name"]
    features, probabilities = [], []
    model = predictor.model
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            batch = to_tensor(inputs[start:start + batch_size], spec.input)
            embedding = model.features(batch)
            features.append(embedding.float().numpy())
            probabilities.append(spec.activate(model.classifier(embedding)).numpy())
    probabilities = np.concatenate(probabilities)
    for column, name in enumerate(predictor.class_names):
        table[name] = probabilities[:, column]
    table["prediction"] = [predictor.decide(p) for p in probabilities]
    return AuditData(table, np.concatenate(features), inputs, lungs, lung_method)


# ---------------------------------------------------------------------------------------------------------
# (a) t-SNE, (b) source probe
# ---------------------------------------------------------------------------------------------------------

def embed_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """t-SNE of standardised features (perplexity adapted to small sets)."""
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    if len(features) < 5:
        return np.zeros((len(features), 2))
    scaled = StandardScaler().fit_transform(features)
    perplexity = float(min(30, max(2, (len(features) - 1) / 4)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(scaled)


def source_probe(features: np.ndarray, table: pd.DataFrame, *, folds: int = 5, seed: int = 0,
                 min_per_source: int = 5) -> list[dict[str, Any]]:
    """Per label: how well a logistic regression tells the sources apart from the embedding (cross-validated),
    against the within-label chance level. Labels with fewer than two sources of ``min_per_source`` images
    are listed as not testable."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    results = []
    for label, rows in table.groupby("truth", sort=True):
        counts = rows["source"].value_counts()
        usable = counts[counts >= min_per_source]
        entry: dict[str, Any] = {"label": str(label), "sources": {str(k): int(v) for k, v in counts.items()}}
        if len(usable) < 2:
            entry["testable"] = False
            results.append(entry)
            continue
        keep = rows["source"].isin(usable.index).to_numpy()
        index = rows.index.to_numpy()[keep]
        sources = rows["source"].to_numpy()[keep]
        splits = min(folds, int(usable.min()))
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        predicted = cross_val_predict(model, features[index], sources,
                                      cv=StratifiedKFold(splits, shuffle=True, random_state=seed))
        correct = (predicted == sources).astype(float)
        chance = float(usable.max() / usable.sum())
        accuracy = bootstrap_ci(correct, seed=seed, groups=rows["patient_id"].to_numpy()[keep])
        entry.update(testable=True, images=int(keep.sum()), folds=splits, chance=chance, accuracy=accuracy.as_dict(),
                     excess=accuracy.value - chance)
        results.append(entry)
    return results


# ---------------------------------------------------------------------------------------------------------
# (c) lung attention, (d) masking
# ---------------------------------------------------------------------------------------------------------

def lung_attention(predictor: Predictor, data: AuditData, *, method: str = "gradcam",
                   batch_size: int = 16) -> pd.DataFrame:
    """The lung-attention ratio of every image's raw map for its true class (why it is what it is)."""
    from lungscreen.audit.cams import class_activation_maps, lung_attention_ratio

    targets = data.table["target"].astype(int).tolist()
    ratios = []
    for start in range(0, len(data.inputs), batch_size):
        batch = to_tensor(data.inputs[start:start + batch_size], predictor.spec.input)
        maps = class_activation_maps(predictor.model, batch, targets[start:start + batch_size], method)
        for cam, lungs in zip(maps, data.lungs[start:start + batch_size], strict=True):
            ratios.append(lung_attention_ratio(cam, lungs))
    return pd.DataFrame({"source": data.table["source"], "truth": data.table["truth"], "ratio": ratios})


def focus_class(predictor: Predictor) -> str | None:
    """The class whose evidence should lie in the lungs: the operating point's, else COVID-19, else the
    disease of a normal-against-disease task; None (every image) otherwise."""
    point, classes = predictor.spec.operating_point, predictor.class_names
    if point is not None:
        return point.positive_class
    if "COVID-19" in classes:
        return "COVID-19"
    others = [name for name in classes if name not in ("normal", "non-COVID")]
    return others[0] if len(classes) == 2 and len(others) == 1 else None


def masked(picture: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The picture with every pixel outside ``keep`` replaced by the picture's mean."""
    out = picture.copy()
    out[~keep] = np.uint8(round(float(picture.mean())))
    return out


def masking_test(predictor: Predictor, data: AuditData, thresholds: Thresholds, batch_size: int = 32,
                 focus: str | None = None) -> dict[str, Any]:
    """Skill of the model (the ``focus`` class's AUC above 0.5, else the macro AUC's) on the images as they are,
    with only the lungs, and with the lungs hidden; agreement of its answers with the original ones."""
    classes = predictor.class_names
    truth_names = set(data.table["truth"].astype(str))
    measure = f"auc/{focus}" if focus in classes and focus in truth_names and len(truth_names) > 1 else "macro_auc"
    truth = data.table["target"].to_numpy(dtype=np.int64)
    results: dict[str, Any] = {"chance": 0.5}
    variants = {"original": data.inputs,
                "lungs only": [masked(p, m) for p, m in zip(data.inputs, data.lungs, strict=True)],
                "lungs hidden": [masked(p, ~m) for p, m in zip(data.inputs, data.lungs, strict=True)]}
    answers = {}
    for name, pictures in variants.items():
        scores = _probabilities(predictor, pictures, batch_size)
        answers[name] = scores.argmax(axis=1)
        figures = classification_figures(truth, scores, classes, y_pred=answers[name])
        results[name] = {"macro_auc": figures["macro_auc"], "auc": figures[measure],
                         "balanced_accuracy": figures["balanced_accuracy"],
                         "agreement_with_original": float(np.mean(answers[name] == answers.get("original", answers[name])))}
    results["measure"] = f"{focus} AUC" if measure != "macro_auc" else "macro AUC"
    skill = results["original"]["auc"] - 0.5
    results["skill"] = skill
    for name in ("lungs only", "lungs hidden"):
        kept = results[name]["auc"] - 0.5
        results[name]["retained_skill"] = kept / skill if skill > 0 else float("nan")
    results["testable"] = bool(np.isfinite(skill) and skill >= thresholds.min_skill)
    return results


def _probabilities(predictor: Predictor, pictures: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(pictures), batch_size):
            batch = to_tensor(pictures[start:start + batch_size], predictor.spec.input)
            out.append(predictor.spec.activate(predictor.model(batch)).numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------------
# The verdict
# ---------------------------------------------------------------------------------------------------------

def judge(result: AuditResult) -> None:
    """Fill the result's warnings (what fired, with the number and the threshold) and notes."""
    limits = result.thresholds
    for entry in result.probe:
        if not entry.get("testable"):
            continue
        low = entry["accuracy"]["low"]
        if entry["excess"] >= limits.probe_margin and low > entry["chance"]:
            result.warnings.append(
                f"source probe: among {entry['label']} images the embedding tells the sources apart with accuracy "
                f"{entry['accuracy']['value']:.2f} [{low:.2f}, {entry['accuracy']['high']:.2f}] against chance "
                f"{entry['chance']:.2f} (fires at +{limits.probe_margin:.2f} with the interval above chance)")
    if not any(entry.get("testable") for entry in result.probe):
        result.unjudged.append("source probe not testable: no label holds images of two sources (five or more each)")
    attention = result.attention
    if result.focus is not None and (attention["truth"] == result.focus).any():
        attention = attention[attention["truth"] == result.focus]
    ratios = attention["ratio"].dropna()
    if not len(ratios):
        result.unjudged.append("lung attention not judged: no image with lungs found to measure it on")
    elif not result.masking["testable"]:
        result.unjudged.append("lung attention not judged: a model without skill draws maps of noise")
    else:
        median = float(ratios.median())
        if median < limits.attention_ratio:
            result.warnings.append(f"lung attention: median ratio {median:.2f} on {result.focus or 'all'} images "
                                   f"(below {limits.attention_ratio:.1f}: the maps put less than their fair share "
                                   "on the lungs)")
    masking = result.masking
    if not masking["testable"]:
        result.unjudged.append(f"masking test not judged: the model's {masking['measure']} is only {masking['skill']:.2f} "
                               f"above chance (needs {limits.min_skill:.2f})")
    elif masking["lungs hidden"]["retained_skill"] >= limits.retained_skill:
        result.warnings.append(
            f"masking: with the lungs hidden the model keeps {masking['lungs hidden']['retained_skill']:.0%} of its "
            f"skill above chance ({masking['measure']} {masking['lungs hidden']['auc']:.2f} vs "
            f"{masking['original']['auc']:.2f}; fires at {limits.retained_skill:.0%}): it reads the background")


def audit(predictor: Predictor, rows: pd.DataFrame, *, max_images: int = 300, method: str = "gradcam",
          thresholds: Thresholds = Thresholds(), seed: int = 0,
          progress: Callable[[int], None] | None = None, segmenter: Any = None) -> AuditResult:
    """Run every check on (a stratified sample of) the rows and judge them; ``segmenter`` draws the lungs
    the checks measure (default: the run's pipeline's, else the U-Net)."""
    classes = predictor.class_names
    data = collect(predictor, sample_rows(rows, max_images, seed), progress=progress, segmenter=segmenter)
    result = AuditResult(data, classes, embed_2d(data.features, seed), source_probe(data.features, data.table, seed=seed),
                         lung_attention(predictor, data, method=method),
                         masking_test(predictor, data, thresholds, focus=focus_class(predictor)),
                         thresholds, focus_class(predictor))
    judge(result)
    return result


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------

def _attention_summary(frame: pd.DataFrame) -> dict[str, Any]:
    ratios = frame["ratio"].dropna()
    return {"median": float(ratios.median()) if len(ratios) else None, "images": int(len(ratios)),
            "by_class": {str(k): float(v) for k, v in frame.groupby("truth")["ratio"].median().items()},
            "by_source": {str(k): float(v) for k, v in frame.groupby("source")["ratio"].median().items()}}


def write_audit(result: AuditResult, out_dir: str | Path, run: str) -> dict[str, Path]:
    """audit.json and the self-contained audit.html, verdict at the top."""
    out_dir = Path(out_dir)
    out_dir.mkdir(exist_ok=True)
    paths = {"json": out_dir / "audit.json", "html": out_dir / "audit.html"}
    with atomic_path(paths["json"]) as temporary:
        temporary.write_text(json.dumps({"run": run, **result.as_dict()}, indent=2, default=str) + "\n")
    audit_page(result, run).write(paths["html"])
    return paths


def audit_page(result: AuditResult, run: str):  # noqa: ANN201 - lungscreen.audit.report.Page
    from lungscreen.audit.plots import scatter_figure
    from lungscreen.audit.report import Page

    table, limits = result.data.table, result.thresholds
    page = Page(f"Bias audit of {Path(run).parent.name or run}",
                subtitle=f"{len(table)} held-out images, {table['source'].nunique()} source(s); lung masks: "
                         f"{result.data.lung_method}")
    if result.flagged:
        page.verdict("fail", "Shortcut suspected: the model may read something other than the lungs",
                     result.warnings + result.unjudged + result.notes)
    elif result.unjudged:
        page.verdict("warning", "Not enough skill to judge: no check fired, but not every check could be made, "
                     "so this is not a clean bill", result.unjudged + result.notes)
    else:
        page.verdict("ok", "No shortcut found by these four checks", result.notes or
                     ["source probe, lung attention and masking all judged, all below their thresholds"])
    page.section("How the verdict is reached")
    page.paragraph(f"Source probe fires at +{limits.probe_margin:.2f} accuracy over within-label chance with the "
                   f"interval above chance; lung attention fires when the median ratio of the maps of "
                   f"{f'the {result.focus} images' if result.focus else 'all images'} is below "
                   f"{limits.attention_ratio:.1f} (1 = a map spread evenly); "
                   f"masking fires when the model keeps {limits.retained_skill:.0%} of its skill ({result.masking['measure']} "
                   f"above 0.5) with the lungs hidden, if it has at least {limits.min_skill:.2f} to begin with. A check that "
                   "cannot be judged (too little skill, a single source) leaves the verdict amber, never green.")
    page.section("(a) The embedding by source and by label (t-SNE)")
    page.figure(scatter_figure(result.embedding, table["source"].astype(str).tolist(), "coloured by source"))
    page.figure(scatter_figure(result.embedding, table["truth"].astype(str).tolist(), "coloured by label"))
    page.section("(b) Source probe, within each label")
    page.table(pd.DataFrame([{"label": e["label"], "sources": ", ".join(f"{k} ({v})" for k, v in e["sources"].items()),
                              "accuracy": e.get("accuracy"), "chance": e.get("chance"), "excess": e.get("excess")}
                             for e in result.probe]).set_index("label"),
               caption="Cross-validated logistic regression predicting the source from the embedding.")
    page.section("(c) Lung attention (raw Grad-CAM mass in the lungs / lung share of the input)")
    summary = result.attention.groupby(["source", "truth"])["ratio"].agg(["median", "count"]).reset_index()
    page.table(summary, caption="Median ratio of the map of each image's true class, per source and class "
                                f"(1 = no preference for the lungs; the verdict reads {result.focus or 'every'} image).")
    page.section("(d) Masking test")
    masking = result.masking
    page.table(pd.DataFrame([{"input": name, masking["measure"]: masking[name]["auc"], "macro AUC": masking[name]["macro_auc"],
                              "balanced accuracy (most probable class)": masking[name]["balanced_accuracy"],
                              "agreement with original": masking[name]["agreement_with_original"],
                              "share of skill kept": masking[name].get("retained_skill")}
                             for name in ("original", "lungs only", "lungs hidden")]).set_index("input"),
               caption=f"Skill is the {masking['measure']} above 0.5. Hidden pixels are replaced by the image's mean.")
    return page
