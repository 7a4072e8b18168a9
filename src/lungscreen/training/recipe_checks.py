"""A recipe's values with a grammar, and the checks of one value against the stage's task.

Pydantic (:mod:`~lungscreen.training.config`) validates each block's types and ranges; what is checked
here parses a small language (a learning rate or ``find``, a slice of layer groups, an inline task) or
holds a value against the task it serves (class weights, a loss); ``check_semantics`` in
:mod:`~lungscreen.training.config` runs these over a whole recipe. Checks that need the model zoo or the
manifest run in :func:`lungscreen.training.prepare.prepare`.
Every error names its key as ``--set`` spells it.
"""

from __future__ import annotations

import math
from typing import Any

from lungscreen.data.labels import CANONICAL_LABELS, TASK_KINDS, TASKS, Task
from lungscreen.errors import ConfigError

#: A stage's task: one task, or head name -> task for a multi-task model.
TaskSpec = Task | dict[str, Task]


def number(value: Any, key: str) -> float:
    """A finite number (YAML's ``1e-3``, read as text, included) for values in free-form fields such as ``lr``."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: must be a number, got {value!r}") from None
    if not math.isfinite(result):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return result


def parse_lr(value: Any, key: str) -> float | tuple[float, float] | str:
    """A stage's ``lr``: a positive rate, ``[first, last]`` positive rates, or ``find``."""
    if isinstance(value, str) and value.strip().lower() == "find":
        return "find"
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"{key}: a discriminative rate is [first, last], got {value!r}")
        first, last = (number(v, key) for v in value)
        if first <= 0 or last <= 0:
            raise ConfigError(f"{key}: learning rates must be > 0, got {value!r}")
        return first, last
    rate = number(value, key)
    if rate <= 0:
        raise ConfigError(f"{key}: learning rate must be > 0, got {rate}")
    return rate


def resolve_task(spec: Any, key: str) -> TaskSpec:
    """A recipe's ``data.task``: a name of :data:`lungscreen.data.labels.TASKS`; an inline
    ``{name, classes, mapping, kind, column, nested}``; or ``{heads: {head: task, ...}}`` for a multi-task
    model (each head a task name or an inline task)."""
    if isinstance(spec, str):
        if spec not in TASKS:
            raise ConfigError(f"{key}: unknown task {spec!r}; choose one of {', '.join(TASKS)} or give "
                              "{name, classes, mapping}")
        return TASKS[spec]
    if isinstance(spec, dict) and "heads" in spec:
        extra = set(spec) - {"heads"}
        if extra or not isinstance(spec["heads"], dict) or not spec["heads"]:
            raise ConfigError(f"{key}.heads: a multi-task task is {{heads: {{name: task, ...}}}} with at least one head")
        heads = {str(name): resolve_task(head, f"{key}.heads.{name}") for name, head in spec["heads"].items()}
        if any(isinstance(head, dict) for head in heads.values()):
            raise ConfigError(f"{key}.heads: a head's task cannot itself have heads")
        return heads
    if isinstance(spec, dict):
        return _inline_task(spec, key)
    raise ConfigError(f"{key}: must be a task name or a mapping, got {spec!r}")


def _inline_task(spec: dict[str, Any], key: str) -> Task:
    allowed = {"name", "classes", "mapping", "description", "kind", "column", "nested"}
    extra = set(spec) - allowed
    if extra:
        raise ConfigError(f"{key}.{sorted(extra)[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")
    kind = spec.get("kind", "multiclass")
    if kind not in TASK_KINDS:
        raise ConfigError(f"{key}.kind: must be one of {', '.join(TASK_KINDS)}, got {kind!r}")
    classes = spec.get("classes")
    mapping = spec.get("mapping")
    least = 2 if kind == "multiclass" else 1
    if not isinstance(classes, list) or len(classes) < least:
        raise ConfigError(f"{key}.classes: a {kind} task needs a list of at least {least} class name(s)")
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError(f"{key}.mapping: a task needs a mapping value -> class name")
    column = str(spec.get("column", "mask_convention" if kind == "segmentation" else "label"))
    for value, target in mapping.items():
        if column == "label" and value not in CANONICAL_LABELS:
            raise ConfigError(f"{key}.mapping.{value}: not a canonical label ({', '.join(CANONICAL_LABELS)})")
        targets = target if kind == "multilabel" else [target]
        if not isinstance(targets, list) or any(name not in classes for name in targets):
            wanted = "a list of names from" if kind == "multilabel" else "a class of"
            raise ConfigError(f"{key}.mapping.{value}: {target!r} is not {wanted} {key}.classes")
    nested = tuple(tuple(pair) for pair in spec.get("nested", []) or [])
    if any(len(pair) != 2 or any(name not in classes for name in pair) for pair in nested):
        raise ConfigError(f"{key}.nested: a list of [inner, outer] pairs of class names")
    values = {str(k): tuple(map(str, v)) if kind == "multilabel" else str(v) for k, v in mapping.items()}
    return Task(str(spec.get("name", "custom")), tuple(map(str, classes)), values, str(spec.get("description", "")),
                kind=kind, column=column, nested=nested)


