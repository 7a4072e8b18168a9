"""Raw class-activation maps, where they sit relative to the lungs, and whether they explain anything.

**Raw maps.** pytorch-grad-cam computes one map per target layer in ``BaseCAM.get_cam_image`` (each
method's own formula: Grad-CAM's gradient-weighted activations, Grad-CAM++'s weights, Score-CAM's
masked-input scores, Eigen-CAM's first principal component) and then, in ``compute_cam_per_layer`` and
``aggregate_multi_layers``, min-max scales every map to [0, 1] (``scale_cam_image``). That scaling is a
per-image affine change: it makes a near-zero map look as confident as a strong one and shifts mass
between regions (the minimum is subtracted), so any "share of the map inside the lungs" computed from it
measures the scaling, not the model. :func:`class_activation_maps` therefore subclasses each method with
a hook on ``get_cam_image`` (the library's documented per-layer entry point, which every method either
inherits or overrides) that keeps what it returns; the library's own forward pass runs unchanged (hooks,
targets, backward pass) and its scaled result is discarded. The kept map gets the same ReLU the library
applies (``np.maximum(cam, 0)``) and is resized bilinearly to the input size; no scaling. Eigen-CAM's
principal component has an arbitrary sign (the library's, unchanged), so its raw map is the positive half
of the projection.

**Lung attention ratio.** :func:`lung_attention_ratio` = (share of the map's mass inside the lung mask) /
(share of the pixels that are lung). The numerator is Quantus' *relevance mass accuracy* (Arras et al.
2022, "CLEVR-XAI"); dividing by the lung area makes it comparable across images whose lungs cover more or
less of the picture: 1 means the map is spread over lungs and background alike, > 1 that it concentrates
on the lungs, < 1 that it looks elsewhere (borders, text, devices: the shortcuts a bias audit hunts).

**Faithfulness.** :func:`road_faithfulness` is ROAD (Rong et al. 2022, "A consistent and efficient
evaluation strategy for attribution methods"), the library's ``ROADCombined``: pixels are removed by
noisy linear imputation (not blacked out, so the perturbed image stays in distribution) in order of the
map, most relevant first (MoRF) and least relevant first (LeRF), at :data:`ROAD_PERCENTILES`, and the
score is ``mean(p_LeRF - p_MoRF) / 2`` where ``p`` is the model's probability of the explained class
after the removal. In [-0.5, 0.5]: > 0 the map found pixels the decision depends on (removing them hurts
more than removing the rest), ~0 the map explains nothing (a random map scores ~0), < 0 it points away
from the evidence.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from lungscreen.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Method name -> pytorch-grad-cam class name.
CAM_METHODS: dict[str, str] = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "scorecam": "ScoreCAM",
                               "eigencam": "EigenCAM"}

#: ROAD's keep-percentiles: at ``p`` both orders remove (100 - p) % of the pixels, so 20..80 removes 80 %
#: down to 20 %, the range the library's tutorial uses; the extremes (nearly nothing or nearly everything
#: removed) say little and cost the most to impute.
ROAD_PERCENTILES: tuple[int, ...] = (20, 40, 60, 80)


def check_method(method: str, option: str = "method") -> str:
    """The method name, or a ConfigError naming ``option`` and listing the known methods."""
    if method not in CAM_METHODS:
        raise ConfigError(f"{option}: unknown CAM method {method!r}; known: {', '.join(CAM_METHODS)}")
    return method


def cam_layer(model: nn.Module) -> nn.Module:
    """The model's last spatial feature map module, or a ConfigError for a model without one."""
    try:
        layer = model.cam_layer
    except (AttributeError, NotImplementedError):
        layer = None
    if layer is None:
        raise ConfigError(f"{type(model).__name__} has no cam_layer (no spatial feature map to explain): "
                          "class-activation maps need a zoo classifier, not a segmentation model")
    return layer


class _KeepRawMaps:
    """Mixin recording every per-layer map ``get_cam_image`` returns, before the library scales it."""

    raw_maps: list[np.ndarray]

    def get_cam_image(self, *args: Any, **kwargs: Any) -> np.ndarray:
        cam = super().get_cam_image(*args, **kwargs)  # type: ignore[misc]
        self.raw_maps.append(np.asarray(cam.detach().cpu().numpy() if hasattr(cam, "detach") else cam, np.float32))
        return cam


@cache
def _raw_class(method: str) -> type:
    import pytorch_grad_cam

    base = getattr(pytorch_grad_cam, CAM_METHODS[method])
    return type(f"Raw{base.__name__}", (_KeepRawMaps, base), {})


def _resize(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in maps])


