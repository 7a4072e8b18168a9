"""Training configs: YAML recipes read into validated dataclasses.

A recipe is one YAML file (see ``src/lungscreen/configs/``). It names the data, the model and a list of
*stages*; each stage has its own image size, epochs, trainable layer groups, optimizer, schedule and loss,
so progressive resizing and freeze-then-unfreeze are just stages. A ``defaults:`` block is merged into
every stage, so a recipe states what is common once.

Every error names its key in the dotted form ``--set`` uses (``stages.1.optimizer.lr: must be > 0``), and
unknown keys are refused, so a typo never trains silently with a default.

Example:
    >>> config = load_config("configs/covid-resnet-cpu.yaml", ["stages.0.epochs=1"])   # doctest: +SKIP
    >>> config.stages[0].epochs                                                          # doctest: +SKIP
    1
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from lungscreen.data.labels import CANONICAL_LABELS, TASKS, Task
from lungscreen.errors import ConfigError

#: Folder of the recipes shipped with the package (the repo-root ``configs/`` links here).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value}"


def _unit(value: float) -> str | None:
    return None if 0 <= value <= 1 else f"must be in [0, 1], got {value}"


def _open_unit(value: float) -> str | None:
    return None if 0 < value < 1 else f"must be in (0, 1), got {value}"


def check(fn):  # noqa: ANN001, ANN201 - tiny helper for field metadata
    """Field metadata running ``fn(value) -> error text or None`` after type conversion."""
    return {"check": fn}


@dataclass
class BalanceConfig:
    """How training batches are balanced across classes (see :mod:`lungscreen.training.sampling`).

    ``covid_percent``: COVID-Net's per-batch share of positive slots; ``weighted``: draw with replacement,
    each class equally likely; ``undersample``: every epoch a fresh random subset of each class, as large
    as the smallest class; ``none``: a plain shuffle.
    """

    method: Literal["none", "covid_percent", "weighted", "undersample"] = "none"
    covid_percent: float = field(default=0.5, metadata=check(_open_unit))
    positive_class: str = "COVID-19"


@dataclass
class DataConfig:
    """Where the images come from and how they are fed."""

    manifest: str | None = None
    task: Any = "covidx"  # a task name (covidx, covid-resnet, binary) or {name, classes, mapping}
    modality: Literal["CXR", "CT"] = "CXR"
    views: list[str] | None = None  # None: frontal views for CXR
    sources: list[str] | None = None  # keep only these sources (None: all)
    pipeline: Any = "none"  # a preprocessing pipeline name or its dict
    cache_dir: str | None = None  # disk cache of preprocessed images (None: in memory only)
    augment: str | None = None  # a named augmentation set (see lungscreen.training.data.AUGMENTATIONS)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    batch_size: int = field(default=32, metadata=check(_positive))  # global: split over the processes
    eval_batch_size: int = field(default=64, metadata=check(_positive))
    num_workers: int = field(default=0, metadata=check(_non_negative))
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"


@dataclass
class ModelConfig:
    """A model of the zoo (``lungscreen.models.create``) and where its starting weights come from."""

    name: str = ""
    in_channels: int = field(default=1, metadata=check(_positive))
    pretrained: str | None = None
    weights: str | None = None
    init_from: str | None = None  # another run's folder or checkpoint: pre-train then fine-tune
    reset_head: bool = False  # new classifier even when the class set is unchanged
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of create()


@dataclass
class OptimizerConfig:
    """Optimizer of a stage. ``lr`` is a rate, ``[first, last]`` (discriminative: spread geometrically from
    the input-side group to the head, like fastai's ``slice(1e-6, 1e-4)``), or ``find`` (LR range test; the
    head gets the suggested rate and the first group that rate divided by ``lr_spread``)."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Any = 1e-3
    lr_spread: float = field(default=1.0, metadata=check(lambda v: None if v >= 1 else f"must be >= 1, got {v}"))
    momentum: float = field(default=0.9, metadata=check(_unit))  # SGD momentum, Adam's beta1
    beta2: float = field(default=0.999, metadata=check(_open_unit))
    weight_decay: float = field(default=0.0, metadata=check(_non_negative))  # L2
    nesterov: bool = False


