"""Synthetic chest phantoms: one chest-like radiograph, its lung mask and lesion boxes, from a seed.

A phantom is a chest-like radiograph drawn from a few random shapes: body outline, two lungs, heart and
mediastinum, spine, clavicles, ribs, bronchovascular markings, then acquisition variation (pose, exposure,
heel effect, collimation, noise). Its label decides the opacities drawn inside the lungs:

=============  ==========================================================================================
label          pattern
=============  ==========================================================================================
normal         none
bacterial,     one or two dense lobar consolidations, often with a sharp fissure edge
pneumonia
viral          bilateral, perihilar, streaky interstitial haze
COVID-19       bilateral, peripheral, lower-zone ground-glass patches
=============  ==========================================================================================

Every phantom comes with its lung mask and one lesion box per opacity region. An optional *planted
shortcut* (a burnt-in corner marker or a global intensity shift) can be burnt in, so the bias audit can be
checked against ground truth; :mod:`~lungscreen.data.synth` writes phantoms into trees in the layouts of
real public downloads and decides which images carry the shortcut.

Rendering is vectorised (OpenCV fills and blurs at half resolution, one upsampling) and deterministic per
image (random streams keyed by ``[seed, stream, index]``), so any number of worker processes writes
identical files. Anatomy, film, lesions and marker use separate streams: the same image index drawn with
another label, or without the shortcut, is the same film but for the opacities or the marker.

Kept apart from the layouts so that drawing one image needs nothing of the tree writer (the segmentation
and preprocessing tests use phantoms alone).

Example:
    >>> phantom = render_phantom("COVID-19", size=128, seed=3)
    >>> phantom.image.shape, phantom.image.dtype, len(phantom.boxes) > 0
    ((128, 128), dtype('uint8'), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from lungscreen.data.labels import BACTERIAL, COVID, NORMAL, PNEUMONIA, VIRAL
from lungscreen.errors import ConfigError

#: Labels a phantom can carry (canonical labels, see :mod:`lungscreen.data.labels`).
PHANTOM_LABELS = (NORMAL, BACTERIAL, PNEUMONIA, VIRAL, COVID)
SHORTCUT_KINDS = ("marker", "intensity")
SHORTCUT_BY = ("label", "source")
#: Text burnt into a corner by the "marker" shortcut, and where (like a hospital's own marker).
MARKER_TEXT = "L"
MARKER_CORNER = "top-right"

__all__ = ["PHANTOM_LABELS", "Phantom", "Shortcut", "render_phantom"]

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive
_Region = tuple[list[np.ndarray], float, "np.ndarray | None"]  # polygons, opacity, half-plane cut away (fissure)


@dataclass(frozen=True)
class Phantom:
    """A rendered phantom.

    Attributes:
        image: uint8 (size, size) radiograph, white = dense.
        mask: bool (size, size) lung mask (lungs without the heart).
        boxes: one (x0, y0, x1, y1) pixel box per opacity region (empty for normal).
        label: the label whose pattern was drawn.
        shortcut: the shortcut burnt in, or "" for none.
    """

    image: np.ndarray
    mask: np.ndarray
    boxes: list[Box]
    label: str
    shortcut: str = ""


@dataclass(frozen=True)
class Shortcut:
    """A planted shortcut: a feature correlated with a label or a source, not with the disease.

    Attributes:
        kind: "marker" (text burnt into a corner, like a hospital's) or "intensity" (global brightness
            and contrast shift, like another detector).
        by: "label" or "source": what the shortcut follows.
        target: the label (e.g. "COVID-19") or source (e.g. "radiography") whose images carry it;
            None picks COVID-19 for ``by="label"`` and the source holding the COVID-19 cases otherwise.
        strength: in [0, 1], the fraction of the targeted images that carry it, and how visible it is.
    """

    kind: str
    by: str = "label"
    target: str | None = None
    strength: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in SHORTCUT_KINDS:
            raise ConfigError(f"shortcut kind {self.kind!r} unknown; choose one of {', '.join(SHORTCUT_KINDS)}")
        if self.by not in SHORTCUT_BY:
            raise ConfigError(f"shortcut by {self.by!r} unknown; choose one of {', '.join(SHORTCUT_BY)}")
        if not 0.0 <= float(self.strength) <= 1.0:
            raise ConfigError(f"shortcut strength must lie in [0, 1], got {self.strength}")


def render_phantom(label: str = NORMAL, *, size: int = 256, seed: int = 0, index: int = 0,
                   patient: int | None = None, shortcut: Shortcut | None = None) -> Phantom:
    """Draw one phantom; the same arguments always give the same pixels.

    Args:
        label: one of :data:`PHANTOM_LABELS`; decides the opacity pattern.
        size: side in pixels (square image).
        seed: run seed.
        index: image number within the run (pose, exposure and lesions are drawn from ``[seed, index]``).
        patient: patient number; images of one patient share their anatomy (follow-ups). None gives the
            image its own patient.
        shortcut: burn this shortcut in (the caller decides *which* images carry it).
    """
    if label not in PHANTOM_LABELS:
        raise ConfigError(f"phantom label {label!r} unknown; choose one of {', '.join(PHANTOM_LABELS)}")
    if not 32 <= size <= 2048:
        raise ConfigError(f"phantom size must be between 32 and 2048 px, got {size}")
    # Separate streams: the same film with another label (or without the shortcut) differs only by the
    # opacities (or the shortcut) - a counterfactual pair, handy to test saliency and the opacities.
    film, lesions, marker = (np.random.default_rng([seed, stream, index]) for stream in (0, 2, 3))
    return _Renderer(size, _patient_anatomy(seed, index, patient), film, lesions, marker).draw(label, shortcut)


def _patient_anatomy(seed: int, index: int, patient: int | None) -> _Anatomy:
    """The anatomy of an image's patient: keyed by the patient when given (follow-ups), else by the image."""
    key = [seed, 1, index, 1] if patient is None else [seed, 1, patient, 2]
    return _anatomy(np.random.default_rng(key))


