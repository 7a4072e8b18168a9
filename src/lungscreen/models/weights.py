"""Loading weights into the zoo's models safely: ImageNet via torchvision, local files, head transfer.

Every file is read with ``torch.load(..., weights_only=True)``: tensors and plain containers only, so a file
crafted to run code on load is refused (:class:`UnsafeWeightsError`) instead of executed.

Rules shared by every path:

- The first convolution adapts to the model's input channels: RGB weights loaded into a 1-channel model
  are summed over the colour axis (a gray image fed as R = G = B gives the same response).
- Head tensors whose shape does not fit (another class set) raise :class:`~lungscreen.errors.ConfigError`
  naming them, unless ``reset_head=True``: then the whole head keeps its fresh initialisation (transfer).
- Any other mismatch, missing or unexpected tensor is an error naming the layers: a silently half-loaded
  model is worse than none.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import urllib.error
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lungscreen.errors import ConfigError, UnsafeWeightsError, WeightsError

CHECKPOINT_FORMAT = "lungscreen-checkpoint"
_MAX_LISTED = 6
_SCAN_BYTES = 1 << 20
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


def read_weights_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Read a weights file without executing anything: ``(state_dict, metadata or None)``.

    Understands our checkpoints (:mod:`lungscreen.models.checkpoint`), Lightning checkpoints (their
    ``state_dict``) and plain ``state_dict`` files (torchvision's ImageNet files among them).

    Raises:
        WeightsError: missing or unreadable file, or no state_dict inside.
        UnsafeWeightsError: the file holds arbitrary pickled objects.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol precedes our own verdict
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if _holds_code(path, error):
            raise UnsafeWeightsError(
                f"{path}: refused: the file holds pickled Python objects besides tensors, which could run code "
                "when loaded; lungscreen only reads plain weights (tensors, numbers, strings, lists, dicts)"
            ) from error
        raise WeightsError(f"{path}: not a readable PyTorch weights file (not a pickle or zip archive)") from error
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            zipfile.BadZipFile) as error:  # what torch's unpickler raises on arbitrary bytes
        reason = f"{type(error).__name__}: {error}" if isinstance(error, (KeyError, IndexError)) else str(error)
        raise WeightsError(f"{path}: not a readable PyTorch weights file ({reason})") from error

    meta = None
    if isinstance(content, Mapping) and content.get("format") == CHECKPOINT_FORMAT:
        try:
            meta = {**json.loads(content["meta"]), "format_version": int(content["version"])}
            state = content["state_dict"]
        except (KeyError, TypeError, ValueError) as error:
            raise WeightsError(f"{path}: a damaged lungscreen checkpoint ({error!r})") from error
    elif isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        state = content["state_dict"]  # Lightning and most training scripts
    else:
        state = content
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in state.items()
    ):
        raise WeightsError(f"{path}: holds no state_dict (a mapping of parameter names to tensors)")
    return dict(state), meta


def _holds_code(path: Path, error: Exception) -> bool:
    """Whether a file torch refused is a pickle that imports or calls something, read without running it."""
    if "global" in str(error).lower():  # torch names the forbidden import (zip archives)
        return True
    try:
        with path.open("rb") as handle:
            for opcode, _, _ in pickletools.genops(io.BytesIO(handle.read(_SCAN_BYTES))):
                if opcode.name in _CODE_OPCODES:
                    return True
    except Exception:  # not a pickle (or cut short): nothing that imports was seen
        pass
    return False


def load_weights(model: nn.Module, path: str | Path, *, reset_head: bool = False) -> None:
    """Load a local weights file into ``model`` (see the module docstring for the rules).

    A file in torchvision's ImageNet layout (no key in common with the model) is converted by the model's
    ``imagenet_state`` when it has one, so the file a user fetched by hand loads like ``pretrained="imagenet"``.
    """
    state, _ = read_weights_file(path)
    state = _strip_wrapper_prefix(state, model.state_dict())
    if hasattr(model, "imagenet_state") and not set(state) & set(model.state_dict()):
        _load_converted_imagenet(model, model.imagenet_state(state), source=str(path))
        return
    merge_state(model, state, source=str(path), reset_head=reset_head)


def load_imagenet(model: nn.Module, info: Any) -> None:
    """Start ``model``'s body from torchvision's ImageNet weights named by ``info.imagenet``.

    Raises:
        ConfigError: the model has no ImageNet weights.
        WeightsError: the download failed (no network): the message says how to pass a local file.
    """
    if not info.imagenet or not hasattr(model, "imagenet_state"):
        raise ConfigError(f"model {info.name!r} has no ImageNet weights; use pretrained=None or weights=PATH")
    state = fetch_imagenet_state(info.imagenet)
    _load_converted_imagenet(model, model.imagenet_state(state), source=f"ImageNet weights {info.imagenet}")


def fetch_imagenet_state(weights_name: str) -> dict[str, Tensor]:
    """torchvision's ImageNet ``state_dict`` from its hub cache, downloading it when absent."""
    import torchvision

    weights = torchvision.models.get_weight(weights_name)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeWeightsError(f"{cached}: refused: the cached file holds pickled Python objects") from error
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        reason = getattr(error, "reason", None) or error
        raise WeightsError(
            f"could not download the ImageNet weights {weights_name} from {weights.url} ({reason}). "
            f"Without network access, fetch that file elsewhere and either pass weights='/path/to/"
            f"{cached.name}' or copy it to {cached}, where torchvision looks first"
        ) from error