@dataclass
class ScheduleConfig:
    """Learning-rate schedule of a stage.

    ``one_cycle`` (peak = the stage's lr), ``plateau`` (x ``factor`` after ``patience`` epochs without
    improvement of ``monitor``), ``step`` (x ``factor`` every ``step_epochs``; paper 002: 0.8 every 5) or
    ``constant``.
    """

    name: Literal["constant", "one_cycle", "plateau", "step"] = "constant"
    factor: float = field(default=0.1, metadata=check(_open_unit))
    patience: int = field(default=5, metadata=check(_non_negative))
    step_epochs: int = field(default=5, metadata=check(_positive))
    monitor: str = "val/loss"
    pct_start: float = field(default=0.25, metadata=check(_open_unit))
    div_factor: float = field(default=25.0, metadata=check(_positive))
    final_div_factor: float = field(default=1e4, metadata=check(_positive))


@dataclass
class LossConfig:
    """Loss of a stage: cross-entropy (``ce``), ``focal`` or ``bce`` (multi-label / one-hot targets).

    ``class_weights``: None, ``balanced`` (inverse class frequency of the training rows), a list in class
    order, or a mapping class name -> weight.
    """

    name: Literal["ce", "focal", "bce"] = "ce"
    class_weights: Any = None
    gamma: float = field(default=2.0, metadata=check(_non_negative))
    label_smoothing: float = field(default=0.0, metadata=check(lambda v: None if 0 <= v < 1 else f"must be in [0, 1), got {v}"))


@dataclass
class LRFindConfig:
    """LR range test settings (used when a stage's ``optimizer.lr`` is ``find``)."""

    min_lr: float = field(default=1e-7, metadata=check(_positive))
    max_lr: float = field(default=1.0, metadata=check(_positive))
    steps: int = field(default=100, metadata=check(_positive))


@dataclass
class StageConfig:
    """One stage of a recipe: a size, a number of epochs, what trains and how.

    ``train``: ``all``, ``head`` (the last layer group), a slice text over layer groups such as ``"-2:"``,
    or a list of group indices. ``data`` overrides keys of the run's data block for this stage (a
    pre-training stage on another manifest or task); when the class set changes the head is swapped.
    """

    name: str = ""
    epochs: int = field(default=1, metadata=check(_positive))
    image_size: int = field(default=224, metadata=check(_positive))
    train: Any = "all"
    train_bn: bool = False  # keep BatchNorm layers of frozen groups trainable (fastai's train_bn)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lr_find: LRFindConfig = field(default_factory=LRFindConfig)
    data: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    reset_head: bool = False


@dataclass
class MonitorConfig:
    """The validation figure that picks ``best.pt`` and drives early stopping.

    ``metric`` defaults to ``val/sensitivity/COVID-19`` for tasks with a COVID-19 class, else ``val/loss``;
    ties are broken by the lower validation loss. ``patience`` (epochs without improvement) turns early
    stopping on; None leaves it off.
    """

    metric: str | None = None
    mode: Literal["max", "min"] | None = None
    patience: int | None = None
    min_delta: float = field(default=0.0, metadata=check(_non_negative))


@dataclass
class TrackingConfig:
    """Experiment tracking. MLflow (a dev extra) logs to a local SQLite store unless ``uri`` says otherwise."""

    mlflow: bool = False
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "lungscreen"


@dataclass
class ParamRange:
    """A search range: ``low``..``high`` (``log`` for scale parameters), an ``integer`` range, or ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: list[Any] | None = None


#: Paper 002's search space: initial learning rate, momentum and L2, applied to every stage.
DEFAULT_SEARCH = {
    "stages.*.optimizer.lr": {"low": 1e-4, "high": 1e-1, "log": True},
    "stages.*.optimizer.momentum": {"low": 0.5, "high": 0.99},
    "stages.*.optimizer.weight_decay": {"low": 1e-8, "high": 1e-2, "log": True},
}


@dataclass
class TuneConfig:
    """Optuna search. ``params`` maps dotted config keys (``*`` matches every stage) to ranges."""

    trials: int = field(default=30, metadata=check(_positive))
    metric: str | None = None  # defaults to monitor.metric
    direction: Literal["maximize", "minimize"] | None = None
    storage: str | None = None  # SQLAlchemy URL; default sqlite:///<out>/study.db
    study: str | None = None
    sampler_seed: int = 0
    pruner: Literal["median", "none"] = "median"
    startup_trials: int = field(default=5, metadata=check(_non_negative))
    heartbeat_seconds: int = field(default=30, metadata=check(_positive))
    params: dict[str, ParamRange] = field(default_factory=lambda: {k: ParamRange(**v) for k, v in DEFAULT_SEARCH.items()})


@dataclass
class DistributedConfig:
    """Data-parallel settings used when launched under ``torchrun`` (ignored in a single process)."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    sync_batchnorm: bool = True  # BatchNorm statistics over the global batch, as in one process


