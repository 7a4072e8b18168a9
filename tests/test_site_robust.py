"""The levers of site-robust training, each a recipe option on the one engine, each checked where it can fail:
source-balanced batches, acquisition augmentation moving masks and boxes with the image, the spectral
decoupling penalty, the site adversary's reversed gradient (and, on phantoms whose source is burnt into the
image, a lower source-probe accuracy than the same run without it)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import chi2_contingency
from torchvision import tv_tensors

from lungscreen.data.labels import get_task
from lungscreen.models import create
from lungscreen.training.augment import build_augment
from lungscreen.training.config import LossConfig
from lungscreen.training.heads import SiteAdversary, SiteAdversaryObjective, ganin_ramp
from lungscreen.training.objectives import MulticlassObjective
from lungscreen.training.sampling import EpochSampler, source_label_weights

#: Three sources holding both classes in very different proportions, and one holding negatives only
#: (NIH's part in the public sets): the label is predictable from the source unless the sampler balances.
SOURCES = ["cohen"] * 120 + ["radiography"] * 300 + ["figure1"] * 40 + ["nih"] * 200
TARGETS = [1] * 100 + [0] * 20 + [1] * 60 + [0] * 240 + [1] * 35 + [0] * 5 + [0] * 200


def drawn_table(method: str, **options: object) -> pd.DataFrame:
    """Source x class counts of the images in 200 seeded batches of 16."""
    sampler = EpochSampler(TARGETS, method=method, batch_size=16, seed=7, sources=SOURCES, **options)
    drawn: list[int] = []
    epoch = 0
    while len(drawn) < 200 * 16:
        sampler.set_epoch(epoch)
        drawn += [key.index for key in sampler]
        epoch += 1
    drawn = drawn[:200 * 16]
    frame = pd.DataFrame({"source": np.asarray(SOURCES)[drawn], "label": np.asarray(TARGETS)[drawn]})
    return pd.crosstab(frame["source"], frame["label"])


def test_source_balanced_batches_make_the_label_independent_of_the_source():
    balanced = drawn_table("source_label", partial_sources="exclude")
    assert "nih" not in balanced.index  # a source without positives is left out
    assert chi2_contingency(balanced.to_numpy())[1] > 0.01  # independence is not rejected
    shuffled = drawn_table("none").drop(index="nih")
    assert chi2_contingency(shuffled.to_numpy())[1] < 1e-6  # without it, the source tells the label
    weighted = drawn_table("weighted").drop(index="nih")  # class balance alone does not cut the link
    assert chi2_contingency(weighted.to_numpy())[1] < 1e-6


def test_partial_sources_get_their_share_and_sources_weigh_by_size():
    table = drawn_table("source_label", partial_sources="weight", partial_share=0.2)
    assert table.loc["nih"].sum() / table.to_numpy().sum() == pytest.approx(0.2, abs=0.03)
    complete = table.drop(index="nih")
    assert chi2_contingency(complete.to_numpy())[1] > 0.01
    weights = source_label_weights(TARGETS, SOURCES, "exclude")
    by_source = pd.Series(weights).groupby(np.asarray(SOURCES)).sum()
    assert by_source["radiography"] == pytest.approx(300 / 460)  # size: a source's share is its size's
    equal = pd.Series(source_label_weights(TARGETS, SOURCES, "exclude", source_weights="equal"))
    assert equal.groupby(np.asarray(SOURCES)).sum()["figure1"] == pytest.approx(1 / 3)


def test_source_balancing_refuses_when_no_source_holds_every_class():
    with pytest.raises(ValueError, match="no source holds them all"):
        source_label_weights([1, 1, 0, 0], ["a", "a", "b", "b"])


def test_acquisition_augmentation_moves_masks_and_boxes_with_the_image():
    """A bright square drawn where the mask is: after every draw the square, the mask and the box still
    coincide, and the geometry did move them."""
    augment = build_augment("acquisition")
    image = torch.full((1, 96, 96), 0.2)
    image[:, 30:60, 20:50] = 0.9
    mask = torch.zeros((2, 96, 96), dtype=torch.uint8)
    mask[0, 30:60, 20:50] = 1
    box = torch.tensor([[20.0, 30.0, 50.0, 60.0]])
    moved = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out = augment({"image": tv_tensors.Image(image.clone()), "masks": tv_tensors.Mask(mask.clone()),
                       "boxes": tv_tensors.BoundingBoxes(box.clone(), format="XYXY", canvas_size=(96, 96))})
        bright = out["image"][0] > 0.55
        region = out["masks"][0].bool()
        overlap = (bright & region).sum() / (bright | region).sum()
        assert overlap > 0.7, f"seed {seed}: the image and its mask parted (IoU {overlap:.2f})"
        ys, xs = torch.nonzero(region, as_tuple=True)
        around = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.allclose(out["boxes"][0], around, atol=2.0)
        moved += not torch.equal(region, mask[0].bool())
    assert moved > 30


def test_acquisition_augmentation_changes_the_picture_not_only_its_place():
    augment = build_augment("acquisition")
    image = tv_tensors.Image(torch.linspace(0, 1, 64 * 64).reshape(1, 64, 64))
    changed = []
    for seed in range(20):
        torch.manual_seed(seed)
        out = augment({"image": image.clone()})["image"]
        changed.append(float((out - image).abs().mean()))
    assert np.mean(changed) > 0.02 and len(set(np.round(changed, 4))) == 20


def test_spectral_decoupling_adds_half_lambda_times_the_mean_squared_logit_norm():
    task = get_task("covidx")
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    batch = {"label": torch.tensor([0, 1])}
    plain = MulticlassObjective(task, LossConfig()).loss(logits, batch)
    decoupled = MulticlassObjective(task, LossConfig(spectral_decoupling=0.3)).loss(logits, batch)
    expected = 0.3 / 2 * ((4 + 1 + 0.25) + (0 + 9 + 4)) / 2
    assert float(decoupled - plain) == pytest.approx(expected)


def phantom_batch(count: int = 8, size: int = 48) -> dict:
    from lungscreen.data.phantoms import render_phantom

    images = torch.stack([torch.from_numpy(render_phantom("normal", size=size, seed=1, index=i).image).float()[None]
                          / 255.0 for i in range(count)])
    return {"image": images, "label": torch.tensor([i % 3 for i in range(count)]),
            "source": ["cohen", "nih"] * (count // 2)}


def test_the_adversary_gradient_reaches_the_encoder_reversed():
    """The site loss's gradient on the encoder is the plain gradient times -strength; the head's own is not."""
    torch.manual_seed(0)
    model = create("resnet18", num_classes=3, width=8)
    adversary = SiteAdversary(model, sources=["cohen", "nih"], classes=3)
    objective = SiteAdversaryObjective(MulticlassObjective(get_task("covidx"), LossConfig()), ["cohen", "nih"])
    batch = phantom_batch()
    adversary.eval()  # BatchNorm statistics fixed: the two passes see the same network

    def gradients(strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        adversary.zero_grad()
        adversary.gradient.factor = -strength  # the reversal layer
        outputs = adversary(batch["image"])
        site = torch.nn.functional.cross_entropy(objective.site_logits(outputs["site"], batch),
                                                 objective.site_targets(batch))
        site.backward()
        encoder = model.layer_groups()[0]
        return (torch.cat([p.grad.flatten() for p in encoder.parameters()]),
                torch.cat([p.grad.flatten() for p in adversary.head.parameters()]))

    plain_encoder, plain_head = gradients(-1.0)  # -(-1) x: the gradient as it is
    reversed_encoder, reversed_head = gradients(0.5)
    assert plain_encoder.abs().sum() > 0
    assert torch.allclose(reversed_encoder, -0.5 * plain_encoder, atol=1e-6, rtol=1e-4)
    assert torch.allclose(reversed_head, plain_head, atol=1e-7)


def test_the_confusion_mode_trains_the_head_on_the_sources_and_the_encoder_towards_a_uniform_answer():
    """mode=confusion: the head's gradient is the site cross-entropy's alone (it learns on detached features);
    the encoder's is the uniform-answer term's, scaled by the ramp, and none of the site cross-entropy's."""
    torch.manual_seed(0)
    model = create("resnet18", num_classes=3, width=8)
    adversary = SiteAdversary(model, sources=["cohen", "nih"], classes=3, mode="confusion")
    objective = SiteAdversaryObjective(MulticlassObjective(get_task("covidx"), LossConfig()), ["cohen", "nih"])
    batch = phantom_batch()
    adversary.eval()

    def gradients(factor: float, term: str) -> tuple[torch.Tensor, torch.Tensor]:
        adversary.zero_grad()
        adversary.gradient.factor = factor
        outputs = adversary(batch["image"])
        loss = objective.site_loss(outputs["site"], batch) if term == "site" else \
            objective.site_loss(outputs["confusion"], batch, uniform=True)
        loss.backward()
        grads = [[p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]
                 for module in (model.layer_groups()[0], adversary.head)]
        return tuple(torch.cat([g.flatten() for g in group]) for group in grads)

    site_encoder, site_head = gradients(1.0, "site")
    assert site_encoder.abs().sum() == 0 and site_head.abs().sum() > 0
    confusion_encoder, confusion_head = gradients(1.0, "confusion")
    assert confusion_encoder.abs().sum() > 0 and confusion_head.abs().sum() == 0
    half_encoder, _ = gradients(0.5, "confusion")
    assert torch.allclose(half_encoder, 0.5 * confusion_encoder, atol=1e-7, rtol=1e-4)


