"""MultiCheXNet (paper 001): heads, box coding, NMS, teacher forcing, the filter, and training on phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lungscreen.data.labels import TASKS
from lungscreen.evaluation.metrics import detection_figures
from lungscreen.models import InferenceSpec, create, load_checkpoint, save_checkpoint
from lungscreen.models.boxes import AnchorGrid, detections
from lungscreen.training.config import LossConfig, from_dict
from lungscreen.training.engine import train
from lungscreen.training.objectives import MultitaskObjective, TeacherForcing, build_objective
from training_fixtures import make_phantom_manifest

HEADS = {"findings": 2, "boxes": 1, "mask": 2}


@pytest.mark.parametrize("name", ["multichexnet_cpu", "multichexnet"])
@pytest.mark.parametrize("side", [64, 96])
def test_every_head_has_its_shape_at_two_sizes(name, side):
    model = create(name, num_classes=HEADS).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 1, side, side))
    grid = side // model.grid.stride
    assert out["findings"].shape == (2, 2)
    assert out["boxes"].shape == (2, model.grid.channels, grid, grid)
    assert out["mask"].shape == (2, 2, side, side)


def test_a_checkpoint_rebuilds_the_same_three_heads(tmp_path):
    model = create("multichexnet_cpu", num_classes=HEADS, head_width=8)
    model(torch.randn(4, 1, 64, 64))  # move BN statistics off their start
    spec = InferenceSpec(input={"size": 64, "channels": 1, "pipeline": {"name": "none", "steps": []}},
                         heads=[{"name": "findings", "kind": "multilabel", "classes": ["pneumonia", "COVID-19"]},
                                {"name": "boxes", "kind": "detection", "classes": ["opacity"]},
                                {"name": "mask", "kind": "segmentation", "classes": ["a", "b"]}])
    loaded = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model, spec=spec))
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        before, after = model.eval()(images), loaded.model(images)
    for head in HEADS:
        torch.testing.assert_close(after[head], before[head], rtol=0, atol=0)
    assert loaded.model.grid == model.grid and loaded.spec == spec


def test_heads_are_optional_and_findings_required():
    model = create("multichexnet_cpu", num_classes={"findings": 3})
    assert set(model(torch.zeros(1, 1, 64, 64))) == {"findings"}
    with pytest.raises(Exception, match="needs a 'findings' head"):
        create("multichexnet_cpu", num_classes={"mask": 1})
    with pytest.raises(Exception, match="exposes no encoder stages"):
        create("multichexnet_cpu", num_classes={"findings": 1}, backbone="squeezenet1_1", backbone_options={})


def test_boxes_survive_encode_and_decode():
    """Targets written as the logits that reach them decode to the same boxes (one per anchor it fits)."""
    grid = AnchorGrid(anchors=((0.1, 0.1), (0.3, 0.5)), stride=16)
    truth = torch.tensor([[10.0, 12.0, 22.0, 20.0], [40.0, 20.0, 60.0, 58.0]])
    target = grid.encode([truth], None, 4, 4)
    assert target["assigned"].sum() == 2
    raw = torch.full((1, 4, 4, 2, 5), -20.0)
    assigned = target["assigned"][0]
    raw[0][assigned, 0:2] = torch.logit(target["xy"][0][assigned])
    raw[0][assigned, 2:4] = target["wh"][0][assigned]
    raw[0][assigned, 4] = 20.0
    raw = raw.permute(0, 3, 4, 1, 2).reshape(1, 10, 4, 4)
    found = detections(raw, grid, score_threshold=0.5)[0]
    order = found["boxes"][:, 0].argsort()
    assert torch.allclose(found["boxes"][order], truth, atol=0.01)  # a centre on a cell edge moves 1e-4 cell in


def place(raw: torch.Tensor, grid: AnchorGrid, box: tuple[float, float, float, float], score: float,
          label: int = 0) -> None:
    """Write into raw outputs (1, h, w, A, per_anchor) the logits that decode to ``box`` (anchor 0)."""
    side = raw.shape[2] * grid.stride
    cx, cy, bw, bh = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]
    gx, gy = int(cx // grid.stride), int(cy // grid.stride)
    cell = raw[0, gy, gx, 0]
    cell[0], cell[1] = torch.logit(torch.tensor([cx / grid.stride - gx, cy / grid.stride - gy]))
    cell[2], cell[3] = torch.log(torch.tensor([bw / (grid.anchors[0][0] * side), bh / (grid.anchors[0][1] * side)]))
    cell[4] = torch.logit(torch.tensor(score))
    if grid.num_classes > 1:
        cell[5 + label] = 10.0


def test_nms_keeps_one_box_per_object_and_per_class():
    grid = AnchorGrid(anchors=((0.25, 0.25),), stride=16, num_classes=2)
    raw = torch.full((1, 4, 4, 1, 7), -10.0)
    place(raw, grid, (7.0, 7.0, 23.0, 23.0), 0.95)           # an object (cell 0, 0) ...
    place(raw, grid, (9.0, 9.0, 25.0, 25.0), 0.80)           # ... found again from cell 1, 1: suppressed
    place(raw, grid, (42.0, 42.0, 58.0, 58.0), 0.70)         # another object: kept
    place(raw, grid, (7.0, 9.0, 23.0, 25.0), 0.60, label=1)  # the first place, another class (cell 0, 1): kept
    raw = raw.permute(0, 3, 4, 1, 2).reshape(1, 7, 4, 4)
    found = detections(raw, grid, score_threshold=0.5, iou_threshold=0.45)[0]
    assert found["labels"].tolist() == [0, 0, 1]
    assert torch.allclose(found["scores"], torch.tensor([0.95, 0.70, 0.60]), atol=1e-3)
    assert torch.allclose(found["boxes"][0], torch.tensor([7.0, 7.0, 23.0, 23.0]), atol=1e-3)


def test_detection_figures_by_hand():
    truth = [{"boxes": np.array([[10, 10, 50, 50]]), "labels": np.array([0])},
             {"boxes": np.zeros((0, 4)), "labels": np.zeros(0)}]
    exact = [{"boxes": np.array([[10, 10, 50, 50]]), "scores": np.array([0.9]), "labels": np.array([0])},
             {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)}]
    assert detection_figures(exact, truth) == {"map50": 1.0, "mean_iou": 1.0}
    # a better-scored false positive on the empty image halves the precision at full recall
    exact[1] = {"boxes": np.array([[0, 0, 20, 20]]), "scores": np.array([0.95]), "labels": np.array([0])}
    assert detection_figures(exact, truth)["map50"] == pytest.approx(0.5)
    shifted = [{"boxes": np.array([[30, 30, 70, 70]]), "scores": np.array([0.9]), "labels": np.array([0])}, exact[1]]
    figures = detection_figures(shifted, truth)
    assert figures["map50"] == 0.0 and figures["mean_iou"] == pytest.approx(400 / 2800)


def test_teacher_forcing_takes_the_ground_truth_with_its_probability():
    truth = torch.tensor([True, False, True, False])
    gate = torch.tensor([[5.0], [5.0], [-5.0], [-5.0]])  # the gate passes images 0 and 1
    forcing = TeacherForcing(0.9, "findings", seed=3)
    picks = [tuple(forcing.rows(forcing.toss(), truth, gate).tolist()) for _ in range(2000)]
    forced = sum(p == (True, False, True, False) for p in picks)
    assert forced == forcing.forced and forcing.tosses == 2000
    assert set(picks) == {(True, False, True, False), (True, True, False, False)}
    assert abs(forced / 2000 - 0.9) < 3 * (0.9 * 0.1 / 2000) ** 0.5
    again = TeacherForcing(0.9, "findings", seed=3)
    assert [again.toss() for _ in range(2000)] == [p == (True, False, True, False) for p in picks]  # replayable


def test_one_coin_per_batch_for_every_gated_head():
    model = create("multichexnet_cpu", num_classes=HEADS, head_width=8)
    tasks = {"findings": TASKS["findings"], "boxes": TASKS["lung-boxes"], "mask": TASKS["lungs"]}
    objective = build_objective(tasks, LossConfig(), grid=model.grid, teacher_forcing=TeacherForcing(0.5, "findings"))
    lung = np.zeros((64, 64), bool)
    lung[10:50, 10:30] = True
    mask, known, labelled = TASKS["lungs"].segmentation_targets(0, lung)
    batch = {"findings": {"label": torch.zeros(2, 2), "present": torch.ones(2, dtype=torch.bool)},
             "boxes": {"present": torch.ones(2, dtype=torch.bool)},
             "mask": {"mask": torch.from_numpy(np.stack([mask, mask])), "known": torch.from_numpy(np.stack([known, known])),
                      "labelled": torch.from_numpy(np.stack([labelled, labelled])), "present": torch.ones(2, dtype=torch.bool)},
             "target_boxes": [torch.tensor([[10.0, 10.0, 30.0, 50.0]])] * 2}
    with torch.no_grad():
        objective.loss(model(torch.rand(2, 1, 64, 64)), batch)
    assert objective.teacher_forcing.tosses == 1


def test_a_missing_box_label_adds_no_loss_and_no_gradient():
    model = create("multichexnet_cpu", num_classes={"findings": 2, "boxes": 1})
    objective = build_objective({"findings": TASKS["findings"], "boxes": TASKS["lesion-boxes"]}, LossConfig(),
                                grid=model.grid)
    outputs = {"findings": torch.zeros(2, 2, requires_grad=True),
               "boxes": torch.zeros(2, model.grid.channels, 2, 2, requires_grad=True)}
    batch = {"findings": {"label": torch.zeros(2, 2), "present": torch.tensor([True, True])},
             "boxes": {"present": torch.tensor([True, False])},
             "target_boxes": [torch.tensor([[4.0, 4.0, 40.0, 50.0]]), torch.tensor([[10.0, 10.0, 30.0, 30.0]])]}
    loss = objective.loss(outputs, batch)
    loss.backward()
    grad = outputs["boxes"].grad
    assert grad[0].abs().max() > 0 and grad[1].abs().max() == 0
    alone = objective.heads["boxes"].loss(outputs["boxes"][:1].detach(), {"target_boxes": batch["target_boxes"][:1]})
    findings = objective.heads["findings"].loss(outputs["findings"].detach(), batch["findings"])
    assert float(loss.detach()) == pytest.approx(float(alone + findings))


def test_the_filter_skips_the_dense_heads_for_negatives_and_reuses_the_encoder():
    model = create("multichexnet_cpu", num_classes=HEADS).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([-8.0, -8.0]))  # every image negative ...
    calls = {"encoder": 0, "boxes": 0, "mask": 0, "mask_images": 0}

    def count(name):
        def hook(module, inputs, output):
            calls[name] += 1
            if name == "mask":
                calls["mask_images"] += len(inputs[0][0])
        return hook

    model.stages[0].register_forward_hook(count("encoder"))
    model.boxes.register_forward_hook(count("boxes"))
    model.mask.register_forward_hook(count("mask"))
    images = torch.rand(4, 1, 64, 64)
    results = model.screen(images, threshold=0.5)
    assert calls == {"encoder": 1, "boxes": 0, "mask": 0, "mask_images": 0}
    assert all(r["boxes"] is None and r["mask"] is None and not r["positive"] for r in results)
    with torch.no_grad():  # ... then only the images whose mean is high pass: their dense heads run once
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[0] = -8.0
        model.classifier.bias[1] = 8.0
    results = model.screen(images, threshold=0.5)
    assert calls["encoder"] == 2 and calls["boxes"] == 1 and calls["mask"] == 1 and calls["mask_images"] == 4
    assert all(r["mask"].shape == (2, 64, 64) and r["boxes"] is not None for r in results)


def test_multitask_loss_follows_the_gate_when_not_forced():
    """p = 0: the box head learns from what the findings head passes; p = 1: from the images with true boxes;
    validation: from every image with a box label."""
    model = create("multichexnet_cpu", num_classes={"findings": 2, "boxes": 1})
    tasks = {"findings": TASKS["findings"], "boxes": TASKS["lesion-boxes"]}
    batch = {"findings": {"label": torch.zeros(3, 2), "present": torch.ones(3, dtype=torch.bool)},
             "boxes": {"present": torch.tensor([True, True, False])},
             "target_boxes": [torch.tensor([[4.0, 4.0, 40.0, 50.0]]), torch.zeros((0, 4)),
                              torch.tensor([[8.0, 8.0, 30.0, 30.0]])]}
    outputs = {"findings": torch.tensor([[-9.0, -9.0], [9.0, -9.0], [9.0, 9.0]]),
               "boxes": torch.zeros(3, model.grid.channels, 2, 2)}
    heads = build_objective(tasks, LossConfig(), grid=model.grid).heads
    gate_only = MultitaskObjective(heads, teacher_forcing=TeacherForcing(0.0, "findings"))
    forced = MultitaskObjective(heads, teacher_forcing=TeacherForcing(1.0, "findings"))
    assert gate_only.learning_rows("boxes", outputs, batch, gate_only.teacher_forcing.toss()).tolist() == \
        [False, True, False]
    assert forced.learning_rows("boxes", outputs, batch, forced.teacher_forcing.toss()).tolist() == [True, False, False]
    assert gate_only.learning_rows("boxes", outputs, batch).tolist() == [True, True, False]  # validation: no gate
    assert gate_only.learning_rows("findings", outputs, batch, False).tolist() == [True, True, True]  # never gated


def test_multichexnet_trains_its_three_heads_on_phantoms(tmp_path):
    """Findings, lesion boxes and lung masks from one phantom manifest, with teacher forcing; validation
    and test report each head's figure, and the checkpoint names the three heads."""
    manifest = make_phantom_manifest(tmp_path / "phantoms", per_label=6)
    recipe = {
        "name": "multichexnet-phantoms", "seed": 0, "threads": 1, "precision": "32",
        "data": {"manifest": str(manifest), "batch_size": 6, "augment": "light",
                 "task": {"heads": {"findings": "findings", "boxes": "lesion-boxes", "mask": "lungs"}}},
        "model": {"name": "multichexnet_cpu", "options": {"head_width": 8}},
        "monitor": {"metric": "val/findings/macro_auc"},
        "stages": [{"name": "all", "epochs": 2, "image_size": 64, "train": "all", "optimizer": {"lr": 3e-3},
                    "teacher_forcing": {"p": 0.9}}],
    }
    result = train(from_dict(recipe), out=tmp_path / "run", quiet=True)
    assert {"val/findings/macro_auc", "val/boxes/map50", "val/boxes/mean_iou", "val/mask/dice"} <= set(result.history.columns)
    figures = result.summary["test"]["figures"]
    assert {"findings/macro_auc", "boxes/map50", "mask/dice"} <= set(figures)
    assert 0.0 <= figures["boxes/mean_iou"]["value"] <= 1.0
    spec = load_checkpoint(result.run_dir / "best.pt").spec
    assert [(h.name, h.kind) for h in spec.heads] == [("findings", "multilabel"), ("boxes", "detection"),
                                                      ("mask", "segmentation")]