@dataclass(frozen=True)
class _Anatomy:
    """What stays the same across one patient's films."""

    body_half_width: float
    body_profile: np.ndarray          # (k, 2) y, half-width control points
    lungs: tuple[np.ndarray, np.ndarray]  # canonical outlines, image-left then image-right
    heart: tuple[float, float, float, float, float]  # cx, cy, ax, ay, angle (deg)
    mediastinum_width: float
    rib_start: float
    rib_spacing: float
    rib_curve: float
    rib_count: int
    clavicle_y: float
    bone_density: float
    arms: bool
    breasts: bool
    vessels: np.ndarray  # (28, 5, 2) branching polylines from both hila


def _anatomy(rng: np.random.Generator) -> _Anatomy:
    """A random patient in the canonical frame: body outline, lungs, heart, bones and vessels."""
    body = rng.uniform(0.80, 0.98)
    ys = np.array([-1.5, -1.08, -0.92, -0.80, -0.3, 0.3, 0.9, 1.5])
    widths = np.array([0.26, 0.30, 0.72, 1.0, 1.0, 0.97, 0.90, 0.86]) * body
    widths[2:] *= rng.uniform(0.88, 1.12, len(widths) - 2)
    ys[1:4] += rng.uniform(-0.15, 0.12)
    profile = np.stack([ys, widths], axis=1)
    lungs = tuple(_lung_outline(rng, side, body) for side in (-1.0, 1.0))
    heart = (rng.uniform(0.08, 0.20), rng.uniform(0.24, 0.38), rng.uniform(0.28, 0.38), rng.uniform(0.20, 0.27),
             rng.uniform(-30, -10))
    return _Anatomy(
        body_half_width=body, body_profile=profile, lungs=lungs, heart=heart,
        mediastinum_width=rng.uniform(0.09, 0.15), rib_start=rng.uniform(-0.82, -0.70),
        rib_spacing=rng.uniform(0.125, 0.16), rib_curve=rng.uniform(0.7, 1.3), rib_count=int(rng.integers(9, 12)),
        clavicle_y=rng.uniform(-0.80, -0.66), bone_density=rng.uniform(0.6, 1.4), arms=bool(rng.random() < 0.6),
        breasts=bool(rng.random() < 0.4), vessels=_vessels(rng),
    )