def test_the_reversal_ramps_from_zero_to_its_weight():
    assert ganin_ramp(0.0, 2.0) == 0.0
    assert 0.0 < ganin_ramp(0.1, 2.0) < ganin_ramp(0.5, 2.0) < 2.0
    assert ganin_ramp(1.0, 2.0) == pytest.approx(2.0, abs=1e-3)


def test_the_class_conditional_head_scores_the_source_within_the_true_class():
    objective = SiteAdversaryObjective(MulticlassObjective(get_task("binary"), LossConfig()), ["a", "b", "c"])
    logits = torch.arange(12, dtype=torch.float32).reshape(2, 6)  # 2 classes x 3 sources per image
    batch = {"label": torch.tensor([1, 0]), "source": ["b", "z"]}
    assert objective.site_logits(logits, batch).tolist() == [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]
    assert objective.site_targets(batch).tolist() == [1, -1]  # an unknown source is left out of the loss


def test_adapt_changes_batchnorm_running_statistics_only(tmp_path, cli):
    """AdaBN on a brighter "new site": every running mean and variance moves, no other tensor does."""
    from PIL import Image

    from lungscreen.models import load_checkpoint
    from lungscreen.training.config import from_dict
    from lungscreen.training.engine import train
    from training_fixtures import make_manifest, tiny_recipe

    manifest = make_manifest(tmp_path / "data", per_class=6)
    recipe = tiny_recipe(manifest, model={"name": "resnet18", "options": {"width": 8}})
    run = train(from_dict(recipe), out=tmp_path / "run", quiet=True).run_dir
    site = tmp_path / "site"
    site.mkdir()
    for i, path in enumerate(sorted((tmp_path / "data").glob("*.png"))[:20]):
        pixels = np.asarray(Image.open(path), dtype=np.float32)
        Image.fromarray(np.clip(pixels * 0.6 + 90, 0, 255).astype(np.uint8)).save(site / f"{i}.png")
    code, _, err = cli("adapt", str(run), str(site), "--out", str(tmp_path / "adapted"))
    assert code == 0, err
    before, after = load_checkpoint(run / "best.pt"), load_checkpoint(tmp_path / "adapted" / "best.pt")
    old, new = before.model.state_dict(), after.model.state_dict()
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    changed = {key for key in old if not torch.equal(old[key], new[key])}
    assert changed and all(key.endswith(statistics) for key in changed)
    assert all(key in changed for key in old if key.endswith(("running_mean", "running_var")))
    assert after.spec.reference != before.spec.reference  # the OOD reference is the site's now
    assert after.spec.operating_point == before.spec.operating_point
    assert after.meta["extra"]["adapted"]["images"] == len(list(site.glob("*.png")))


