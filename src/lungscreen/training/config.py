"""Training configs: YAML recipes validated into pydantic models.

A recipe is one YAML file (see ``src/lungscreen/configs/``). It names the data, the model and a list of
*stages*; each stage has its own image size, epochs, trainable layer groups, optimizer, schedule and loss,
so progressive resizing and freeze-then-unfreeze are just stages. A ``defaults:`` block is merged into
every stage, so a recipe states what is common once.

Every error is one :class:`~lungscreen.errors.ConfigError` naming its key in the dotted form ``--set`` uses
(``stages.1.optimizer.lr: must be > 0``), and unknown keys are refused, so a typo never trains silently
with a default. The validated objects are plain mutable models: code may read and assign attributes.

Example:
    >>> config = load_config("configs/covid-resnet-cpu.yaml", ["stages.0.epochs=1"])   # doctest: +SKIP
    >>> config.stages[0].epochs                                                          # doctest: +SKIP
    1
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FiniteFloat,
    StrictBool,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from lungscreen.errors import ConfigError
from lungscreen.training.overrides import apply_overrides, deep_merge, set_key
from lungscreen.training.recipe_checks import (
    TaskSpec,
    check_loss,
    check_weights,
    default_monitor,
    parse_lr,
    parse_train_spec,
    resolve_task,
)

__all__ = [
    "CONFIG_DIR", "DEFAULT_SEARCH", "AdversaryConfig", "BalanceConfig", "DataConfig", "ModelConfig", "OptimizerConfig", "ScheduleConfig",
    "LossConfig", "LRFindConfig", "StageConfig", "MonitorConfig", "TrackingConfig", "ParamRange", "TuneConfig",
    "DistributedConfig", "GateConfig", "TrainConfig", "load_config", "resolve_config_path", "read_yaml", "from_dict", "to_raw",
    "apply_overrides", "set_key", "error_message",
]

#: Folder of the recipes shipped with the package (the repo-root ``configs/`` links here).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _no_bool(kind: str) -> BeforeValidator:
    """Refuse ``true``/``false`` where a number is due (pydantic's lax mode would read them as 1 and 0)."""
    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise PydanticCustomError("bool_as_number", "must be {kind}, got {value}",
                                      {"kind": kind, "value": str(value)})
        return value
    return BeforeValidator(check)


Int = Annotated[int, _no_bool("an integer")]  # lax: "3" and 3.0 pass, 2.5 and "abc" do not
Float = Annotated[FiniteFloat, _no_bool("a number")]  # lax: YAML reads 1e-3 (no dot) as text; it passes
Bool = StrictBool  # only true/false: 1 or "yes" are refused
Rate = Annotated[Float, Field(gt=0, lt=1)]


def _fail(message: str, key: str | None = None, **context: Any) -> PydanticCustomError:
    """A validator error; ``key`` is appended to the error's location (a field of a model-level check)."""
    return PydanticCustomError("lungscreen", message, {**context, **({"key": key} if key else {})})


class _Section(BaseModel):
    """Base of every recipe block: unknown keys refused (naming the allowed ones), an empty block = defaults."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False, coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        """Runs before field validation, so a misspelt key is reported before the values it would hide."""
        if data is None:  # "balance:" with nothing under it
            return {}
        if isinstance(data, dict):
            unknown = sorted(set(map(str, data)) - set(cls.model_fields))
            if unknown:
                raise _fail("unknown key (allowed: {allowed})", unknown[0], allowed=", ".join(sorted(cls.model_fields)))
        return data


Section = TypeVar("Section", bound=_Section)


class BalanceConfig(_Section):
    """How training batches are balanced across classes (see :mod:`lungscreen.training.sampling`).

    ``covid_percent``: COVID-Net's per-batch share of positive slots; ``weighted``: draw with replacement,
    each class equally likely; ``undersample``: every epoch a fresh random subset of each class, as large
    as the smallest class; ``none``: a plain shuffle; ``alternate`` (multi-task): every batch from the images
    labelled for one of ``heads``, the heads taking turns (an image goes with the first of them it has a
    label for; images with none are left out of the stage); ``source_label``: the class independent of the
    source in every batch (each class alike within each source holding every class; ``source_weights`` size
    or equal across those sources), the sources missing a class given ``partial_share`` of the draws or left
    out (``partial_sources: exclude``).
    """

    method: Literal["none", "covid_percent", "weighted", "undersample", "alternate", "source_label"] = "none"
    covid_percent: Rate = 0.5
    positive_class: str = "COVID-19"
    heads: list[str] = Field(default_factory=list)
    partial_sources: Literal["weight", "exclude"] = "weight"
    partial_share: Float = Field(0.1, ge=0, lt=1)
    source_weights: Literal["size", "equal"] = "size"


class DataConfig(_Section):
    """Where the images come from and how they are fed."""

    manifest: str | None = None
    task: Any = "covidx"  # a task name (covidx, covid-resnet, binary) or {name, classes, mapping}
    modality: Literal["CXR", "CT"] = "CXR"
    views: list[str] | None = None  # None: frontal views for CXR
    sources: list[str] | None = None  # keep only these sources (None: all)
    pipeline: Any = "none"  # a preprocessing pipeline name or its dict
    cache_dir: str | None = None  # disk cache of preprocessed images (None: in memory only)
    augment: str | None = None  # a named augmentation set (see lungscreen.training.data.AUGMENTATIONS)
    balance: BalanceConfig = Field(default_factory=BalanceConfig)
    batch_size: Int = Field(32, gt=0)  # global: split over the processes
    eval_batch_size: Int = Field(64, gt=0)
    num_workers: Int = Field(0, ge=0)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"


class ModelConfig(_Section):
    """A model of the zoo (``lungscreen.models.create``) and where its starting weights come from."""

    name: str = ""
    in_channels: Int = Field(1, gt=0)
    pretrained: str | None = None
    weights: str | None = None
    init_from: str | None = None  # another run's folder or checkpoint: pre-train then fine-tune
    reset_head: Bool = False  # new classifier even when the class set is unchanged
    options: dict[str, Any] = Field(default_factory=dict)  # extra keyword arguments of create(), passed as is


class OptimizerConfig(_Section):
    """Optimizer of a stage. ``lr`` is a rate, ``[first, last]`` (discriminative: spread geometrically from
    the input-side group to the head, like fastai's ``slice(1e-6, 1e-4)``), or ``find`` (LR range test; the
    head gets the suggested rate and the first group that rate divided by ``lr_spread``)."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Any = 1e-3  # checked and normalised by parse_lr in from_dict
    lr_spread: Float = Field(1.0, ge=1)
    momentum: Float = Field(0.9, ge=0, le=1)  # SGD momentum, Adam's beta1
    beta2: Rate = 0.999
    weight_decay: Float = Field(0.0, ge=0)  # L2
    nesterov: Bool = False


class ScheduleConfig(_Section):
    """Learning-rate schedule of a stage.

    ``one_cycle`` (peak = the stage's lr), ``plateau`` (x ``factor`` after ``patience`` epochs without
    improvement of ``monitor``), ``step`` (x ``factor`` every ``step_epochs``; paper 002: 0.8 every 5) or
    ``constant``.
    """

    name: Literal["constant", "one_cycle", "plateau", "step"] = "constant"
    factor: Rate = 0.1
    patience: Int = Field(5, ge=0)
    step_epochs: Int = Field(5, gt=0)
    monitor: str = "val/loss"
    pct_start: Rate = 0.25
    div_factor: Float = Field(25.0, gt=0)
    final_div_factor: Float = Field(1e4, gt=0)


class LossConfig(_Section):
    """Loss of a stage: cross-entropy (``ce``), ``focal``, ``bce`` (multi-label / one-hot targets) or
    ``dice_bce`` (masks); None takes the task's own (ce, bce for multi-label, dice_bce for masks).

    ``class_weights``: None, ``balanced`` (inverse class frequency of the training rows), a list in class
    order, or a mapping class name -> weight (checked against the task in from_dict). ``nested_weight``:
    weight of the BCE on pixels a mask teaches only through nested channels (the lung conventions).
    ``head_weights``: a multi-task model's head name -> weight of its loss in the sum.
    ``spectral_decoupling``: lambda of the spectral-decoupling penalty ``lambda / 2 * mean ||logits||^2`` added
    to a classifier's loss (Pohjonen et al. 2022: the penalty keeps a network from leaning on the few
    features that separate the training data best, such as a hospital's marks; 0 turns it off).
    """

    name: Literal["ce", "focal", "bce", "dice_bce", "yolo"] | None = None
    class_weights: Any = None
    gamma: Float = Field(2.0, ge=0)
    label_smoothing: Float = Field(0.0, ge=0, lt=1)
    nested_weight: Float = Field(0.5, ge=0)
    head_weights: dict[str, Float] = Field(default_factory=dict)
    spectral_decoupling: Float = Field(0.0, ge=0)


class LRFindConfig(_Section):
    """LR range test settings (used when a stage's ``optimizer.lr`` is ``find``)."""

    min_lr: Float = Field(1e-7, gt=0)
    max_lr: Float = Field(1.0, gt=0)
    steps: Int = Field(100, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> LRFindConfig:
        if self.min_lr >= self.max_lr:
            raise _fail("must be below lr_find.max_lr", "min_lr")
        return self


class TeacherForcingConfig(_Section):
    """Paper 001's teacher forcing of a multi-task model's box and mask heads: per batch, with probability
    ``p`` they learn from the true positives, otherwise from the images the ``gate`` head (the findings)
    passes at ``threshold`` (the paper uses p = 0.9)."""

    p: Float = Field(0.9, ge=0, le=1)
    gate: str = "findings"
    threshold: Float = Field(0.5, gt=0, lt=1)


class SimCLRConfig(_Section):
    """Settings of an ``objective: simclr`` stage (:mod:`lungscreen.training.contrastive`): the NT-Xent
    ``temperature``, the projection head's ``hidden_dim`` and ``out_dim``, and the two-view transform's
    smallest crop share ``min_scale`` and largest ``rotation`` (degrees)."""

    temperature: Float = Field(0.1, gt=0)
    hidden_dim: Int = Field(512, gt=0)
    out_dim: Int = Field(128, gt=0)
    min_scale: Float = Field(0.3, gt=0, le=1)
    rotation: Float = Field(15.0, ge=0, le=180)


class AdversaryConfig(_Section):
    """A site adversary for a classification stage (:mod:`lungscreen.training.heads`): a head predicting the
    image's source from the encoder's embedding through a gradient-reversal layer, so the
    encoder learns features the head cannot tell the sources apart by. ``class_conditional``: the head
    predicts the source within each class (it removes the site, not the disease). The reversal's strength
    ramps from 0 to ``weight`` over the stage as ``2 / (1 + exp(-gamma * progress)) - 1`` (Ganin & Lempitsky
    2015); ``hidden_dim`` is the head's hidden width. ``mode``: ``reversal`` (the encoder maximises the head's
    loss, Ganin's layer) or ``confusion`` (the encoder drives the head's answer towards uniform, the head
    learning on detached features; Tzeng et al. 2015, Alvi et al. 2018): a reversed encoder may merely flip
    what the head reads - the head then names the wrong source every time, and a linear probe still tells
    the sources apart - while a confused one must drop it."""

    weight: Float = Field(1.0, gt=0)
    gamma: Float = Field(10.0, gt=0)
    hidden_dim: Int = Field(128, gt=0)
    class_conditional: Bool = True
    mode: Literal["reversal", "confusion"] = "reversal"


class StageConfig(_Section):
    """One stage of a recipe: a size, a number of epochs, what trains and how.

    ``train``: ``all``, ``head`` (the last layer group), a slice text over layer groups such as ``"-2:"``,
    or a list of group indices. ``data`` overrides keys of the run's data block for this stage (a
    pre-training stage on another manifest or task); when the class set changes the head is swapped.
    """

    name: str = ""
    epochs: Int = Field(1, gt=0)
    image_size: Int = Field(224, gt=0)
    train: Any = "all"  # checked by parse_train_spec in from_dict
    train_bn: Bool = False  # keep BatchNorm layers of frozen groups trainable (fastai's train_bn)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    lr_find: LRFindConfig = Field(default_factory=LRFindConfig)
    data: dict[str, Any] = Field(default_factory=dict)  # validated merged into the run's, by stage_data
    init_from: str | None = None
    reset_head: Bool = False
    teacher_forcing: TeacherForcingConfig | None = None
    objective: Literal["supervised", "simclr"] = "supervised"  # simclr: self-supervised, labels unused
    adversary: AdversaryConfig | None = None  # a site adversary beside the classifier (training only)
    simclr: SimCLRConfig = Field(default_factory=SimCLRConfig)


class MonitorConfig(_Section):
    """The validation figure that picks ``best.pt`` and drives early stopping.

    ``metric`` defaults to ``val/auc/COVID-19`` for tasks with a COVID-19 class, else ``val/loss``;
    ties are broken by the lower validation loss. ``patience`` (epochs without improvement) turns early
    stopping on; None leaves it off.
    """

    metric: str | None = None
    mode: Literal["max", "min"] | None = None
    patience: Int | None = None
    min_delta: Float = Field(0.0, ge=0)


class OperatingPointConfig(_Section):
    """The decision threshold chosen on validation after training, stored in best.pt's inference spec and
    applied unchanged to test and every later prediction. ``positive_class`` None means COVID-19 where the
    task has it (otherwise the most probable class decides); ``sensitivity`` is the target it must reach."""

    enabled: Bool = True
    positive_class: str | None = None
    sensitivity: Float = Field(0.95, gt=0, le=1)


class GateConfig(_Section):
    """The out-of-distribution gate fitted on best.pt after training (:mod:`lungscreen.inference.gate`): its
    embedding statistics from up to ``train_images`` training images, its limits set on the validation split
    to refuse at most ``target`` of it. Images beyond it are not screened by predict, serve and pacs."""

    enabled: Bool = True
    target: Rate = 0.03
    train_images: Int = Field(1000, ge=20)


class TrackingConfig(_Section):
    """Experiment tracking. MLflow (a dev extra) logs to a local SQLite store unless ``uri`` says otherwise."""

    mlflow: Bool = False
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "lungscreen"


class ParamRange(_Section):
    """A search range: ``low``..``high`` (``log`` for scale parameters), an ``integer`` range, or ``choices``."""

    low: Float | None = None
    high: Float | None = None
    log: Bool = False
    integer: Bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _usable(self) -> ParamRange:
        if self.choices is None and (self.low is None or self.high is None or self.low >= self.high):
            raise _fail("needs low < high, or choices")
        if self.log and self.low is not None and self.low <= 0:
            raise _fail("a log range needs low > 0", "low")
        return self


#: Paper 002's search space: initial learning rate, momentum and L2, applied to every stage.
DEFAULT_SEARCH = {
    "stages.*.optimizer.lr": {"low": 1e-4, "high": 1e-1, "log": True},
    "stages.*.optimizer.momentum": {"low": 0.5, "high": 0.99},
    "stages.*.optimizer.weight_decay": {"low": 1e-8, "high": 1e-2, "log": True},
}


class TuneConfig(_Section):
    """Optuna search. ``params`` maps dotted config keys (``*`` matches every stage) to ranges."""

    trials: Int = Field(30, gt=0)
    metric: str | None = None  # defaults to monitor.metric
    direction: Literal["maximize", "minimize"] | None = None
    storage: str | None = None  # SQLAlchemy URL; default sqlite:///<out>/study.db
    study: str | None = None
    sampler_seed: Int = 0
    pruner: Literal["median", "none"] = "median"
    startup_trials: Int = Field(5, ge=0)
    heartbeat_seconds: Int = Field(30, gt=0)
    params: dict[str, ParamRange] = Field(
        default_factory=lambda: {key: ParamRange.model_validate(spec) for key, spec in DEFAULT_SEARCH.items()})


class DistributedConfig(_Section):
    """Data-parallel settings used when launched under ``torchrun`` (ignored in a single process)."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    sync_batchnorm: Bool = True  # BatchNorm statistics over the global batch, as in one process


def _text(value: Any) -> Any:
    """YAML reads ``precision: 32`` as a number; the choice is the text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class TrainConfig(_Section):
    """A whole recipe."""

    name: str = "run"
    seed: Int = 0
    precision: Annotated[Literal["32", "bf16", "auto"], BeforeValidator(_text)] = "32"
    threads: Int | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    defaults: dict[str, Any] = Field(default_factory=dict)
    stages: list[StageConfig] = Field(default_factory=list)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    operating_point: OperatingPointConfig = Field(default_factory=OperatingPointConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    test: Bool = True  # evaluate best.pt on the test split at the end (reported, never used to choose)
    description: str = ""

    def stage_data(self, index: int) -> DataConfig:
        """The data block of stage ``index``: the run's, with the stage's overrides applied."""
        overrides = self.stages[index].data
        if not overrides:
            return self.data
        return _validate(DataConfig, deep_merge(self.data.model_dump(), overrides), f"stages.{index}.data")

    def task(self, index: int = -1) -> TaskSpec:
        """The task of stage ``index`` (the last stage's by default: the one best.pt predicts)."""
        data = self.stage_data(index if index >= 0 else len(self.stages) - 1)
        return resolve_task(data.task, "data.task")

    def monitor_metric(self) -> tuple[str, str]:
        """(metric, mode) with the defaults filled in (see :func:`~lungscreen.training.recipe_checks.default_monitor`)."""
        metric = self.monitor.metric or default_monitor(self.task())
        mode = self.monitor.mode or ("min" if metric.endswith("loss") else "max")
        return metric, mode

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data of every field (a discriminative lr stays a tuple; :func:`to_raw` makes YAML)."""
        return self.model_dump()


# ---------------------------------------------------------------------------------------------------------
# Errors: one line per problem, named by its --set key
# ---------------------------------------------------------------------------------------------------------

_REASONS = {
    "int_parsing": "must be an integer, got {input!r}", "int_from_float": "must be an integer, got {input!r}",
    "int_type": "must be an integer, got {input!r}", "float_parsing": "must be a number, got {input!r}",
    "float_type": "must be a number, got {input!r}", "finite_number": "must be a finite number, got {input!r}",
    "bool_type": "must be true or false, got {input!r}", "string_type": "must be text, got {input!r}",
    "list_type": "must be a list, got {input!r}", "dict_type": "must be a mapping, got {input!r}",
    "model_type": "must be a mapping, got {input!r}", "model_attributes_type": "must be a mapping, got {input!r}",
    "literal_error": "must be one of {expected}, got {input!r}", "extra_forbidden": "unknown key",
    "greater_than": "must be > {gt}, got {input}", "greater_than_equal": "must be >= {ge}, got {input}",
    "less_than": "must be < {lt}, got {input}", "less_than_equal": "must be <= {le}, got {input}",
}


def error_message(error: ValidationError, prefix: str = "") -> str:
    """``dotted.key: reason`` for the first error of ``error``, the key spelled as ``--set`` spells it.

    ``prefix`` is the dotted key of the validated block (``stages.0.data``) when it is not the whole recipe.
    Pydantic's own wording is kept only for errors this module does not word itself.
    """
    first = error.errors(include_url=False)[0]
    context = {k: f"{v:g}" if isinstance(v, float) else v for k, v in first.get("ctx", {}).items()}
    parts = [prefix] if prefix else []
    parts += [str(part) for part in first["loc"]] + ([str(context["key"])] if "key" in context else [])
    template = _REASONS.get(first["type"])
    reason = template.format(input=first["input"], **context) if template else first["msg"]
    return f"{'.'.join(parts) or 'config'}: {reason}"


def _validate(model: type[Section], raw: Any, prefix: str = "") -> Section:
    """``model`` validated from ``raw``; any problem becomes one :class:`ConfigError`."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(error_message(error, prefix)) from None


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
    """The mapping in a YAML file; a parse error or a non-mapping document is a :class:`ConfigError`."""
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
    raw["stages"] = [deep_merge(defaults, stage) for stage in stages]
    config = _validate(TrainConfig, raw)
    check_semantics(config)
    return config


def check_semantics(config: TrainConfig) -> None:
    """Checks needing several blocks at once; also names unnamed stages and parses each stage's ``lr``."""
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
        parse_train_spec(stage.train, f"{key}.train")
        data = config.stage_data(index)
        task = resolve_task(data.task, f"{key}.data.task" if "task" in stage.data else "data.task")
        check_loss(stage.loss.name, task, f"{key}.loss.name")
        if stage.adversary is not None and (isinstance(task, dict) or task.kind != "multiclass"
                                            or stage.objective != "supervised"):
            raise ConfigError(f"{key}.adversary: a site adversary works beside a supervised multi-class classifier "
                              f"(this stage: {stage.objective}, task {getattr(task, 'kind', 'multi-task')})")
        if isinstance(task, dict):
            continue
        check_weights(stage.loss.class_weights, task, f"{key}.loss.class_weights")
        if data.balance.method == "covid_percent" and data.balance.positive_class not in task.classes:
            raise ConfigError(f"data.balance.positive_class: {data.balance.positive_class!r} is not a class of task "
                              f"{task.name} ({', '.join(task.classes)})")
        if data.batch_size < 2 and index == 0:
            raise ConfigError("data.batch_size: must be >= 2 (BatchNorm needs more than one image)")
    metric, _ = config.monitor_metric()
    if not metric.startswith(("val/", "train/")):
        raise ConfigError(f"monitor.metric: {metric!r} must start with val/ or train/ (e.g. val/f1/COVID-19)")


def to_raw(config: TrainConfig) -> dict[str, Any]:
    """Plain data of a validated config (stage defaults already merged), reloadable by :func:`from_dict`.

    JSON-mode dumping turns tuples (a parsed discriminative lr) into lists, so the result is YAML-safe.
    """
    raw = config.model_dump(mode="json")
    raw["defaults"] = {}
    return raw
