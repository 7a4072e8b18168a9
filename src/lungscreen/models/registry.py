"""One registry for every network of the zoo: register a factory once, build it anywhere by name.

A model is registered with :func:`register_model` on a factory ``fn(*, num_classes, in_channels, **kwargs)``
that returns a plain :class:`torch.nn.Module`. :func:`create` builds it, checks that it keeps the contract of
its task, records how it was built (so :func:`~lungscreen.models.checkpoint.save_checkpoint` can rebuild it
from a file alone) and loads weights on request.

What each task requires of a model (checked by :func:`create`):

- ``"classification"`` and ``"multilabel"``: ``forward(x) -> (N, num_classes)`` logits (no softmax or
  sigmoid: the loss and the predictor apply them), ``features(x) -> (N, D)`` pooled embedding with
  ``classifier(features(x)) == forward(x)``, ``classifier`` (the head, re-initialised for transfer),
  ``cam_layer`` (the module whose output is the last spatial feature map, the one Grad-CAM hooks),
  ``layer_groups()`` (input side first, head last) and ``min_input_size``.
- ``"segmentation"``: ``forward(x) -> (N, num_classes, H, W)`` logits and ``min_input_size``.
  ``layer_groups()`` and a ``head`` (the output layer, what ``reset_head`` re-initialises) are optional.
- ``"multitask"``: ``num_classes`` maps head names to output counts and ``forward(x)`` returns a dict of
  the heads' logits under those names; ``min_input_size``.

For every task: ``defaults`` must list every option the factory accepts (``create`` refuses others by
name); the factory raises ``ValueError`` on a bad value (``create`` reports it as a ``ConfigError``); the
first ``nn.Conv2d`` registered must be the one that reads the image (its RGB weights are summed for
1-channel models); ImageNet support takes ``imagenet="<torchvision weights name>"`` and a method
``imagenet_state(state_dict) -> state_dict`` mapping torchvision's keys to the model's.

Example:
    >>> @register_model("tiny_net", paper="-", input_size=64, min_input_size=8, description="demo")
    ... def tiny_net(*, num_classes: int, in_channels: int) -> nn.Module:   # doctest: +SKIP
    ...     return TinyNet(num_classes, in_channels)
    >>> model = create("tiny_net", num_classes=2)                          # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from torch import nn

from lungscreen.errors import ConfigError

Task = Literal["classification", "multilabel", "segmentation", "multitask"]
TASKS: tuple[str, ...] = ("classification", "multilabel", "segmentation", "multitask")

_REQUIRED: dict[str, tuple[str, ...]] = {
    "classification": ("features", "classifier", "cam_layer", "layer_groups", "min_input_size"),
    "multilabel": ("features", "classifier", "cam_layer", "layer_groups", "min_input_size"),
    "segmentation": ("min_input_size",),
    "multitask": ("min_input_size",),
}


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model before building it.

    Attributes:
        name: registry name (``create(name)``).
        paper: where it comes from ("004 COVID-Net", ...).
        input_size: the paper's input side in pixels (MACs in ``lungscreen models list`` are counted there).
        min_input_size: smallest square side the default configuration accepts.
        description: one line for tables and ``--help``.
        task: ``"classification"``, ``"multilabel"`` or ``"segmentation"``.
        defaults: the factory's architecture options and their defaults (``create(name, **kwargs)``).
        imagenet: torchvision weights the body can start from (``"ResNet50_Weights.IMAGENET1K_V1"``), or None.
        heads: a multi-task model's head names (``num_classes`` keys; counts build it with all of them).
    """

    name: str
    paper: str
    input_size: int
    min_input_size: int
    description: str
    task: Task = "classification"
    defaults: dict[str, Any] = field(default_factory=dict)
    imagenet: str | None = None
    heads: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """How a model was built: enough to build it again (stored in checkpoints as JSON)."""

    name: str
    num_classes: int | dict[str, int]
    in_channels: int
    kwargs: dict[str, Any]


_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_INFOS: dict[str, ModelInfo] = {}