def test_adapt_refuses_too_few_images(tmp_path, cli):
    from lungscreen.training.config import from_dict
    from lungscreen.training.engine import train
    from training_fixtures import make_manifest, tiny_recipe

    manifest = make_manifest(tmp_path / "data", per_class=6)
    run = train(from_dict(tiny_recipe(manifest)), out=tmp_path / "run", quiet=True).run_dir
    code, _, err = cli("adapt", str(run), str(sorted((tmp_path / "data").glob("*.png"))[0]), "--out",
                       str(tmp_path / "adapted"))
    assert code == 2 and "at least 16" in err


def test_score_rows_takes_samples_already_prepared(tmp_path):
    """A run and its AdaBN copies share one pipeline: score_rows scores the samples it is given, without
    reading or preparing their images again (the images are gone here), to the same probabilities."""
    import shutil

    from lungscreen.data.manifest import for_task, load_manifest
    from lungscreen.inference.predict import Predictor
    from lungscreen.inference.scoring import score_rows
    from lungscreen.io.images import read_image
    from lungscreen.training.config import from_dict
    from lungscreen.training.engine import train
    from training_fixtures import make_manifest, tiny_recipe

    manifest = make_manifest(tmp_path / "data", per_class=6)
    run = train(from_dict(tiny_recipe(manifest)), out=tmp_path / "run", quiet=True).run_dir
    predictor = Predictor(run)
    rows = for_task(load_manifest(manifest), "covidx")
    rows = rows[rows["split"] == "test"].reset_index(drop=True)
    read = score_rows(predictor, rows)
    prepared = {path: predictor.prepare(read_image(path).pixels) for path in rows["image_path"].astype(str)}
    shutil.rmtree(tmp_path / "data")
    given = score_rows(predictor, rows, prepared=prepared)
    assert (given["error"] == "").all()
    classes = predictor.class_names
    np.testing.assert_allclose(given[classes].to_numpy(float), read[classes].to_numpy(float), rtol=1e-5)
