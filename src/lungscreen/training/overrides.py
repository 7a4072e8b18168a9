"""``--set dotted.key=value`` overrides of a recipe's plain data, applied before validation.

Overrides edit the raw YAML data (nested dicts and lists), not the validated config, so every value goes
through the same schema and checks as one written in the recipe file.

A stage whose name ends in its image size (``all-256``) is renamed when an override changes that size
(``stages.0.image_size=64`` runs ``all-64``), so the run folder, its log and its summary never say 256 px
for a stage that ran at 64; a name the overrides set themselves is kept.

Example:
    >>> apply_overrides({"stages": [{"epochs": 1}, {"epochs": 2}]}, ["stages.*.epochs=4"])
    {'stages': [{'epochs': 4}, {'epochs': 4}]}
    >>> apply_overrides({"stages": [{"name": "all-256", "image_size": 256}]}, ["stages.0.image_size=64"])
    {'stages': [{'name': 'all-64', 'image_size': 64}]}
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from lungscreen.errors import ConfigError

#: A layer-group slice (``-2:``, ``1:3``, ``:4``): kept as text, since YAML reads ``-2:`` as a mapping and
#: ``1:3`` as the base-60 integer 63.
_SLICE = re.compile(r"\s*[-+]?\d*\s*:\s*[-+]?\d*\s*")


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML; ``stages.*.x`` sets every stage).

    Returns a copy; ``raw`` is left unchanged.

    Raises:
        ConfigError: an item without ``=``, a value that is not valid YAML, or a key that does not fit the data.
    """
    before = raw
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        set_key(raw, key.strip(), parse_value(key.strip(), text))
    rename_resized_stages(before, raw)
    return raw


#: A stage name that ends in a size: ``all-256``, ``head_128``, ``stage224``.
_SIZED_NAME = re.compile(r"(?P<stem>.*?)(?P<size>\d+)")


def rename_resized_stages(before: dict[str, Any], after: dict[str, Any]) -> None:
    """In ``after``, rename each stage whose name ends in the image size it had in ``before`` and whose size
    the overrides changed (its name left as it was): ``all-256`` at 64 px becomes ``all-64``."""
    old_stages, new_stages = before.get("stages"), after.get("stages")
    if not isinstance(old_stages, list) or not isinstance(new_stages, list):
        return
    taken = {str(stage.get("name")) for stage in new_stages if isinstance(stage, dict)}
    for old, new in zip(old_stages, new_stages):
        if not isinstance(old, dict) or not isinstance(new, dict) or new.get("name") != old.get("name"):
            continue
        found = _SIZED_NAME.fullmatch(str(old.get("name", "")))
        size = new.get("image_size")
        if found and str(old.get("image_size")) == found["size"] and size != old.get("image_size"):
            name, count = f"{found['stem']}{size}", 1
            while name in taken:  # several stages brought to one size: head-64, all-64, head-64-2, ...
                count += 1
                name = f"{found['stem']}{size}-{count}"
            taken.add(name)
            new["name"] = name


def parse_value(key: str, text: str) -> Any:
    """The YAML value of ``text``; a slice text or an unbraced ``a: b`` stays text (see :data:`_SLICE`).

    Raises:
        ConfigError: ``text`` is not valid YAML (``[1,``); the message names ``key``.
    """
    if _SLICE.fullmatch(text):
        return text.strip()
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as error:  # ValueError: a bad explicit tag such as ``!!int x``
        reason = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{key}: the value {text!r} is not valid YAML ({reason})") from None
    if isinstance(value, dict) and not text.strip().startswith("{"):
        return text  # "name: x" without braces is meant as text, not as a mapping
    return value


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``value`` at a dotted ``key`` in nested dicts/lists; ``*`` on a list sets every element.

    Missing or null mappings on the way are created, so ``stages.0.optimizer.lr`` works on a stage without an
    ``optimizer`` block; list elements are never created.

    Raises:
        ConfigError: an empty key part, a list index that does not exist, or a key below a plain value.
    """
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{key}: empty part in the dotted key")
    targets: list[Any] = [raw]
    for depth, part in enumerate(parts[:-1]):
        prefix = ".".join(parts[: depth + 1])
        targets = [child for node in targets for child in _children(node, part, prefix)]
    last = parts[-1]
    for node in targets:
        if isinstance(node, list):
            for index in _indices(node, last, key):
                node[index] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"{key}: cannot set a key inside {node!r} (not a mapping or list)")


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``update`` merged in: nested mappings merge, anything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _children(node: Any, part: str, key: str) -> list[Any]:
    """The nodes ``part`` names below ``node`` (a missing or null mapping entry becomes ``{}``)."""
    if isinstance(node, list):
        return [node[i] for i in _indices(node, part, key)]
    if not isinstance(node, dict):
        raise ConfigError(f"{key}: cannot set a key inside {node!r} (not a mapping or list)")
    if node.get(part) is None:
        node[part] = {}
    return [node[part]]


def _indices(node: list[Any], part: str, key: str) -> list[int]:
    """List positions named by ``part``: ``*`` for all, else one existing (possibly negative) index."""
    if part == "*":
        return list(range(len(node)))
    try:
        index = int(part)
        node[index]
    except (ValueError, IndexError):
        raise ConfigError(f"{key}: no list element {part!r} (the list has {len(node)})") from None
    return [index]