def _vessels(rng: np.random.Generator, per_side: int = 14) -> np.ndarray:
    """Bronchovascular branches: short random walks leaving each hilum outwards, as (2 * per_side, 5, 2)."""
    angles = rng.uniform(-0.5 * np.pi, 0.6 * np.pi, (2, per_side, 1)) + np.cumsum(rng.normal(0, 0.25, (2, per_side, 4)), -1)
    steps = rng.uniform(0.06, 0.11, (2, per_side, 4))
    walk = np.cumsum(np.stack([np.cos(angles) * steps, np.sin(angles) * steps], -1), axis=2)
    walk = np.concatenate([np.zeros((2, per_side, 1, 2)), walk], axis=2)
    sides = np.array([-1.0, 1.0])[:, None, None]
    return np.stack([sides * (walk[..., 0] + 0.17), walk[..., 1] - 0.06], -1).reshape(-1, 5, 2)


_WALL = np.linspace(0.0, 1.0, 18)            # apex -> costophrenic angle
_BASE = np.linspace(0.0, 1.0, 12)[1:]         # costophrenic angle -> cardiophrenic angle
_MEDIAL = np.linspace(0.0, 1.0, 12)[1:-1]     # cardiophrenic angle -> apex
_HARMONICS = np.array([2.0, 3.0, 4.0])[:, None]


def _lung_outline(rng: np.random.Generator, side: float, body: float) -> np.ndarray:
    """A closed lung outline: rounded apex, convex lateral wall, sharp costophrenic angle, domed base."""
    medial = rng.uniform(0.07, 0.13) + (0.04 if side > 0 else 0.0)
    lateral = min(body - 0.06, rng.uniform(0.72, 0.86))
    top, bottom = rng.uniform(-0.74, -0.56), rng.uniform(0.46, 0.68)
    base_medial = bottom - rng.uniform(0.12, 0.24)
    dome, hilum, shoulder = rng.uniform(0.05, 0.13), rng.uniform(0.0, 0.04), rng.uniform(0.35, 0.55)
    apex_x = medial + 0.45 * (lateral - medial)
    width = np.sin(0.5 * np.pi * np.minimum(_WALL / shoulder, 1.0)) ** 0.7
    outline = np.concatenate([
        np.stack([apex_x + (lateral - apex_x) * width, top + (bottom - top) * _WALL], axis=1),
        np.stack([lateral + (medial - lateral) * _BASE,
                  bottom + (base_medial - bottom) * _BASE - dome * np.sin(np.pi * _BASE)], axis=1),
        np.stack([medial + hilum * np.sin(np.pi * _MEDIAL) + (apex_x - medial) * _MEDIAL ** 3,
                  base_medial + (top - base_medial) * _MEDIAL], axis=1),
    ])
    centre = outline.mean(axis=0)
    angle = np.arctan2(outline[:, 1] - centre[1], outline[:, 0] - centre[0])
    amplitudes, phases = rng.uniform(0.0, 0.035, (3, 1)), rng.uniform(0, 2 * np.pi, (3, 1))
    wobble = 1.0 + (amplitudes * np.cos(_HARMONICS * angle + phases)).sum(axis=0)
    outline = centre + (outline - centre) * wobble[:, None]
    outline[:, 0] *= side
    return outline


_CIRCLE = np.stack([np.cos(np.linspace(0, 2 * np.pi, 28, endpoint=False)),
                    np.sin(np.linspace(0, 2 * np.pi, 28, endpoint=False))], axis=1)
