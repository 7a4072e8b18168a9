"""Training configs, balancing, discriminative rates and freezing: fast checks, no training loop."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from training_fixtures import make_manifest, tiny_recipe

from lungscreen import models
from lungscreen.errors import ConfigError
from lungscreen.evaluation.metrics import classification_figures, classification_report
from lungscreen.training.config import CONFIG_DIR, apply_overrides, from_dict, load_config, to_raw
from lungscreen.training.optim import discriminative_rates, plan_groups
from lungscreen.training.prepare import prepare
from lungscreen.training.sampling import EpochSampler, balanced_class_weights


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("synth"), per_class=10)


def test_every_shipped_recipe_loads():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"covidnet", "covid-resnet", "tartaglione", "light-ct", "conv8", "covid-resnet-cpu", "light-ct-cpu"} <= set(names)
    for name in names:
        config = load_config(name)
        assert config.stages and config.model.name in models.list_models(), name


def test_overrides_use_dotted_keys_and_star():
    raw = tiny_recipe("m.parquet")
    config = from_dict(apply_overrides(raw, ["stages.*.epochs=4", "data.batch_size=16", "stages.1.train=-2:",
                                             "stages.0.optimizer.lr=1e-4"]))
    assert [s.epochs for s in config.stages] == [4, 4]
    assert config.data.batch_size == 16
    assert config.stages[1].train == "-2:"
    assert config.stages[0].optimizer.lr == pytest.approx(1e-4)  # YAML's 1e-4 is text; the schema reads a number


def test_a_stage_named_for_its_size_is_renamed_when_an_override_resizes_it():
    """`--set stages.0.image_size=64` on covid-resnet-cpu ran a stage named all-256 at 64 px."""
    assert [(s.name, s.image_size) for s in load_config("covid-resnet-cpu", ["stages.0.image_size=64"]).stages] == \
        [("all-64", 64)]
    assert load_config("covid-resnet-cpu", ["stages.0.image_size=64", "stages.0.name=quick"]).stages[0].name == "quick"
    assert load_config("covid-resnet-cpu", ["stages.0.epochs=1"]).stages[0].name == "all-256"
    resized = load_config("covid-resnet", ["stages.*.image_size=64"]).stages
    assert [s.name for s in resized] == ["head-64", "all-64", "head-64-2", "all-64-2", "all-64-3"]


def test_defaults_merge_into_stages_and_stage_values_win():
    config = from_dict(tiny_recipe("m.parquet"))
    assert config.stages[0].optimizer.lr == pytest.approx(3e-3)
    assert config.stages[1].optimizer.lr == (3e-4, 3e-3)


@pytest.mark.parametrize("override, key", [
    ("stages.0.optimizer.lr=-0.1", "stages.0.optimizer.lr"),
    ("stages.1.optimizer.lr=[0.1, -1]", "stages.1.optimizer.lr"),
    ("stages.0.bogus=1", "stages.0.bogus"),
    ("data.balance.covid_percent=1.5", "data.balance.covid_percent"),
    ("data.task=covid-19-only", "data.task"),
    ("stages.0.epochs=0", "stages.0.epochs"),
    ("stages.0.optimizer.name=rmsprop", "stages.0.optimizer.name"),
    ("stages.0.train=sideways", "stages.0.train"),
    ("stages.0.loss.class_weights=[1, 2]", "stages.0.loss.class_weights"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key)):
        from_dict(apply_overrides(tiny_recipe("m.parquet"), [override]))


@pytest.mark.parametrize("override, key, words", [
    ("model.name=resnet19", "model.name", "unknown model"),
    ("stages.0.image_size=16", "stages.0.image_size", "below the minimum input size"),
    ("stages.1.train=[]", "stages.1.train", "freeze everything"),
    ("stages.0.train=10:", "stages.0.train", "freeze everything"),
    ("data.sources=[nowhere]", "data.sources", "not a source"),
])
def test_checks_against_zoo_and_manifest_fail_before_training(manifest, override, key, words):
    config = from_dict(apply_overrides(tiny_recipe(manifest), [override]))
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ".*" + words):
        prepare(config)


def test_missing_manifest_column_is_named(manifest, tmp_path):
    frame = pd.read_parquet(manifest).drop(columns=["split"])
    frame.to_parquet(tmp_path / "nosplit.parquet")
    config = from_dict(tiny_recipe(tmp_path / "nosplit.parquet"))
    with pytest.raises(ConfigError, match=r"^data\.manifest: .*lacks column\(s\) split"):
        prepare(config)


def test_discriminative_rates_are_geometric():
    rates = discriminative_rates((1e-6, 1e-4), 5)
    assert rates[0] == pytest.approx(1e-6) and rates[-1] == pytest.approx(1e-4)
    ratios = np.array(rates[1:]) / np.array(rates[:-1])
    assert np.allclose(ratios, ratios[0])
    assert discriminative_rates(1e-3, 3) == [1e-3] * 3


def test_plan_groups_freezes_the_rest_and_spreads_rates():
    model = models.create("covidnet_tiny", num_classes=3)
    groups = model.layer_groups()
    plan = plan_groups(model, "-3:", (1e-5, 1e-3), train_bn=False, key="stages.0.train")
    assert plan.trained == [len(groups) - 3, len(groups) - 2, len(groups) - 1]
    assert [g["lr"] for g in plan.param_groups] == pytest.approx([1e-5, 1e-4, 1e-3])
    for index, group in enumerate(groups):
        flags = {p.requires_grad for p in group.parameters()}
        assert flags == ({True} if index in plan.trained else {False})
    head_only = plan_groups(model, "head", 1e-3, train_bn=True, key="k")
    norms = [p for m in groups[0].modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
    assert norms and all(p.requires_grad for p in norms)  # fastai's train_bn
    assert head_only.trained == [len(groups) - 1]


def test_covid_percent_gives_each_batch_its_share():
    targets = np.array([0] * 60 + [1] * 30 + [2] * 6)
    sampler = EpochSampler(targets, method="covid_percent", batch_size=8, positive=2, covid_percent=0.5, seed=1)
    order = np.array([k.index for k in sampler]).reshape(-1, 8)
    assert len(order) == 90 // 8
    assert all((targets[row] == 2).sum() == 4 for row in order)


def test_weighted_and_undersampling_balance_classes():
    targets = np.array([0] * 300 + [1] * 60 + [2] * 30)
    weighted = np.array([k.index for k in EpochSampler(targets, method="weighted", batch_size=10, seed=0)])
    shares = np.bincount(targets[weighted], minlength=3) / len(weighted)
    assert np.allclose(shares, 1 / 3, atol=0.06)
    under = np.array([k.index for k in EpochSampler(targets, method="undersample", batch_size=10, seed=0)])
    assert np.bincount(targets[under]).tolist() == [30, 30, 30]
    assert balanced_class_weights(targets, 3) == pytest.approx([390 / 900, 390 / 180, 390 / 90])


def test_order_depends_on_seed_and_epoch_only():
    targets = np.arange(40) % 2
    first = EpochSampler(targets, method="none", batch_size=4, seed=5)
    again = EpochSampler(targets, method="none", batch_size=4, seed=5)
    assert list(first) == list(again)
    first.set_epoch(1)
    assert list(first) != list(again)


def test_distributed_ranks_split_every_global_batch():
    targets = np.array([0] * 50 + [1] * 10)
    single = EpochSampler(targets, method="covid_percent", batch_size=8, positive=1, seed=2)
    ranks = [EpochSampler(targets, method="covid_percent", batch_size=8, positive=1, seed=2, rank=r, world_size=2)
             for r in range(2)]
    whole = np.array([k.index for k in single]).reshape(-1, 8)
    parts = [np.array([k.index for k in r]).reshape(-1, 4) for r in ranks]
    assert np.array_equal(np.concatenate(parts, axis=1), whole)  # same global batches, same balance
    assert len(ranks[0]) == len(single) // 2
    with pytest.raises(ValueError, match="does not divide"):
        EpochSampler(targets, batch_size=7, world_size=2)


def test_classification_figures_match_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 200)
    scores = rng.random((200, 3)) + np.eye(3)[truth] * 0.6
    scores /= scores.sum(1, keepdims=True)
    predicted = scores.argmax(1)
    figures = classification_figures(truth, scores, ["a", "b", "c"])
    assert figures["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert figures["sensitivity/c"] == pytest.approx(recall_score(truth == 2, predicted == 2))
    assert figures["ppv/c"] == pytest.approx(precision_score(truth == 2, predicted == 2))
    assert figures["f1/b"] == pytest.approx(f1_score(truth == 1, predicted == 1))
    assert figures["auc/a"] == pytest.approx(roc_auc_score(truth == 0, scores[:, 0]))
    tp, fn = ((predicted == 2) & (truth == 2)).sum(), ((predicted != 2) & (truth == 2)).sum()
    fp, tn = ((predicted == 2) & (truth != 2)).sum(), ((predicted != 2) & (truth != 2)).sum()
    assert figures["dor/c"] == pytest.approx((tp * tn) / (fn * fp))


def test_report_intervals_resample_patients():
    truth = np.array([0, 0, 1, 1, 1, 0] * 10)
    scores = np.eye(2)[truth] * 0.8 + 0.1
    scores[:6] = scores[:6, ::-1]  # the first patient's six images are all wrong
    patients = np.repeat(np.arange(10), 6)
    report = classification_report(truth, scores, ["neg", "pos"], groups=patients, n_resamples=300)
    accuracy = report["accuracy"]
    assert accuracy.value == pytest.approx(0.9)
    assert accuracy.low < 0.9 < accuracy.high or accuracy.low <= 0.9 <= accuracy.high
    assert np.isnan(classification_figures(np.array([0, 0]), np.array([[0.9, 0.1], [0.8, 0.2]]), ["a", "b"])["ppv/b"])


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=[1,", "data.batch_size: the value '[1,' is not valid YAML ("),
    ("data.batch_size=2.5", "data.batch_size: must be an integer, got 2.5"),
    ("data.batch_size=abc", "data.batch_size: must be an integer, got 'abc'"),
    ("data.batch_size=true", "data.batch_size: must be an integer, got True"),
    ("stages.0.optimizer.momentum=false", "stages.0.optimizer.momentum: must be a number, got False"),
    ("stages.0.train_bn=1", "stages.0.train_bn: must be true or false, got 1"),
    ("stages.1.optimizer.bogus=1", "stages.1.optimizer.bogus: unknown key (allowed: beta2, lr, lr_spread, momentum,"),
    ("stages.0.data={balance: {bogus: 1}}", "stages.0.data.balance.bogus: unknown key (allowed: covid_percent,"),
    ("stages.5.epochs=2", "stages.5: no list element '5' (the list has 2)"),
    ("stages.0.epochs.x=1", "stages.0.epochs.x: cannot set a key inside 1"),
    ("data.sources=[[a]]", "data.sources.0: must be text"),
    ("tune.params.x={low: 0, high: 1, log: true}", "tune.params.x.low: a log range needs low > 0"),
])
def test_errors_are_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as caught:
        from_dict(apply_overrides(tiny_recipe("m.parquet"), [override]))
    text = str(caught.value)
    assert text.startswith(message), text
    assert "\n" not in text and "pydantic" not in text


def test_override_values_keep_their_yaml_meaning():
    config = from_dict(apply_overrides(tiny_recipe("m.parquet"), [
        "model.options.width=abc", "model.options.depth=3", "stages.0.train=1:3", "stages.1.optimizer.lr=[1e-5, 1e-3]",
        "stages.0.optimizer.momentum=5e-1", "precision=32", "data.num_workers=2.0"]))
    assert config.model.options == {"width": "abc", "depth": 3}  # a free dict: passed to the model as is
    assert config.stages[0].train == "1:3"  # YAML alone would read 1:3 as the base-60 integer 63
    assert config.stages[1].optimizer.lr == pytest.approx((1e-5, 1e-3))
    assert config.stages[0].optimizer.momentum == 0.5 and config.precision == "32" and config.data.num_workers == 2


def test_validated_config_is_mutable_and_round_trips():
    config = from_dict(tiny_recipe("m.parquet"))
    config.data.manifest = "elsewhere.parquet"
    config.stages[0].name = "renamed"
    raw = to_raw(config)
    assert raw["stages"][1]["optimizer"]["lr"] == [3e-4, 3e-3] and raw["defaults"] == {}
    again = from_dict(raw)
    assert again.to_dict() == {**config.to_dict(), "defaults": {}}
    assert again.data.manifest == "elsewhere.parquet" and again.stages[0].name == "renamed"