def test_alternating_batches_come_from_one_data_set_at_a_time():
    from lungscreen.training.sampling import EpochSampler

    groups = [0] * 9 + [1] * 4 + [-1] * 3  # 9 box images, 4 mask images, 3 with neither
    sampler = EpochSampler(groups, method="alternate", batch_size=2, seed=5)
    order = np.array([key.index for key in sampler]).reshape(-1, 2)
    owners = np.asarray(groups)[order]
    assert (owners[:, 0] == owners[:, 1]).all()  # one data set per batch
    assert owners[:, 0].tolist() == [0, 1] * 4  # taking turns, as many rounds as the larger set has batches
    assert set(order[owners[:, 0] == 0].ravel()) <= set(range(9)) and len(set(order[owners[:, 0] == 0].ravel())) == 8
    assert not set(order.ravel()) & {13, 14, 15}  # images of neither data set are never drawn
    sampler.set_epoch(1)
    assert [key.index for key in sampler] != order.ravel().tolist()  # a new order every epoch


def test_alternation_groups_follow_the_heads_labels():
    import pandas as pd

    from lungscreen.errors import ConfigError
    from lungscreen.training.prepare import alternation_groups

    frame = pd.DataFrame({"target/findings": [0, 0, 0, 0], "target/boxes": [0, -1, 0, -1], "target/mask": [-1, 1, 0, -1]})
    task = {"findings": TASKS["findings"], "boxes": TASKS["lesion-boxes"], "mask": TASKS["lungs"]}
    assert alternation_groups(frame, task, ["boxes", "mask"]).tolist() == [0, 1, 0, -1]
    assert alternation_groups(frame, task, ["mask", "boxes"]).tolist() == [1, 0, 0, -1]
    with pytest.raises(ConfigError, match="data.balance.heads"):
        alternation_groups(frame, task, ["lungs"])