@dataclass
class TrainConfig:
    """A whole recipe."""

    name: str = "run"
    seed: int = 0
    precision: Literal["32", "bf16", "auto"] = "32"
    threads: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    defaults: dict[str, Any] = field(default_factory=dict)
    stages: list[StageConfig] = field(default_factory=list)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    test: bool = True  # evaluate best.pt on the test split at the end (reported, never used to choose)
    description: str = ""

    # ---- derived views -------------------------------------------------------------------------------
    def stage_data(self, index: int) -> DataConfig:
        """The data block of stage ``index``: the run's, with the stage's overrides applied."""
        overrides = self.stages[index].data
        if not overrides:
            return self.data
        merged = _deep_merge(dataclasses.asdict(self.data), overrides)
        return _build(DataConfig, merged, f"stages.{index}.data")

    def task(self, index: int = -1) -> Task:
        """The task of stage ``index`` (the last stage's by default: the one best.pt predicts)."""
        data = self.stage_data(index if index >= 0 else len(self.stages) - 1)
        return resolve_task(data.task, "data.task")

    def monitor_metric(self) -> tuple[str, str]:
        """(metric, mode) with the defaults filled in."""
        metric = self.monitor.metric
        if metric is None:
            metric = "val/sensitivity/COVID-19" if "COVID-19" in self.task().classes else "val/loss"
        mode = self.monitor.mode or ("min" if metric.endswith("loss") else "max")
        return metric, mode

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as written to a run's ``config.yaml`` (reloadable with :func:`from_dict`)."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------