def class_activation_maps(model: nn.Module, inputs: torch.Tensor, target_classes: Sequence[int],
                          method: str = "gradcam", *, batch_size: int = 16) -> np.ndarray:
    """Raw (unscaled, non-negative) maps of ``target_classes`` for a batch, at the input's size.

    Args:
        model: a zoo classifier (with ``cam_layer``); put in eval mode, gradients cleared afterwards.
        inputs: (N, C, S, S) model inputs (``to_tensor`` of prepared samples).
        target_classes: one class index per input (its logit is explained, ``ClassifierOutputTarget``).
        method: one of :data:`CAM_METHODS`.
        batch_size: inputs per pass; Score-CAM always takes one (it builds a masked copy of its input per
            feature channel, 512 x 3 x 224 x 224 floats = 300 MB an image, and scores them 64 at a time).

    Returns:
        float32 (N, S, S), >= 0, in the model's units (not min-max scaled; see the module docstring).
    """
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    check_method(method)
    layer = cam_layer(model)
    classes = [int(c) for c in target_classes]
    outputs = _output_count(model, inputs)
    if len(classes) != len(inputs) or any(not 0 <= c < outputs for c in classes):
        raise ConfigError(f"target_classes: need one class index in 0..{outputs - 1} per input, got {classes}")
    model.eval()
    explainer = _raw_class(method)(model=model, target_layers=[layer])
    explainer.batch_size = 64  # Score-CAM's masked inputs per forward pass
    step = 1 if method == "scorecam" else batch_size
    maps: list[np.ndarray] = []
    try:
        with torch.enable_grad(), _quiet(method):
            for start in range(0, len(inputs), step):
                batch = inputs[start:start + step].detach().clone().requires_grad_(explainer.uses_gradients)
                explainer.raw_maps = []
                explainer(input_tensor=batch, targets=[ClassifierOutputTarget(c) for c in classes[start:start + step]])
                maps.append(_resize(np.maximum(explainer.raw_maps[0], 0), *inputs.shape[-2:]))
    finally:  # not ``with``: BaseCAM.__exit__ swallows IndexError
        explainer.activations_and_grads.release()
        explainer.outputs = None
        model.zero_grad(set_to_none=True)
    return np.concatenate(maps).astype(np.float32)


def _output_count(model: nn.Module, inputs: torch.Tensor) -> int:
    import torch

    with torch.inference_mode():
        return int(model(inputs[:1]).shape[1])


def _quiet(method: str) -> contextlib.AbstractContextManager:
    """Score-CAM draws a tqdm bar per image on stderr; lungscreen shows its own progress."""
    return contextlib.redirect_stderr(io.StringIO()) if method == "scorecam" else contextlib.nullcontext()


def lung_attention_ratio(cam: np.ndarray, lung_mask: np.ndarray) -> float:
    """(Share of the map's mass inside the lungs) / (share of the pixels that are lung); see the module docstring.

    ``cam`` and ``lung_mask`` have the same shape (any; pass ``cam[region], mask[region]`` to measure
    within a region). NaN when the map has no mass or the mask is empty or full (no contrast to measure).
    """
    cam = np.maximum(np.asarray(cam, np.float64), 0)
    lungs = np.asarray(lung_mask, bool)
    if cam.shape != lungs.shape:
        raise ValueError(f"cam {cam.shape} and lung mask {lungs.shape} differ in shape")
    total, area = cam.sum(), lungs.mean() if lungs.size else 0.0
    if total <= 0 or not 0 < area < 1:
        return float("nan")
    return float(cam[lungs].sum() / total / area)


class ProbabilityTarget:
    """A pytorch-grad-cam target: the head's probability of one class (softmax or sigmoid), so ROAD's
    differences read as probabilities instead of unbounded logits."""

    def __init__(self, category: int, activation: str = "softmax") -> None:
        self.category, self.activation = int(category), activation

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        import torch

        probabilities = torch.softmax(output, dim=-1) if self.activation == "softmax" else torch.sigmoid(output)
        return probabilities[..., self.category]


def road_faithfulness(model: nn.Module, inputs: torch.Tensor, maps: np.ndarray, target_classes: Sequence[int], *,
                      activation: str = "softmax", percentiles: Sequence[int] = ROAD_PERCENTILES,
                      seed: int = 0) -> np.ndarray:
    """ROAD combined score per map (float32 (N,), in [-0.5, 0.5], > 0 = faithful; see the module docstring).

    Ties in the map (a Grad-CAM map is often zero over half the image) are broken at random (a 1e-6
    relative jitter), else the library's ``cam < percentile`` would remove all the tied pixels at once.
    Seeded, so a map always gets the same score.
    """
    import torch
    from pytorch_grad_cam.metrics.road import ROADCombined

    rng = np.random.default_rng(seed)
    maps = np.asarray(maps, np.float32)
    scale = np.maximum(maps.reshape(len(maps), -1).max(axis=1), 1e-12)[:, None, None]
    untied = maps + rng.uniform(0, 1e-6, maps.shape).astype(np.float32) * scale
    targets = [ProbabilityTarget(c, activation) for c in target_classes]
    model.eval()
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(seed)
        scores = ROADCombined(percentiles=list(percentiles))(inputs, untied, targets, model)
    return np.asarray(scores, np.float32).reshape(len(maps))