def test_boxes_from_a_mask_enclose_each_lung_and_skip_specks():
    from lungscreen.training.data import mask_boxes

    mask = torch.zeros(20, 20, dtype=torch.uint8)
    mask[2:10, 1:5] = 1  # a small lung
    mask[3:15, 10:18] = 1  # a large one
    mask[0, 19] = 1  # a speck
    assert mask_boxes(mask).tolist() == [[10.0, 3.0, 18.0, 15.0], [1.0, 2.0, 5.0, 10.0]]
    assert mask_boxes(torch.zeros(8, 8, dtype=torch.uint8)).shape == (0, 4)


def test_a_findings_detector_leaves_lung_boxes_out():
    from lungscreen.data.manifest import encode_boxes, for_task
    from lungscreen.training.data import detection_boxes

    boxes = torch.tensor([[1.0, 1.0, 5.0, 5.0], [2.0, 2.0, 9.0, 9.0]])
    kept = detection_boxes(TASKS["lesion-boxes"], boxes, ["Right Lung", "Pneumonia"], None)
    assert kept.tolist() == [[2.0, 2.0, 9.0, 9.0]]
    import pandas as pd

    frame = pd.DataFrame({"image_path": ["a", "b", "c", "d"], "modality": "CXR", "view": "PA", "mask_path": "",
                          "label": ["COVID-19", "COVID-19", "normal", "viral"],
                          "boxes": [encode_boxes([(1, 1, 5, 5, "Left Lung")]), encode_boxes([(1, 1, 5, 5, "Mass")]), "", ""]})
    assert for_task(frame, "lesion-boxes")["image_path"].tolist() == ["b", "c"]  # lung boxes alone teach no finding


