"""Bad input across every command ends in one line naming the file or the key, with an honest exit code.

Each case runs the real entry point (``lungscreen.cli.main``, the one error boundary) in this process and
checks the exit code, that the first line of what it printed names the culprit, and that no traceback
was printed."""

from __future__ import annotations

import json
import pickle
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from training_fixtures import make_manifest, tiny_recipe, write_recipe

from lungscreen.data.manifest import new_row, save_manifest
from lungscreen.models import create

BAD_INPUT, BUG = 2, 1


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def first_line(self) -> str:
        lines = [line for line in self.err.splitlines() if line.strip()]
        return lines[0] if lines else ""


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``lungscreen ARGS`` through its real entry point; the process's signal handlers are restored."""
    from lungscreen.cli import main

    def run(*args: str) -> Result:
        handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        monkeypatch.setattr(sys, "argv", ["lungscreen", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err + captured.out, captured.err
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny manifest and a run trained on it (seconds)."""
    from lungscreen.training.config import from_dict
    from lungscreen.training.engine import train

    root = tmp_path_factory.mktemp("cli-errors")
    manifest = make_manifest(root / "data", per_class=6)
    recipe = tiny_recipe(manifest)
    recipe["model"] = {"name": "squeezenet1_1"}
    recipe["stages"] = [{"name": "all", "epochs": 1, "image_size": 32, "train": "all"}]
    run = train(from_dict(recipe), out=root / "run", quiet=True).run_dir
    images = sorted(Path(manifest).parent.glob("*.png"))
    return {"root": root, "manifest": manifest, "recipe": recipe, "run": run, "images": images}


def expect(result: Result, code: int, *names: str) -> None:
    assert result.code == code, (result.code, result.err)
    for name in names:
        assert name in result.first_line, (name, result.first_line)


# --------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------

def test_data_build_on_a_missing_folder(cli, tmp_path):
    expect(cli("data", "build", tmp_path / "absent", "--out", tmp_path / "m"), BAD_INPUT, "absent")


def test_data_build_on_a_folder_with_no_known_layout(cli, tmp_path):
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hello")
    expect(cli("data", "build", tmp_path / "random", "--out", tmp_path / "m"), BAD_INPUT, "random")


def test_data_build_with_bad_ratios(cli, data, tmp_path):
    expect(cli("data", "build", data["root"] / "data", "--out", tmp_path / "m", "--ratios", "0.5,0.6"), BAD_INPUT,
           "ratios")


def test_data_validate_on_a_text_file_named_parquet(cli, tmp_path):
    fake = tmp_path / "fake.parquet"
    fake.write_text("image_path,label\nx.png,normal\n")
    expect(cli("data", "validate", fake), BAD_INPUT, "fake.parquet")


def test_data_validate_on_a_missing_manifest(cli, tmp_path):
    expect(cli("data", "validate", tmp_path / "none.parquet"), BAD_INPUT, "none")


def test_data_validate_on_a_csv_without_required_columns(cli, tmp_path):
    (tmp_path / "m.csv").write_text("path,finding\nx.png,normal\n")
    expect(cli("data", "validate", tmp_path / "m.csv"), BAD_INPUT, "m.csv", "image_path")


def test_data_validate_on_an_unknown_label(cli, tmp_path):
    pd.DataFrame([new_row("x.png", "normal", "p1", "s")]).assign(label="flu").to_csv(tmp_path / "m.csv", index=False)
    expect(cli("data", "validate", tmp_path / "m.csv"), BAD_INPUT, "m.csv", "label")


def test_data_validate_refuses_leakage(cli, data, tmp_path):
    from lungscreen.data.manifest import load_manifest

    frame = load_manifest(data["manifest"])  # absolute paths: the copy elsewhere still finds the images
    patient = frame["patient_id"].iloc[0]
    frame.loc[frame["patient_id"] == patient, "split"] = ["train", "test"][: (frame["patient_id"] == patient).sum()]
    frame.to_csv(tmp_path / "leaky.csv", index=False)
    expect(cli("data", "validate", tmp_path / "leaky.csv"), BAD_INPUT, "patient")


def test_data_dedup_on_a_missing_path(cli, tmp_path):
    expect(cli("data", "dedup", tmp_path / "absent"), BAD_INPUT, "absent")


def test_data_synth_with_an_unknown_shortcut(cli, tmp_path):
    expect(cli("data", "synth", tmp_path / "ph", "--shortcut", "tattoo"), BAD_INPUT, "shortcut")


def test_data_synth_with_an_absurd_size(cli, tmp_path):
    expect(cli("data", "synth", tmp_path / "ph", "--size", "4"), BAD_INPUT, "size")


# --------------------------------------------------------------------------------------------------------
# lungs and preprocess
# --------------------------------------------------------------------------------------------------------

def test_lungs_train_on_a_manifest_without_masks(cli, data):
    expect(cli("lungs", "train", data["manifest"], "--out", data["root"] / "x.pt"), BAD_INPUT, "mask")


def test_lungs_train_with_a_mask_row_without_convention(cli, tmp_path):
    save_manifest(pd.DataFrame([new_row(tmp_path / "a.png", "normal", "p1", "s", mask_path=str(tmp_path / "m.png"))]),
                  tmp_path / "m")
    expect(cli("lungs", "train", tmp_path / "m.parquet", "--out", tmp_path / "x.pt"), BAD_INPUT, "mask_convention")


def test_lungs_segment_with_an_unknown_method(cli, data, tmp_path):
    expect(cli("lungs", "segment", data["images"][0], "--out", tmp_path / "o", "--method", "magic"), BAD_INPUT,
           "method")


def test_lungs_segment_with_a_missing_model(cli, data, tmp_path):
    expect(cli("lungs", "segment", data["images"][0], "--out", tmp_path / "o", "--method", "unet", "--model",
               tmp_path / "absent.pt"), BAD_INPUT, "absent.pt")


def test_lungs_segment_where_every_image_fails(cli, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    result = cli("lungs", "segment", tmp_path / "in", "--out", tmp_path / "o", "--method", "classical")
    assert result.code == BAD_INPUT and "broken.png" in result.err


def test_lungs_evaluate_with_an_unknown_method(cli, data):
    expect(cli("lungs", "evaluate", data["manifest"], "--method", "magic"), BAD_INPUT, "method")


def test_preprocess_with_an_unknown_pipeline(cli, data, tmp_path):
    expect(cli("preprocess", data["manifest"], "--pipeline", "tartaglion", "--out", tmp_path / "p"), BAD_INPUT,
           "tartaglion")


def test_preprocess_with_an_unknown_step_parameter(cli, data, tmp_path):
    expect(cli("preprocess", data["manifest"], "--pipeline", "clahe", "--set", "clahe.gamma=2", "--out", tmp_path / "p"),
           BAD_INPUT, "gamma")


def test_preprocess_with_a_pipeline_file_that_is_not_json(cli, data, tmp_path):
    (tmp_path / "p.json").write_text("{not json")
    expect(cli("preprocess", data["manifest"], "--pipeline", str(tmp_path / "p.json"), "--out", tmp_path / "p"),
           BAD_INPUT, "p.json")


def test_preprocess_with_a_bad_modality(cli, data, tmp_path):
    expect(cli("preprocess", data["manifest"], "--modality", "MRI", "--out", tmp_path / "p"), BAD_INPUT, "modality")


def test_preprocess_with_a_bad_lung_model_policy(cli, data, tmp_path):
    expect(cli("preprocess", data["manifest"], "--if-no-lung-model", "pray", "--out", tmp_path / "p"), BAD_INPUT,
           "if-no-lung-model")


# --------------------------------------------------------------------------------------------------------
# train and tune
# --------------------------------------------------------------------------------------------------------

def test_train_with_an_unknown_recipe(cli):
    expect(cli("train", "covid-resnet-cpux", "--check"), BAD_INPUT, "covid-resnet-cpux")


@pytest.mark.parametrize("override, key", [
    ("data.batch_size=[1,", "data.batch_size"),
    ("model.options.width=abc", "model.options"),
    ("stages.0.bogus=1", "stages.0.bogus"),
    ("stages.0.epochs=2.5", "stages.0.epochs"),
    ("data.task=covid-19-only", "data.task"),
    ("stages.3.epochs=1", "stages.3"),
    ("precision=fp8", "precision"),
])
def test_train_check_with_a_bad_override(cli, data, override, key):
    expect(cli("train", "covid-resnet-cpu", "--manifest", data["manifest"], "--set", override, "--check"), BAD_INPUT,
           key)


def test_train_with_a_recipe_that_is_not_yaml(cli, tmp_path):
    (tmp_path / "r.yaml").write_text("stages: [unclosed\n")
    expect(cli("train", tmp_path / "r.yaml", "--check"), BAD_INPUT, "r.yaml")


def test_train_with_a_recipe_that_is_a_list(cli, tmp_path):
    (tmp_path / "r.yaml").write_text("- a\n- b\n")
    expect(cli("train", tmp_path / "r.yaml", "--check"), BAD_INPUT, "r.yaml")


def test_train_with_a_missing_manifest(cli, tmp_path):
    expect(cli("train", "covid-resnet-cpu", "--manifest", tmp_path / "none.parquet", "--check"), BAD_INPUT,
           "data.manifest")


def test_train_resume_of_a_folder_that_is_not_a_run(cli, tmp_path):
    expect(cli("train", "--resume", tmp_path), BAD_INPUT, "--resume")


def test_train_into_a_folder_that_holds_a_run(cli, data):
    path = write_recipe(data["root"] / "r.yaml", data["recipe"])
    expect(cli("train", path, "--out", data["run"]), BAD_INPUT, "--out")


def test_train_a_model_that_cannot_learn_the_task(cli, data, tmp_path):
    recipe = dict(data["recipe"], model={"name": "lung_unet"})
    expect(cli("train", write_recipe(tmp_path / "r.yaml", recipe), "--check"), BAD_INPUT, "data.task")


def test_tune_with_an_unknown_recipe(cli):
    expect(cli("tune", "no-such-recipe"), BAD_INPUT, "no-such-recipe")


# --------------------------------------------------------------------------------------------------------
# predict and models
# --------------------------------------------------------------------------------------------------------

def test_predict_with_a_run_folder_without_best_pt(cli, data, tmp_path):
    expect(cli("predict", tmp_path, data["images"][0], "--out", tmp_path / "p.csv"), BAD_INPUT, "best.pt")


def test_predict_with_a_text_file_as_checkpoint(cli, data, tmp_path):
    (tmp_path / "best.pt").write_text("hi")
    expect(cli("predict", tmp_path, data["images"][0], "--out", tmp_path / "p.csv"), BAD_INPUT, "best.pt")


def test_predict_with_a_crafted_pickle(cli, data, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state_dict": Payload()}))
    result = cli("predict", tmp_path / "evil.pt", data["images"][0], "--out", tmp_path / "p.csv")
    expect(result, BAD_INPUT, "evil.pt", "refused")
    assert "pwned" not in result.out and "warning" not in result.err  # no raw library warning either


def test_predict_with_a_version_1_checkpoint(cli, data, tmp_path):
    model = create("squeezenet1_1", num_classes=2)
    torch.save({"format": "lungscreen-checkpoint", "version": 1, "state_dict": model.state_dict(),
                "meta": json.dumps({"name": "squeezenet1_1", "kwargs": {}, "in_channels": 1, "num_classes": 2,
                                    "class_names": ["a", "b"], "preprocessing": {}, "extra": {}})}, tmp_path / "v1.pt")
    expect(cli("predict", tmp_path / "v1.pt", data["images"][0], "--out", tmp_path / "p.csv"), BAD_INPUT, "v1.pt",
           "models convert")


def test_predict_on_a_missing_input(cli, data, tmp_path):
    expect(cli("predict", data["run"], tmp_path / "nonexistent", "--out", tmp_path / "p.csv"), BAD_INPUT,
           "nonexistent")


def test_predict_on_an_empty_folder(cli, data, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("predict", data["run"], tmp_path / "empty", "--out", tmp_path / "p.csv")
    expect(result, BAD_INPUT, "no image")
    assert not (tmp_path / "p.csv").exists()


def test_predict_where_every_image_fails(cli, data, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = cli("predict", data["run"], tmp_path / "in", "--out", tmp_path / "p.csv")
    assert result.code == BAD_INPUT and "no image could be scored" in result.err
    assert "a.png" in pd.read_csv(tmp_path / "p.csv")["path"].iloc[0]


def test_predict_with_some_failures_exits_0_and_counts_them_last(cli, data, tmp_path):
    (tmp_path / "in").mkdir()
    Image.open(data["images"][0]).save(tmp_path / "in" / "good.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"junk")
    result = cli("predict", data["run"], tmp_path / "in", "--out", tmp_path / "p.csv")
    assert result.code == 0 and "1 image(s) failed" in result.err.strip().splitlines()[-1]


def test_predict_into_a_missing_folder_needs_mkdir(cli, data, tmp_path):
    target = tmp_path / "deep" / "er" / "p.csv"
    expect(cli("predict", data["run"], data["images"][0], "--out", target), BAD_INPUT, "--out", "deep")
    assert not (tmp_path / "deep").exists()
    assert cli("predict", data["run"], data["images"][0], "--out", target, "--mkdir").code == 0 and target.is_file()


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write into, root included (``chattr +i`` for root, who ignores permissions)."""
    import os
    import subprocess

    folder = tmp_path / "read-only"
    folder.mkdir()
    root = os.geteuid() == 0
    if root and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: no folder is read-only here")
    if not root:
        folder.chmod(0o555)
    yield folder
    if root:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o755)


def test_writing_into_a_read_only_folder_names_the_target_not_the_temporary_file(cli, data, read_only_folder):
    target = read_only_folder / "p.csv"
    result = cli("predict", data["run"], data["images"][0], "--out", target)
    expect(result, BAD_INPUT, str(target))
    assert ".p.csv." not in result.err and ".tmp" not in result.err, result.err


def test_export_names_its_own_option_for_a_missing_folder(cli, data, tmp_path):
    result = cli("export", data["run"], "--onnx", tmp_path / "missing" / "model.onnx")
    expect(result, BAD_INPUT, "--onnx", "missing")
    assert "--out" not in result.err


def test_evaluate_refuses_training_images_listed_again_under_other_patient_ids(cli, data, tmp_path):
    """The patient check alone let the same films through under new IDs; their pictures give them away."""
    frame = pd.read_csv(data["manifest"].with_suffix(".csv"), keep_default_na=False)
    folder = Path(data["manifest"]).parent
    training = frame[frame["split"] == "train"].head(3)
    rows = [{"image_path": str(folder / path), "label": label, "patient_id": f"new-{i}", "source": "elsewhere"}
            for i, (path, label) in enumerate(zip(training["image_path"], training["label"]))]
    with Image.open(folder / training["image_path"].iloc[0]) as film:  # re-encoded and resized, under a new name
        film.resize((60, 60)).save(tmp_path / "copy.jpg", quality=92)
    rows.append({"image_path": str(tmp_path / "copy.jpg"), "label": training["label"].iloc[0], "patient_id": "new-9",
                 "source": "elsewhere"})
    pd.DataFrame(rows).to_csv(tmp_path / "copies.csv", index=False)
    result = cli("evaluate", data["run"], "--on", tmp_path / "copies.csv", "--split", "all", "--out", tmp_path)
    expect(result, BAD_INPUT, "4 evaluated image(s) are copies of the run's training images")
    held_out = frame[frame["split"] == "test"].assign(image_path=lambda f: [str(folder / p) for p in f["image_path"]])
    held_out.to_csv(tmp_path / "held-out.csv", index=False)
    assert cli("evaluate", data["run"], "--on", tmp_path / "held-out.csv", "--out", tmp_path).code == 0


def test_predict_into_an_unknown_format(cli, data, tmp_path):
    expect(cli("predict", data["run"], data["images"][0], "--out", tmp_path / "p.txt"), BAD_INPUT, "--out")


def test_predict_inputs_of_another_modality(cli, data, tmp_path):
    result = cli("predict", data["run"], data["images"][0], "--out", tmp_path / "p.csv", "--modality", "CT")
    expect(result, BAD_INPUT, "--modality", "CXR")
    assert cli("predict", data["run"], data["images"][0], "--out", tmp_path / "p.csv", "--modality", "CT",
               "--force").code == 0


def test_models_list_with_no_match(cli):
    expect(cli("models", "list", "zz*"), BAD_INPUT, "zz*")


def test_models_convert_of_a_current_checkpoint(cli, data, tmp_path):
    expect(cli("models", "convert", data["run"] / "best.pt", tmp_path / "new.pt"), BAD_INPUT, "best.pt")


def test_an_unknown_command(cli):
    expect(cli("fly"), BAD_INPUT, "fly")


def test_an_unknown_option(cli, data, tmp_path):
    expect(cli("predict", data["run"], data["images"][0], "--colour", "red"), BAD_INPUT, "--colour")


def test_demo_with_a_missing_data_folder(cli, tmp_path):
    expect(cli("demo", "--data", tmp_path / "absent"), BAD_INPUT, "absent")


def test_an_unexpected_exception_says_it_is_a_bug(cli, monkeypatch, data, tmp_path):
    from lungscreen.inference import predict as predict_module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(predict_module, "predict_paths", broken)
    result = cli("predict", data["run"], data["images"][0], "--out", tmp_path / "p.csv")
    expect(result, BUG, "internal error", "ZeroDivisionError")
    assert "LUNGSCREEN_DEBUG=1" in result.err and "bug" in result.err


def test_warnings_are_one_line_each_and_shown_once(cli, data, tmp_path):
    import warnings

    from lungscreen.inference import predict as predict_module

    real = predict_module.predict_paths

    def noisy(*args, **kwargs):
        for _ in range(3):
            warnings.warn("a library says something\nover two lines", UserWarning, stacklevel=1)
        return real(*args, **kwargs)

    import unittest.mock

    with unittest.mock.patch.object(predict_module, "predict_paths", noisy):
        result = cli("predict", data["run"], data["images"][0], "--out", tmp_path / "p.csv")
    assert result.code == 0
    assert result.err.count("warning: a library says something") == 1 and "over two lines" not in result.err
    assert "UserWarning" not in result.err and ".py:" not in result.err