def default_monitor(task: TaskSpec) -> str:
    """The validation figure that picks best.pt unless the recipe says: the COVID-19 AUC for tasks with that
    class (threshold-free: a sensitivity would pick an epoch that calls everything COVID-19), Dice for masks,
    macro AUC for multi-label heads, the loss otherwise."""
    if isinstance(task, dict):
        return "val/loss"
    if task.kind == "segmentation":
        return "val/dice"
    if task.kind == "multilabel":
        return "val/macro_auc"
    if task.kind == "detection":
        return "val/map50"
    return "val/auc/COVID-19" if "COVID-19" in task.classes else "val/loss"


#: Losses each kind of task can train with (None: the kind's own, the first listed).
LOSSES = {"multiclass": ("ce", "focal", "bce"), "multilabel": ("bce",), "segmentation": ("dice_bce",),
          "detection": ("yolo",)}


def check_loss(name: str | None, task: TaskSpec, key: str) -> None:
    if name is None or isinstance(task, dict):
        return
    if name not in LOSSES[task.kind]:
        raise ConfigError(f"{key}: {name!r} cannot train a {task.kind} task ({task.name}); use "
                          f"{' or '.join(LOSSES[task.kind])}")


def parse_train_spec(spec: Any, key: str) -> str | slice | list[int]:
    """``all`` | ``head`` | ``"a:b"`` slice text | list of group indices."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("all", "head"):
            return text
        if ":" in text:
            try:
                parts = [int(p) if p.strip() else None for p in text.split(":")]
            except ValueError:
                raise ConfigError(f"{key}: {spec!r} is not all, head, a slice like '-2:' or a list of indices") from None
            if len(parts) != 2:
                raise ConfigError(f"{key}: {spec!r} is not a slice like '-2:'")
            return slice(parts[0], parts[1])
        raise ConfigError(f"{key}: {spec!r} is not all, head, a slice like '-2:' or a list of indices")
    if isinstance(spec, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        return list(spec)
    if isinstance(spec, int) and not isinstance(spec, bool):
        return [spec]
    raise ConfigError(f"{key}: {spec!r} is not all, head, a slice like '-2:' or a list of indices")


def check_weights(weights: Any, task: Task, key: str) -> None:
    """``class_weights`` against the stage's task: one weight >= 0 per class, or known class names."""
    if weights is None or weights == "balanced":
        return
    if isinstance(weights, list):
        if len(weights) != len(task.classes):
            raise ConfigError(f"{key}: {len(weights)} weights for {len(task.classes)} classes ({', '.join(task.classes)})")
        for i, w in enumerate(weights):
            if number(w, f"{key}.{i}") < 0:
                raise ConfigError(f"{key}.{i}: must be >= 0")
        return
    if isinstance(weights, dict):
        for name, w in weights.items():
            if name not in task.classes:
                raise ConfigError(f"{key}.{name}: not a class of task {task.name} ({', '.join(task.classes)})")
            if number(w, f"{key}.{name}") < 0:
                raise ConfigError(f"{key}.{name}: must be >= 0")
        return
    raise ConfigError(f"{key}: must be balanced, a list or a mapping class -> weight, got {weights!r}")