def test_lung_boxes_follow_the_augmented_mask(tmp_path):
    """The lung-boxes task draws its boxes around the mask after augmentation, so they move with it."""
    from lungscreen.models.inference_spec import InputSpec
    from lungscreen.preprocessing import get_pipeline
    from lungscreen.training.augment import build_augment
    from lungscreen.training.data import ImageStore, ManifestDataset
    from lungscreen.training.prepare import task_rows
    from lungscreen.training.sampling import SampleKey

    manifest = make_phantom_manifest(tmp_path / "phantoms", per_label=2)
    from lungscreen.data.manifest import load_manifest

    rows = task_rows(load_manifest(manifest), TASKS["lung-boxes"], modality="CXR", views=None)
    store = ImageStore(rows, get_pipeline("none"), [64], with_masks=True)
    store.load_all()
    spec = InputSpec(size=64, channels=1, pipeline={"name": "none", "steps": []})
    dataset = ManifestDataset(store, 64, spec, TASKS["lung-boxes"], build_augment("light"))
    seen = set()
    for seed in (1, 2, 3, 4):
        boxes = dataset[SampleKey(0, seed)]["target_boxes"]
        _, masks, _ = dataset._augmented(store.sample(0, 64), seed)  # the same draw: the mask the boxes saw
        ys, xs = torch.nonzero(masks[0]).T
        union = [float(boxes[:, 0].min()), float(boxes[:, 1].min()), float(boxes[:, 2].max()), float(boxes[:, 3].max())]
        assert 1 <= len(boxes) <= 2
        assert union == [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]
        seen.add(tuple(union))
    assert len(seen) > 1  # the augmentation moved the lungs, and the boxes with them