def register_model(
    name: str,
    *,
    paper: str,
    input_size: int,
    min_input_size: int,
    description: str,
    task: Task = "classification",
    defaults: dict[str, Any] | None = None,
    imagenet: str | None = None,
    heads: tuple[str, ...] = (),
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that adds a factory ``fn(*, num_classes, in_channels, **kwargs) -> nn.Module`` to the zoo.

    Args:
        name: unique registry name (lower case, no spaces).
        paper: the paper (or source) the network comes from.
        input_size: the paper's input side, used for the MAC column.
        min_input_size: smallest input side of the default configuration.
        description: one line shown by ``lungscreen models list``.
        task: what the model predicts; decides which attributes :func:`create` requires (module docstring).
        defaults: architecture options the factory accepts, with their defaults.
        imagenet: torchvision weights name whose body the model can start from, if any.
        heads: head names of a multi-task model.

    Raises:
        ValueError: a name registered twice, or an unknown task (programming errors, not user input).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if name in _FACTORIES:
        raise ValueError(f"model {name!r} is already registered")

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _FACTORIES[name] = factory
        _INFOS[name] = ModelInfo(
            name=name,
            paper=paper,
            input_size=input_size,
            min_input_size=min_input_size,
            description=description,
            task=task,
            defaults=dict(defaults or {}),
            imagenet=imagenet,
            heads=tuple(heads),
        )
        return factory

    return decorate


def unregister_model(name: str) -> None:
    """Remove a model (for tests and plugins that register temporary models)."""
    _FACTORIES.pop(name, None)
    _INFOS.pop(name, None)


def list_models(pattern: str = "*", *, task: str | None = None) -> list[str]:
    """Sorted registry names matching a shell-style ``pattern`` (``"squeeze*"``), optionally of one task."""
    return sorted(
        name for name, info in _INFOS.items() if fnmatch.fnmatchcase(name, pattern) and task in (None, info.task)
    )


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a registered model; :class:`ConfigError` naming close matches otherwise."""
    _check_known(name)
    return replace(_INFOS[name], defaults=dict(_INFOS[name].defaults))  # callers may edit the copy


def create(
    name: str,
    num_classes: int | dict[str, int] = 3,
    in_channels: int = 1,
    pretrained: str | None = None,
    weights: str | Path | None = None,
    reset_head: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model, optionally starting from ImageNet or a local weights file.

    Args:
        name: registry name (see :func:`list_models`).
        num_classes: outputs of the head (output channels for segmentation).
        in_channels: 1 (grayscale, the default for radiographs) or 3.
        pretrained: ``"imagenet"`` to start the body from torchvision's ImageNet weights (needs network
            access or the file in torch's hub cache; the head stays freshly initialised).
        weights: a local checkpoint of ours or a plain ``state_dict`` file, loaded with ``weights_only=True``.
        reset_head: when the file's head does not fit (another class set), leave the head freshly
            initialised instead of failing (transfer learning).
        **kwargs: architecture options of the model (``model_info(name).defaults``).

    Returns:
        The model, in training mode, with ``model.lungscreen_spec`` recording how it was built.

    Raises:
        ConfigError: unknown name or option, bad class or channel count, weights that do not fit.
        LungscreenError: ImageNet weights that cannot be downloaded, unreadable or unsafe weights files.

    Example:
        >>> model = create("resnet18", num_classes=2, in_channels=1)     # doctest: +SKIP
        >>> model(torch.zeros(4, 1, 224, 224)).shape                     # doctest: +SKIP
        torch.Size([4, 2])
    """
    from lungscreen.models import weights as weight_loading  # cyclic: weights uses the registry

    info = model_info(name)
    _check_num_classes(num_classes, info.task)
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels must be a positive integer, got {in_channels!r}")
    unknown = sorted(set(kwargs) - set(info.defaults))
    if unknown:
        allowed = ", ".join(sorted(info.defaults)) or "none"
        raise ConfigError(f"model {name!r} has no option {', '.join(unknown)} (options: {allowed})")
    if pretrained not in (None, "imagenet"):
        raise ConfigError(f"pretrained must be None or 'imagenet', got {pretrained!r}")
    if pretrained and weights is not None:
        raise ConfigError("give either pretrained='imagenet' or weights=PATH, not both")

    try:
        model = _FACTORIES[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    except ValueError as error:  # factories validate their options with ValueError, as torchvision does
        raise ConfigError(f"model {name!r}: {error}") from error
    except TypeError as error:  # an option of the wrong type (text where a number belongs) fails deeper down
        shown = ", ".join(f"{key}={value!r}" for key, value in kwargs.items()) or "none"
        raise ConfigError(f"model {name!r}: an option has the wrong type (options: {shown}): {error}") from error
    _check_contract(name, info.task, model)
    model.lungscreen_spec = ModelSpec(name, num_classes, in_channels, dict(kwargs))

    if pretrained == "imagenet":
        weight_loading.load_imagenet(model, info)
    elif weights is not None:
        weight_loading.load_weights(model, weights, reset_head=reset_head)
    return model


def _check_num_classes(num_classes: Any, task: str) -> None:
    """An output count; a multi-task model takes head name -> count (its forward returns one output per head)."""
    if task == "multitask":
        if not isinstance(num_classes, dict) or not num_classes or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in num_classes.values()):
            raise ConfigError(f"num_classes of a multi-task model must map head names to positive integers, "
                              f"got {num_classes!r}")
    elif not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")


def _check_known(name: str) -> None:
    if name not in _INFOS:
        close = difflib.get_close_matches(name, list(_INFOS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(_INFOS))}"
        raise ConfigError(f"unknown model {name!r}{hint}")


def _check_contract(name: str, task: str, model: nn.Module) -> None:
    """Fail early, naming what is missing, when a factory breaks its task's contract (a programming error)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"factory of {name!r} returned {type(model).__name__}, not an nn.Module")
    missing = [attribute for attribute in _REQUIRED[task] if not hasattr(model, attribute)]
    if missing:
        raise TypeError(f"model {name!r} (task {task}) lacks {', '.join(missing)}; see lungscreen.models.registry")