def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML recipe, apply ``key=value`` overrides and validate.

    ``path`` may be a file or the name of a shipped recipe (``covid-resnet-cpu``).

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or out-of-range value (the key is named).
    """
    raw = read_yaml(resolve_config_path(path))
    return from_dict(apply_overrides(raw, overrides))


def resolve_config_path(path: str | Path) -> Path:
    """A file path, or the name of a recipe shipped in :data:`CONFIG_DIR`."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    for name in (f"{path}", f"{path}.yaml"):
        if (CONFIG_DIR / name).is_file():
            return CONFIG_DIR / name
    shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config: no such file {path} (shipped recipes: {shipped})")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"config: {path} is not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path} must hold a mapping of keys, got {type(raw).__name__}")
    return raw


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Validate plain data (from YAML) into a :class:`TrainConfig`; stage defaults are merged in."""
    raw = copy.deepcopy(raw)
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"defaults: must be a mapping, got {type(defaults).__name__}")
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError("stages: a recipe needs a non-empty list of stages")
    for index, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise ConfigError(f"stages.{index}: must be a mapping, got {type(stage).__name__}")
    raw["stages"] = [_deep_merge(defaults, stage) for stage in stages]
    config = _build(TrainConfig, raw, "")
    _check_semantics(config)
    return config


def to_raw(config: TrainConfig) -> dict[str, Any]:
    """Plain data of a validated config (stage defaults already merged), reloadable by :func:`from_dict`."""
    raw = config.to_dict()
    raw["defaults"] = {}
    for stage in raw["stages"]:
        lr = stage["optimizer"]["lr"]
        stage["optimizer"]["lr"] = list(lr) if isinstance(lr, tuple) else lr
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML; ``stages.*.x`` sets every stage)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if isinstance(value, dict) and not text.strip().startswith("{"):
            value = text  # "-2:" is a slice text, not a YAML mapping
        set_key(raw, key.strip(), value)
    return raw


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``value`` at a dotted ``key`` in nested dicts/lists; ``*`` on a list sets every element."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{key}: empty part in the dotted key")
    targets: list[Any] = [raw]
    for depth, part in enumerate(parts[:-1]):
        following: list[Any] = []
        for node in targets:
            following.extend(_step(node, part, ".".join(parts[: depth + 1]), create=True))
        targets = following
    for node in targets:
        last = parts[-1]
        if isinstance(node, list):
            for item in _step(node, last, key, create=False, want_index=True):
                node[item] = value
        else:
            node[last] = value


def _step(node: Any, part: str, key: str, *, create: bool, want_index: bool = False) -> list[Any]:
    if isinstance(node, list):
        if part == "*":
            indices = list(range(len(node)))
        else:
            try:
                indices = [int(part)]
                node[indices[0]]
            except (ValueError, IndexError):
                raise ConfigError(f"{key}: no list element {part!r} (the list has {len(node)})") from None
        return indices if want_index else [node[i] for i in indices]
    if not isinstance(node, dict):
        raise ConfigError(f"{key}: cannot descend into a {type(node).__name__}")
    if part not in node or node[part] is None:
        if not create:
            return []
        node[part] = {}
    return [node[part]]


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# ---------------------------------------------------------------------------------------------------------
# Generic dataclass builder: type conversion + key-naming errors
# ---------------------------------------------------------------------------------------------------------

def _join(prefix: str, key: str | int) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - names)
    if unknown:
        raise ConfigError(f"{_join(prefix, unknown[0])}: unknown key (allowed: {', '.join(sorted(names))})")
    values = {}
    for item in dataclasses.fields(cls):
        if item.name not in raw:
            continue
        key = _join(prefix, item.name)
        value = _convert(hints[item.name], raw[item.name], key)
        problem = item.metadata.get("check", lambda v: None)(value) if value is not None else None
        if problem:
            raise ConfigError(f"{key}: {problem}")
        values[item.name] = value
    return cls(**values)


def _convert(kind: Any, value: Any, key: str) -> Any:  # noqa: C901 - one branch per kind of type
    origin = get_origin(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        allowed = get_args(kind)
        text = str(value) if value is not None else value
        if text not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return text
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        (inner,) = get_args(kind) or (Any,)
        return [_convert(inner, v, _join(key, i)) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {value!r}")
        _, inner = get_args(kind) or (str, Any)
        return {str(k): _convert(inner, v, _join(key, k)) for k, v in value.items()}
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key}: must be an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return int(number)
    if kind is float:
        return _float(value, key)
    if kind is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: must be text, got {value!r}")
        return str(value)
    raise TypeError(f"config schema has an unsupported type {kind!r} at {key}")


def _float(value: Any, key: str) -> float:
    """A number; YAML reads ``1e-3`` (no dot) as text, so text is parsed too."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return number


# ---------------------------------------------------------------------------------------------------------
# Checks across fields (those needing the model zoo or the manifest run in prepare.prepare)
# ---------------------------------------------------------------------------------------------------------

def parse_lr(value: Any, key: str) -> float | tuple[float, float] | str:
    """A stage's ``lr``: a positive rate, ``[first, last]`` positive rates, or ``find``."""
    if isinstance(value, str) and value.strip().lower() == "find":
        return "find"
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"{key}: a discriminative rate is [first, last], got {value!r}")
        first, last = (_float(v, key) for v in value)
        if first <= 0 or last <= 0:
            raise ConfigError(f"{key}: learning rates must be > 0, got {value!r}")
        return first, last
    rate = _float(value, key)
    if rate <= 0:
        raise ConfigError(f"{key}: learning rate must be > 0, got {rate}")
    return rate