def test_the_shipped_protocol_runs_its_four_stages_and_keeps_the_encoder(tmp_path):
    """configs/multichexnet-cpu.yaml on phantoms (small sizes): each stage starts from the previous one's
    weights (the encoder carries over, new heads start fresh), and best.pt is a three-head model of the last
    stage, not a findings-only epoch of the first."""
    from lungscreen.training.config import load_config

    manifest = make_phantom_manifest(tmp_path / "phantoms", per_label=6)
    overrides = [f"data.manifest={manifest}", "data.num_workers=0", "threads=1", "precision=32",
                 "model.options.head_width=8", "data.batch_size=6"]
    overrides += [f"stages.{i}.{key}" for i in range(4) for key in ("image_size=64", "epochs=1")]
    result = train(load_config("multichexnet-cpu", overrides), out=tmp_path / "run", quiet=True)
    stages = [load_checkpoint(result.run_dir / "stages" / folder / "final.pt")
              for folder in sorted(p.name for p in (result.run_dir / "stages").iterdir())]
    assert [sorted(h.name for h in c.spec.heads) for c in stages] == [
        ["findings"], ["boxes", "findings"], ["findings", "mask"], ["boxes", "findings", "mask"]]
    assert result.best["stage"] == 3
    assert sorted(h.name for h in load_checkpoint(result.run_dir / "best.pt").spec.heads) == ["boxes", "findings", "mask"]
    assert {"boxes/map50", "mask/dice", "findings/macro_auc"} <= set(result.summary["test"]["figures"])