def merge_state(
    model: nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str,
    reset_head: bool = False,
    allow_missing: bool = False,
) -> None:
    """Copy ``state`` into ``model`` after adapting the input conv; fail naming every layer that does not fit.

    Args:
        model: the model to fill.
        state: parameter name -> tensor, in the model's naming.
        source: named in error messages (a path, "ImageNet weights ...").
        reset_head: keep the model's fresh head instead of loading the file's (transfer to new classes).
        allow_missing: tolerate model tensors absent from ``state`` (layers the source never had).

    A model's ``optional_parts`` (state-dict prefixes of heads a multi-task model may or may not have) move
    by name: the file's heads the model lacks are left behind, the model's heads the file lacks stay fresh.
    """
    own = model.state_dict()
    optional = tuple(getattr(model, "optional_parts", ()))
    state = {key: value for key, value in state.items() if key in own or not key.startswith(optional)}
    _adapt_input_conv(model, own, state)

    head = head_prefix(model)

    def in_head(key: str) -> bool:
        return head is not None and key.startswith(head)

    if reset_head:
        if head is None:
            raise ConfigError(f"reset_head=True but model {_model_name(model)} has no classifier or head to reset")
        state = {key: value for key, value in state.items() if not in_head(key)}

    unexpected = sorted(set(state) - set(own))
    missing = sorted(
        key for key in set(own) - set(state)
        if not key.endswith("num_batches_tracked") and not (reset_head and in_head(key)) and not key.startswith(optional)
    )
    mismatched = sorted(key for key in set(own) & set(state) if own[key].shape != state[key].shape)
    only_the_head_differs = not unexpected and (allow_missing or not missing) and all(map(in_head, mismatched))
    if mismatched and only_the_head_differs:
        raise ConfigError(
            f"{source}: the head does not fit model {_model_name(model)}: "
            + _describe_shapes(mismatched, state, own)
            + "; pass reset_head=True to re-initialise the head (transfer to a new class set)"
        )
    problems = []
    if mismatched:
        problems.append("shapes differ for " + _describe_shapes(mismatched, state, own))
    if unexpected:
        problems.append("unknown to the model: " + _listed(unexpected))
    if missing and not allow_missing:
        problems.append("missing from the file: " + _listed(missing))
    if problems:
        raise ConfigError(f"{source} does not fit model {_model_name(model)}: " + "; ".join(problems))

    merged = {**own, **state}
    model.load_state_dict(merged, strict=True)


def head_prefix(model: nn.Module) -> str | None:
    """State-dict prefix of the model's head (``classifier`` or, for segmentation models, ``head``)."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Module):
        head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        return None
    for name, module in model.named_modules():
        if module is head and name:
            return name + "."
    return None


def input_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first convolution registered in the model: the one that sees the image."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    return None


def _load_converted_imagenet(model: nn.Module, state: dict[str, Tensor], *, source: str) -> None:
    """ImageNet weights cover the body only: the head (and layers torchvision never had) stay fresh."""
    head = head_prefix(model)
    state = {key: value for key, value in state.items() if head is None or not key.startswith(head)}
    if not state:
        raise ConfigError(f"{source} holds no weights for the body of model {_model_name(model)}")
    merge_state(model, state, source=source, allow_missing=True)


def _adapt_input_conv(model: nn.Module, own: Mapping[str, Tensor], state: dict[str, Tensor]) -> None:
    """Sum RGB filters for a 1-channel model (and average-replicate for other channel counts)."""
    found = input_conv(model)
    if found is None:
        return
    key = found[0] + ".weight"
    if key not in state or key not in own or state[key].shape == own[key].shape:
        return
    loaded, wanted = state[key], own[key]
    if loaded.dim() != 4 or loaded.shape[0] != wanted.shape[0] or loaded.shape[2:] != wanted.shape[2:]:
        return  # a genuine mismatch: merge_state reports it
    summed = loaded.sum(dim=1, keepdim=True)
    if wanted.shape[1] == 1:
        state[key] = summed
    else:  # keep the response to a gray image unchanged whatever the channel count
        state[key] = summed.repeat(1, wanted.shape[1], 1, 1) / wanted.shape[1]


def _strip_wrapper_prefix(state: dict[str, Tensor], own: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop a ``module.`` (DataParallel) or ``model.`` (Lightning) prefix when the model does not use it."""
    for prefix in ("module.", "model."):
        if state and all(key.startswith(prefix) for key in state) and not any(k.startswith(prefix) for k in own):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def _describe_shapes(keys: list[str], state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> str:
    shown = [f"{key} is {tuple(state[key].shape)} in the file but {tuple(own[key].shape)} in the model"
             for key in keys[:_MAX_LISTED]]
    more = f" (and {len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(shown) + more


def _listed(keys: list[str]) -> str:
    more = f" (and {len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def _model_name(model: nn.Module) -> str:
    spec = getattr(model, "lungscreen_spec", None)
    return repr(spec.name) if spec else type(model).__name__
