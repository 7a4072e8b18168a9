"""Adapting a run to a new hospital without its labels: AdaBN (Li et al. 2016).

A network's BatchNorm layers normalise every feature with the mean and variance they saw in training. At a
new hospital (another detector, another exposure habit, another population) those statistics shift, and
every layer downstream reads features slightly off their training scale. AdaBN re-estimates the running
mean and variance of every BatchNorm layer on the new site's own images - unlabelled, passed through the
run's own input path - and changes nothing else: no weight is trained, no label is needed.

The adapted run is a new run folder whose ``best.pt`` holds the adapted statistics and, so that the
out-of-distribution check speaks for that site, the site's own intensity reference; ``adapt.json`` says
from which run, on which images, and what changed.

Caution, measured in ``benchmarks/generalization.py``: the re-estimated statistics follow the new site's
case mix too. Estimated on a folder that is nearly all one class, they shift the features of that class
toward the middle, and the operating point chosen on the training sources' validation split no longer
means what it did.

Example:
    >>> result = adapt_run("runs/covid-resnet-cpu", ["site_b/"], "runs/covid-resnet-cpu-site-b")   # doctest: +SKIP
    >>> result.images, result.layers                                                                  # doctest: +SKIP
    (412, 20)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lungscreen.errors import ConfigError
from lungscreen.io.files import iter_image_files, write_atomic
from lungscreen.preprocessing.model_input import intensity_reference, to_tensor


@dataclass
class AdaptResult:
    """What :func:`adapt_run` did."""

    run: str
    adapted_from: str
    images: int
    skipped: int
    layers: int
    images_sha256: str


def batchnorm_layers(model: Any) -> list[Any]:  # noqa: ANN401 - torch modules; torch is imported lazily
    """The model's BatchNorm layers (1-, 2- and 3-D), in module order."""
    from torch import nn

    return [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


def reestimate_batchnorm(model: Any, batches: Iterable[Any]) -> int:  # noqa: ANN401
    """Replace every BatchNorm layer's running mean and variance by the cumulative mean over ``batches``
    (torch's ``momentum=None``); weights, biases and every other layer stay as they were. Returns the number
    of layers adapted."""
    import torch

    layers = batchnorm_layers(model)
    if not layers:
        raise ConfigError("the model has no BatchNorm layer: there are no statistics to adapt")
    momenta = [layer.momentum for layer in layers]
    model.eval()  # dropout and the like stay off: only the statistics move
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    model.eval()
    return len(layers)


def adapt_batchnorm(predictor: Any, samples: Sequence[Any], *, batch_size: int = 32) -> int:  # noqa: ANN401
    """AdaBN in place: the predictor's BatchNorm statistics re-estimated on ``samples`` it prepared. Returns the
    number of layers adapted."""
    return reestimate_batchnorm(predictor.checkpoint.model,
                                (to_tensor([s.image for s in samples[i:i + batch_size]], predictor.spec.input)
                                 for i in range(0, len(samples), batch_size)))


def adapt_run(run: str | Path, inputs: Sequence[str | Path], out: str | Path, *, batch_size: int = 32,
              progress: Callable[[int], None] | None = None) -> AdaptResult:
    """AdaBN on the images under ``inputs``; the adapted run is written to the folder ``out``.

    Raises:
        ConfigError: an exported ONNX model (its statistics are folded into its graph), no usable image,
            fewer images than two batches' worth of statistics need (at least 16), or a model without
            BatchNorm.
    """
    from lungscreen.inference.predict import Predictor, load_file
    from lungscreen.models import save_checkpoint

    predictor = Predictor(run)
    if predictor.onnx:
        raise ConfigError(f"{run}: an exported ONNX model cannot be adapted (give the run folder)")
    files = list(iter_image_files(*inputs))
    samples, skipped, digest = [], 0, hashlib.sha256()
    for count, path in enumerate(files, start=1):
        for item in load_file(predictor, path):
            if item.sample is None:
                skipped += 1
                continue
            samples.append(item.sample)
            digest.update(str(path).encode())
        if progress is not None:
            progress(count)
    if len(samples) < 16:
        raise ConfigError(f"IMAGES: {len(samples)} usable image(s) ({skipped} skipped); AdaBN needs at least 16 "
                          "of the new site to estimate its statistics")
    model, spec = predictor.checkpoint.model, predictor.spec
    layers = adapt_batchnorm(predictor, samples, batch_size=batch_size)
    reference = intensity_reference([s.image for s in samples])
    adapted = spec.model_copy(update={"reference": reference, "gate": site_gate(predictor, samples, reference)})
    meta = predictor.checkpoint.meta
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = AdaptResult(run=str(out), adapted_from=str(predictor.checkpoint.path), images=len(samples),
                         skipped=skipped, layers=layers, images_sha256=digest.hexdigest())
    extra = {**meta.get("extra", {}), "adapted": asdict(result)}
    extra.pop("test", None)  # the test figures were measured before the adaptation: they no longer describe it
    save_checkpoint(out / "best.pt", model, spec=adapted, extra=extra)
    text = json.dumps(asdict(result), indent=2)
    write_atomic(out / "adapt.json", lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    return result


def site_gate(predictor: Any, samples: list[Any], reference: Any) -> Any:  # noqa: ANN401
    """The OOD gate refitted on the site's own images through the adapted model (None where the run has none):
    the embedding's statistics moved with the BatchNorm layers, so the old gate would measure the wrong
    distances. With no validation split at the site, its limits are set on the same images."""
    if predictor.spec.gate is None:
        return None
    from lungscreen.inference.gate import fit_gate, lung_statistics
    from lungscreen.preprocessing.model_input import reference_distance

    features = np.concatenate([predictor.scores(samples[i:i + 32], features=True)[1]
                               for i in range(0, len(samples), 32)])
    intensity = [reference_distance(s.image, reference) / reference.threshold for s in samples]
    return fit_gate(features, features, intensity, [lung_statistics(s) for s in samples],
                    target=predictor.spec.gate.target, chosen_on="the adapted site's own images")


__all__ = ["AdaptResult", "adapt_batchnorm", "adapt_run", "batchnorm_layers", "reestimate_batchnorm", "site_gate"]