def test_a_stage_adding_heads_keeps_the_encoder_and_the_classifier():
    from lungscreen.training.config import ModelConfig
    from lungscreen.training.prepare import head_classes, swap_head

    spec = ModelConfig(name="multichexnet_cpu", options={"head_width": 8})
    first = {"findings": TASKS["findings"]}
    model = create("multichexnet_cpu", num_classes={"findings": 2}, head_width=8)
    grown = swap_head(model, spec, {**first, "boxes": TASKS["lung-boxes"]}, current=head_classes(first), reset=False)
    assert grown is not model and grown.boxes is not None
    old, new = model.state_dict(), grown.state_dict()
    assert all(torch.equal(old[key], new[key]) for key in old)  # encoder and findings head carried over
    covid = {"findings": TASKS["binary"]}  # transfer: a new class set gets a fresh classifier, the rest stays
    moved = swap_head(grown, spec, covid, current=head_classes({**first, "boxes": TASKS["lung-boxes"]}), reset=False)
    assert moved.boxes is None and moved.classifier.out_features == 2
    assert torch.equal(moved.state_dict()["stages.0.conv1.weight"], old["stages.0.conv1.weight"])


def confident_checkpoint(tmp_path: Path, findings_bias: float = 3.0) -> tuple[Path, torch.nn.Module]:
    """A three-head checkpoint whose findings head calls every image pneumonia (0.95 for bias 3) and whose
    box head is confident at anchor 0 of every cell."""
    model = create("multichexnet_cpu", num_classes=HEADS, head_width=8).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([findings_bias, -3.0]))
        model.boxes.out.weight.zero_()
        model.boxes.out.bias.zero_()
        model.boxes.out.bias[4] = 5.0
    spec = InferenceSpec(input={"size": 64, "channels": 1, "pipeline": {"name": "none", "steps": []}},
                         heads=[{"name": "findings", "kind": "multilabel", "classes": ["pneumonia", "COVID-19"]},
                                {"name": "boxes", "kind": "detection", "classes": ["opacity"]},
                                {"name": "mask", "kind": "segmentation", "classes": ["heart-excluded", "behind"]}])
    return save_checkpoint(tmp_path / f"m{findings_bias}.pt", model, spec=spec), model