_RIB = np.linspace(0.0, 1.0, 10)              # spine -> lateral chest wall, along a rib
_CLAVICLE = np.linspace(0.08, 0.68, 8)        # sternal -> acromial end


def _ellipse(cx: float, cy: float, ax: float, ay: float, angle_deg: float = 0.0) -> np.ndarray:
    """A 28-point polygon of an ellipse centred on (cx, cy) with semi-axes ax, ay, rotated by angle_deg."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return _CIRCLE @ np.array([[ax * c, ax * s], [-ay * s, ay * c]]) + (cx, cy)


class _Renderer:
    """Draws one phantom.

    Shapes are drawn in a canonical frame (x, y in [-1, 1], x towards the patient's left, y down) mapped
    by one affine "pose" onto a working grid (half the size above 128 px, where every blur is four times
    cheaper); the film is upsampled once, then gets its tone curve, collimation and markers at full size.
    """

    def __init__(self, size: int, anatomy: _Anatomy, film: np.random.Generator, lesions: np.random.Generator,
                 marker: np.random.Generator) -> None:
        self.size = size
        self.work = size if size <= 128 else size // 2
        self.anatomy = anatomy
        self.rng, self.lesion_rng, self.marker_rng = film, lesions, marker
        self.matrix = self._pose()

    def _pose(self) -> np.ndarray:
        """Canonical -> working-pixel affine: scale, aspect, rotation and shift of the patient on the film."""
        rng = self.rng
        scale, aspect = rng.uniform(0.85, 1.25), rng.uniform(0.88, 1.12)
        angle = math.radians(rng.uniform(-14.0, 14.0))
        room = 0.06 + 0.5 * (1.25 - scale)  # a zoomed-in film has less room to move before the lungs leave it
        shift = np.array([rng.uniform(-room, room), rng.uniform(-room * 1.1, room * 0.9)])
        half = self.work / 2.0
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        linear = half * rotation @ np.diag([scale * aspect, scale / aspect])
        return np.concatenate([linear, (half * (1.0 + shift))[:, None]], axis=1)

    # --- drawing helpers -------------------------------------------------------------------------------

    def _px(self, points: np.ndarray, factor: float = 1.0) -> np.ndarray:
        """Canonical points (..., 2) -> fixed-point pixel coordinates (4 fractional bits) for OpenCV.

        ``factor`` maps working pixels onto a grid ``factor`` times finer, pixel centres aligned as
        ``cv2.resize`` aligns them (so the full-size mask sits exactly on the upsampled film).
        """
        pixels = points @ self.matrix[:, :2].T + self.matrix[:, 2]
        if factor != 1.0:
            pixels = (pixels + 0.5) * factor - 0.5
        return np.rint(pixels * 16.0).astype(np.int32)

    def _fill(self, layer: np.ndarray, shapes: Sequence[np.ndarray], value: float, factor: float = 1.0) -> None:
        """Fill polygons (each (n, 2) in canonical coordinates) with ``value``.

        One call per polygon: OpenCV fills several polygons of one call with the even-odd rule, which
        would punch holes where they overlap.
        """
        for shape in shapes:
            cv2.fillPoly(layer, [self._px(shape, factor)], value, lineType=cv2.LINE_8, shift=4)

    def _lines(self, layer: np.ndarray, lines: np.ndarray, value: float, thickness: float) -> None:
        """Draw open polylines given as one (k, n, 2) array, in a single OpenCV call."""
        width = max(1, round(thickness * self.work / 2.0))
        cv2.polylines(layer, list(self._px(lines)), False, value, thickness=width, lineType=cv2.LINE_8, shift=4)

    def _ribbons(self, layer: np.ndarray, lines: np.ndarray, value: float, thickness: float) -> None:
        """Thick, mostly horizontal bands (ribs, clavicles) along (k, n, 2) centre lines, in one fill.

        Filling ribbons is much faster than OpenCV's thick polylines (a polygon and two round caps per
        segment); the bands of one call must not overlap (even-odd fill).
        """
        half = np.array([0.0, thickness / 2.0])
        outlines = np.concatenate([lines - half, (lines + half)[:, ::-1]], axis=1)
        cv2.fillPoly(layer, list(self._px(outlines)), value, lineType=cv2.LINE_8, shift=4)

    def _blur(self, layer: np.ndarray, sigma: float) -> np.ndarray:
        return cv2.GaussianBlur(layer, (0, 0), max(0.3, sigma * self.work))

    def _field(self, cells: int, amplitude: float, interpolation: int = cv2.INTER_CUBIC,
               rng: np.random.Generator | None = None) -> np.ndarray:
        """Smooth random field: a few random values, upsampled (texture, mottling, uneven exposure)."""
        grid = ((rng or self.rng).random((cells, cells), dtype=np.float32) - np.float32(0.5)) * np.float32(2.0 * amplitude)
        return cv2.resize(grid, (self.work, self.work), interpolation=interpolation)

    # --- the phantom ---------------------------------------------------------------------------------

    def draw(self, label: str, shortcut: Shortcut | None) -> Phantom:
        heart = _ellipse(*self.anatomy.heart)
        lungs = np.zeros((self.work, self.work), np.uint8)
        self._fill(lungs, self.anatomy.lungs, 1)
        self._fill(lungs, [heart], 0)
        image, regions = self._compose(label, lungs, heart)
        pixels = self._acquire(image, shortcut)
        factor = self.size / self.work
        mask = np.zeros((self.size, self.size), np.uint8)
        self._fill(mask, self.anatomy.lungs, 1, factor)
        self._fill(mask, [heart], 0, factor)
        boxes = [tuple(int(round(v * factor)) for v in box) for box in regions]
        return Phantom(pixels, mask.astype(bool), boxes, label, shortcut.kind if shortcut else "")

    def _compose(self, label: str, lungs: np.ndarray, heart: np.ndarray) -> tuple[np.ndarray, list[Box]]:
        """The radiograph before the detector, as float32 at working resolution, and the lesion boxes."""
        image = self._tissue(heart)
        lungs_float = lungs.astype(np.float32)
        pleura = self._blur(lungs_float, 0.02)  # the lung fields with soft edges
        bones_seen = self._bones() * (0.55 + 0.45 * pleura)  # fainter through soft tissue
        image += self._blur(bones_seen + self._lung_texture() * lungs_float, 0.006)
        opacity, regions = self._opacities(label, lungs, pleura)
        if opacity is not None:
            image += opacity
        return image, regions

    def _acquire(self, image: np.ndarray, shortcut: Shortcut | None) -> np.ndarray:
        """Exposure, noise, detector response, collimation and markers: the uint8 film at full size."""
        rng, work = self.rng, self.work
        image *= self._exposure_ramp() + self._field(int(rng.integers(3, 6)), rng.uniform(0.04, 0.12))
        image += self._field(int(rng.integers(3, 6)), rng.uniform(0.01, 0.04))
        noise = rng.integers(0, 256, (work, work), dtype=np.uint8).astype(np.float32)  # uniform, std 0.004-0.015
        image += (noise - np.float32(127.5)) * np.float32(rng.uniform(0.004, 0.015) / 73.9)
        pixels = np.clip(image * np.float32(255.0), 0, 255).astype(np.uint8)
        if work != self.size:
            pixels = cv2.resize(pixels, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        pixels = cv2.LUT(pixels, self._tone_curve(shortcut))
        self._collimate(pixels)
        if shortcut is not None and shortcut.kind == "marker":
            self._burn_marker(pixels, shortcut.strength)
        return pixels

    def _tissue(self, heart: np.ndarray) -> np.ndarray:
        """Air, body (thicker in the middle), lungs, heart and mediastinum, with soft edges."""
        rng, anatomy = self.rng, self.anatomy
        layer = np.full((self.work, self.work), rng.uniform(0.0, 0.08), np.float32)
        ys, widths = anatomy.body_profile[:, 0], anatomy.body_profile[:, 1]
        soft = rng.uniform(0.40, 0.52)
        if anatomy.arms:
            arm, spread = rng.uniform(0.08, 0.14), rng.uniform(0.0, 30.0)
            offset = anatomy.body_half_width + arm * 0.9 + spread / 100
            self._fill(layer, [_ellipse(side * offset, 0.3, arm, 1.4, -side * spread) for side in (-1, 1)], soft * 0.85)
        for shrink, gain in ((1.0, 1.0), (0.82, 1.12), (0.62, 1.22)):  # thicker towards the middle
            outline = np.concatenate([np.stack([-widths * shrink, ys], 1), np.stack([widths[::-1] * shrink, ys[::-1]], 1)])
            self._fill(layer, [outline], soft * gain)
        lung_value = soft * rng.uniform(0.30, 0.42)
        self._fill(layer, anatomy.lungs, lung_value)
        width = anatomy.mediastinum_width
        mediastinum = np.array([[-width, -1.3], [width, -1.3], [width * 1.8, 0.45], [-width * 1.4, 0.45]])
        self._fill(layer, [mediastinum, heart], soft * rng.uniform(1.15, 1.3))
        hila = [_ellipse(side * 0.17, -0.07, 0.055, 0.12, side * 15) for side in (-1, 1)]
        self._fill(layer, hila, lung_value + soft * 0.18)
        if anatomy.breasts:  # soft tissue over the lung bases: a benign density that normals carry too
            shadow = np.zeros_like(layer)
            self._fill(shadow, [_ellipse(side * 0.52, 0.5, 0.3, 0.2) for side in (-1, 1)], soft * 0.08)
            layer += shadow
        return self._blur(layer, 0.01)

    def _bones(self) -> np.ndarray:
        """Spine with disc spaces, clavicles, posterior and (fainter) anterior ribs."""
        anatomy, rng = self.anatomy, self.rng
        layer = np.zeros((self.work, self.work), np.float32)
        density = 0.065 * anatomy.bone_density
        self._fill(layer, [np.array([[-0.065, -1.3], [0.065, -1.3], [0.07, 1.3], [-0.07, 1.3]])], density * 1.3)
        discs = np.arange(-1.25, 1.3, anatomy.rib_spacing * 0.9)
        self._lines(layer, np.stack([np.stack([np.full_like(discs, -0.07), discs], 1),
                                     np.stack([np.full_like(discs, 0.07), discs + 0.01], 1)], 1), density * 0.4, 0.015)
        sides = np.array([-1.0, 1.0])[:, None, None]                       # (2, 1, 1)
        reach = anatomy.body_half_width * rng.uniform(0.86, 0.94, (2, 1, 1))
        start = anatomy.rib_start + anatomy.rib_spacing * np.arange(anatomy.rib_count)[None, :, None]
        u = _RIB[None, None, :]
        curve = anatomy.rib_curve
        posterior = np.stack(np.broadcast_arrays(sides * (0.06 + (reach - 0.06) * u),
                                                 start + curve * (-0.10 * u + 0.36 * u ** 2.2)), -1)
        self._ribbons(layer, posterior.reshape(-1, 10, 2), density, 0.042)
        anterior = np.stack(np.broadcast_arrays(sides * (reach - (reach - 0.2) * u),
                                                start + 0.24 + curve * 0.28 * u ** 1.3), -1)[:, : anatomy.rib_count - 3]
        self._ribbons(layer, anterior.reshape(-1, 10, 2), density * 0.45, 0.035)
        x = _CLAVICLE
        y = anatomy.clavicle_y - 0.16 * (x - 0.08) + 0.05 * np.sin(np.pi * (x - 0.08) / 0.6)
        self._ribbons(layer, np.stack([np.stack([-x, y], 1), np.stack([x, y], 1)]), density * 1.5, 0.055)
        return layer

    def _lung_texture(self) -> np.ndarray:
        """Bronchovascular markings branching from the hila, plus fine parenchymal mottling (unmasked)."""
        layer = self._field(18, 0.03, cv2.INTER_LINEAR)
        self._lines(layer, self.anatomy.vessels, 0.05, 0.018)
        return layer

    def _opacities(self, label: str, lungs: np.ndarray, pleura: np.ndarray) -> tuple[np.ndarray | None, list[Box]]:
        """The label's opacity layer and one box per region, in working pixels; the pleura bounds the haze."""
        if label == NORMAL:
            return None, []
        pattern = {BACTERIAL: self._lobar, PNEUMONIA: self._lobar, VIRAL: self._perihilar, COVID: self._peripheral}[label]
        sigma, regions = pattern()
        drawn = []
        for shapes, value, cut in regions:
            region = np.zeros_like(lungs)
            self._fill(region, shapes, 1)
            if cut is not None:
                self._fill(region, [cut], 0)
            region &= lungs
            drawn.append((int(np.count_nonzero(region)), region, value))
        # A region the lung edge or a fissure cut down to a sliver is dropped (a 2-pixel "lesion" box helps no
        # detector), but a diseased film always keeps its largest region.
        smallest = 0.01 * np.count_nonzero(lungs)
        kept = [item for item in drawn if item[0] >= smallest] or [max(drawn, key=lambda item: item[0])]
        layer = np.zeros((self.work, self.work), np.float32)
        boxes: list[Box] = []
        for count, region, value in kept:
            if count:
                x, y, w, h = cv2.boundingRect(region)  # of the non-zero pixels
                boxes.append((x, y, x + w, y + h))
                layer += region * np.float32(value)
        texture = 1.0 + self._field(12, 0.35, rng=self.lesion_rng)
        return self._blur(layer, sigma) * texture * pleura, boxes

    def _lobar(self) -> tuple[float, list[_Region]]:
        """Bacterial pattern: one or two dense, homogeneous consolidations, often cut by a fissure."""
        rng = self.lesion_rng
        regions = []
        for side in rng.permutation([-1.0, 1.0])[: 1 + int(rng.random() < 0.3)]:
            lung = self.anatomy.lungs[0 if side < 0 else 1]
            top, bottom = lung[:, 1].min(), lung[:, 1].max()
            zone = rng.choice(["upper", "middle", "lower"])
            level = {"upper": 0.25, "middle": 0.55, "lower": 0.8}[zone]
            centre_y = top + level * (bottom - top) + rng.uniform(-0.06, 0.06)
            blob = _ellipse(side * rng.uniform(0.4, 0.6), centre_y, rng.uniform(0.2, 0.3), rng.uniform(0.16, 0.24),
                            rng.uniform(-30, 30))
            cut = None
            if rng.random() < 0.7:  # a fissure gives the consolidation one straight, sharp border
                direction = -1.0 if zone == "lower" else 1.0
                fissure, tilt = centre_y + direction * rng.uniform(0.08, 0.14), rng.uniform(-0.12, 0.12)
                cut = np.array([[-2.0, fissure - 2 * tilt], [2.0, fissure + 2 * tilt],
                                [2.0, 2 * direction], [-2.0, 2 * direction]])
            regions.append(([blob], rng.uniform(0.28, 0.42), cut))
        return rng.uniform(0.008, 0.02), regions

    def _peripheral(self) -> tuple[float, list[_Region]]:
        """COVID-19 pattern: ground-glass patches along the lateral pleura of the lower zones, both sides."""
        rng = self.lesion_rng
        sides = [-1.0, 1.0] if rng.random() < 0.9 else [rng.choice([-1.0, 1.0])]
        regions = []
        for side in sides:
            lung = self.anatomy.lungs[0 if side < 0 else 1]
            lateral, bottom = np.abs(lung[:, 0]).max(), lung[:, 1].max()
            patches = [
                _ellipse(side * (lateral - rng.uniform(0.06, 0.16)), rng.uniform(-0.05, bottom - 0.1),
                         rng.uniform(0.08, 0.15), rng.uniform(0.10, 0.20), rng.uniform(-20, 20))
                for _ in range(int(rng.integers(3, 6)))
            ]
            regions.append((patches, rng.uniform(0.18, 0.28), None))
        return rng.uniform(0.02, 0.035), regions

    def _perihilar(self) -> tuple[float, list[_Region]]:
        """Viral pattern: streaky interstitial haze radiating from both hila."""
        rng = self.lesion_rng
        regions = []
        for side in (-1.0, 1.0):
            streaks = []
            for _ in range(int(rng.integers(5, 9))):
                angle, reach = rng.uniform(-70, 70), rng.uniform(0.10, 0.30)
                cx = side * (0.2 + reach * math.cos(math.radians(angle)))
                cy = -0.05 + reach * math.sin(math.radians(angle))
                streaks.append(_ellipse(cx, cy, rng.uniform(0.10, 0.18), rng.uniform(0.025, 0.05), side * angle))
            regions.append((streaks, rng.uniform(0.15, 0.24), None))
        return rng.uniform(0.012, 0.025), regions

    # --- acquisition ---------------------------------------------------------------------------------

    def _exposure_ramp(self) -> np.ndarray:
        """Heel effect and uneven exposure: a gentle linear ramp in a random direction."""
        rng = self.rng
        axis = np.linspace(-1.0, 1.0, self.work, dtype=np.float32)
        gx, gy = rng.uniform(-0.25, 0.25, 2)
        return 1.0 + gx * axis[None, :] + gy * axis[:, None]

    def _tone_curve(self, shortcut: Shortcut | None) -> np.ndarray:
        """Detector response (gamma, gain, offset) as a 256-entry lookup table; the intensity shortcut too."""
        rng = self.rng
        levels = np.arange(256, dtype=np.float32) / 255.0
        curve = rng.uniform(-0.06, 0.04) + rng.uniform(0.9, 1.3) * levels ** rng.uniform(0.65, 1.5)
        if shortcut is not None and shortcut.kind == "intensity":
            curve = curve * (1.0 - 0.35 * shortcut.strength) + 0.28 * shortcut.strength
        return np.clip(curve * 255.0, 0, 255).astype(np.uint8)

    def _burn_marker(self, pixels: np.ndarray, strength: float) -> None:
        """A hospital's letter marker in the top-right corner, more opaque with a stronger shortcut; bold enough
        (strokes of size / 32) to stay two pixels wide when a film is brought down to 64 px."""
        size = self.size
        scale = size / 160.0 * self.marker_rng.uniform(0.9, 1.1)
        thickness = max(1, round(size / 32))
        (width, height), _ = cv2.getTextSize(MARKER_TEXT, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        margin = round(size * self.marker_rng.uniform(0.03, 0.06))
        origin = (size - margin - width, margin + height)
        patch = pixels[margin: margin + height, size - margin - width: size - margin]
        opacity = 0.35 + 0.65 * strength
        value = int(float(patch.mean()) * (1.0 - opacity) + 255 * opacity) if patch.size else 255
        cv2.putText(pixels, MARKER_TEXT, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, value, thickness, cv2.LINE_AA)

    def _collimate(self, pixels: np.ndarray) -> None:
        """Some films show the collimator edge: a dark (or burnt-white) band along one or two borders."""
        rng = self.rng
        if rng.random() >= 0.35:
            return
        value = 0 if rng.random() < 0.8 else 255
        for edge in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
            depth = int(self.size * rng.uniform(0.02, 0.07))
            region = {0: np.s_[:depth, :], 1: np.s_[-depth:, :], 2: np.s_[:, :depth], 3: np.s_[:, -depth:]}[int(edge)]
            pixels[region] = value