def resolve_task(spec: Any, key: str) -> Task:
    """A task name of :data:`lungscreen.data.labels.TASKS`, or an inline ``{name, classes, mapping}``."""
    if isinstance(spec, str):
        if spec not in TASKS:
            raise ConfigError(f"{key}: unknown task {spec!r}; choose one of {', '.join(TASKS)} or give "
                              "{name, classes, mapping}")
        return TASKS[spec]
    if isinstance(spec, dict):
        extra = set(spec) - {"name", "classes", "mapping", "description"}
        if extra:
            raise ConfigError(f"{key}.{sorted(extra)[0]}: unknown key (allowed: name, classes, mapping)")
        classes = spec.get("classes")
        mapping = spec.get("mapping")
        if not isinstance(classes, list) or len(classes) < 2:
            raise ConfigError(f"{key}.classes: a task needs a list of at least two class names")
        if not isinstance(mapping, dict) or not mapping:
            raise ConfigError(f"{key}.mapping: a task needs a mapping canonical label -> class name")
        for label, name in mapping.items():
            if label not in CANONICAL_LABELS:
                raise ConfigError(f"{key}.mapping.{label}: not a canonical label ({', '.join(CANONICAL_LABELS)})")
            if name not in classes:
                raise ConfigError(f"{key}.mapping.{label}: class {name!r} is not in {key}.classes")
        return Task(str(spec.get("name", "custom")), tuple(map(str, classes)), {str(k): str(v) for k, v in mapping.items()},
                    str(spec.get("description", "")))
    raise ConfigError(f"{key}: must be a task name or a mapping, got {spec!r}")


def _check_semantics(config: TrainConfig) -> None:
    if not config.model.name:
        raise ConfigError("model.name: required (see `lungscreen.models.list_models()`)")
    names = [stage.name for stage in config.stages]
    for index, stage in enumerate(config.stages):
        key = f"stages.{index}"
        if not stage.name:
            stage.name = f"stage{index}"
        if names.count(stage.name) > 1 and stage.name:
            raise ConfigError(f"{key}.name: {stage.name!r} is used by more than one stage")
        stage.optimizer.lr = parse_lr(stage.optimizer.lr, f"{key}.optimizer.lr")
        if stage.lr_find.min_lr >= stage.lr_find.max_lr:
            raise ConfigError(f"{key}.lr_find.min_lr: must be below lr_find.max_lr")
        parse_train_spec(stage.train, f"{key}.train")
        data = config.stage_data(index)
        task = resolve_task(data.task, f"{key}.data.task" if "task" in stage.data else "data.task")
        _check_weights(stage.loss.class_weights, task, f"{key}.loss.class_weights")
        if data.balance.method == "covid_percent" and data.balance.positive_class not in task.classes:
            raise ConfigError(f"data.balance.positive_class: {data.balance.positive_class!r} is not a class of task "
                              f"{task.name} ({', '.join(task.classes)})")
        if data.batch_size < 2 and index == 0:
            raise ConfigError("data.batch_size: must be >= 2 (BatchNorm needs more than one image)")
    metric, _ = config.monitor_metric()
    if not metric.startswith(("val/", "train/")):
        raise ConfigError(f"monitor.metric: {metric!r} must start with val/ or train/ (e.g. val/f1/COVID-19)")
    for key, spec in config.tune.params.items():
        if spec.choices is None and (spec.low is None or spec.high is None or spec.low >= spec.high):
            raise ConfigError(f"tune.params.{key}: needs low < high, or choices")
        if spec.log and spec.low is not None and spec.low <= 0:
            raise ConfigError(f"tune.params.{key}.low: a log range needs low > 0")


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


def _check_weights(weights: Any, task: Task, key: str) -> None:
    if weights is None or weights == "balanced":
        return
    if isinstance(weights, list):
        if len(weights) != len(task.classes):
            raise ConfigError(f"{key}: {len(weights)} weights for {len(task.classes)} classes ({', '.join(task.classes)})")
        for i, w in enumerate(weights):
            if _float(w, f"{key}.{i}") < 0:
                raise ConfigError(f"{key}.{i}: must be >= 0")
        return
    if isinstance(weights, dict):
        for name, w in weights.items():
            if name not in task.classes:
                raise ConfigError(f"{key}.{name}: not a class of task {task.name} ({', '.join(task.classes)})")
            if _float(w, f"{key}.{name}") < 0:
                raise ConfigError(f"{key}.{name}: must be >= 0")
        return
    raise ConfigError(f"{key}: must be balanced, a list or a mapping class -> weight, got {weights!r}")