@pytest.fixture
def wide_image(tmp_path: Path) -> Path:
    from PIL import Image

    image = tmp_path / "wide.png"
    Image.fromarray((np.random.default_rng(0).random((96, 128)) * 255).astype(np.uint8)).save(image)
    return image


def test_predict_gives_probabilities_boxes_and_masks_in_the_original_frame(tmp_path, wide_image):
    """A multi-task checkpoint through `predict_paths`: the filter's answer per image, boxes scaled from the
    64 px model frame to a 128 x 96 original, mask PNGs of the original's size; stopped images get none."""
    from PIL import Image

    from lungscreen.inference.predict import Predictor, predict_paths

    checkpoint, model = confident_checkpoint(tmp_path)
    masks = tmp_path / "masks"
    masks.mkdir()
    predictor = Predictor(checkpoint)
    row = predict_paths(predictor, [wide_image], masks=masks).iloc[0]
    assert row["pneumonia"] == pytest.approx(float(torch.sigmoid(torch.tensor(3.0))), abs=1e-5) and row["screened"]
    boxes = np.array(json.loads(row["boxes"]))
    pixels = np.asarray(Image.open(wide_image), np.float32) / 255
    found = model.screen(torch.from_numpy(predictor.prepare(pixels).image).float().div(255)[None, None])[0]
    np.testing.assert_allclose(boxes[:, :4], found["boxes"]["boxes"].numpy() * [2.0, 1.5, 2.0, 1.5], atol=0.1)
    written = row["mask"].split(";")
    assert [Path(p).name for p in written] == ["00000-wide-heart-excluded.png", "00000-wide-behind.png"]
    assert np.asarray(Image.open(written[0])).shape == (96, 128)
    stopped_checkpoint, _ = confident_checkpoint(tmp_path, findings_bias=-6.0)  # the filter stops every image
    stopped = predict_paths(Predictor(stopped_checkpoint), [wide_image], masks=masks).iloc[0]
    assert not stopped["screened"] and stopped["boxes"] == "" and stopped["mask"] == ""


def test_explain_draws_the_boxes_and_explains_the_findings_head(tmp_path, wide_image):
    from PIL import Image

    from lungscreen.audit.explain import explain_images

    checkpoint, _ = confident_checkpoint(tmp_path)
    rows = explain_images(checkpoint, [wide_image], tmp_path / "out", methods=["gradcam"], faithfulness=False)
    row = rows.iloc[0]
    assert row["error"] == "" and row["class"] == "pneumonia"
    picture = np.asarray(Image.open(row["file"]))
    assert picture.shape == (96, 128, 3)
    assert ((picture[..., 0] == 255) & (picture[..., 1] == 255) & (picture[..., 2] == 0)).any()  # yellow boxes
