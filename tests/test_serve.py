"""The web viewer: its API, its guards, its command line, and the page in a real headless Chromium."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from browser import CHROMIUM_ARGS, chromium_path, served, unavailable
from lungscreen.inference.predict import Predictor
from lungscreen.lungs.segmenter import ClassicalSegmenter
from lungscreen.models import OperatingPoint, create, save_checkpoint
from lungscreen.serve import create_app
from model_specs import spec_for

CLASSES = ["normal", "pneumonia", "COVID-19"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small classifier with an operating point on COVID-19 (untrained weights: the viewer, not the model,
    is under test)."""
    torch.manual_seed(0)
    model = create("resnet18", num_classes=3, width=8)
    point = OperatingPoint(positive_class="COVID-19", threshold=0.3, rule="sensitivity/COVID-19 >= 0.95",
                           chosen_on="val split", figures={})
    spec = spec_for(CLASSES).with_operating_point(point)
    return save_checkpoint(tmp_path_factory.mktemp("run") / "best.pt", model, spec=spec, extra={"run": "viewer-test"})


def client_for(checkpoint: Path, **options) -> TestClient:
    return TestClient(create_app(Predictor(checkpoint), segmenter=ClassicalSegmenter(), **options))


def png_bytes(side: int = 96) -> bytes:
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((side, side + 20)) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_page_and_model_summary(checkpoint):
    client = client_for(checkpoint)
    assert client.get("/health").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and "lungscreen" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/viewer.js").status_code == 200
    assert client.get("/static/..%2F..%2Fapp.py").status_code == 404
    model = client.get("/model").json()
    assert model["classes"] == CLASSES and model["operating_point"]["threshold"] == 0.3
    assert model["run"] == "viewer-test" and "not a diagnostic device" in model["disclaimer"]
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_predict_returns_probabilities_pictures_and_the_decision(checkpoint):
    answer = client_for(checkpoint).post("/predict", files={"file": ("chest.png", png_bytes(), "image/png")}).json()
    probabilities = answer["probabilities"]
    assert list(probabilities) == CLASSES and sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    decided = "COVID-19" if probabilities["COVID-19"] >= 0.3 else max(["normal", "pneumonia"], key=probabilities.get)
    assert answer["prediction"] == decided
    for picture in answer["pictures"].values():
        assert picture.startswith("data:image/png;base64,")
    assert answer["image"]["width"] == 116 and answer["image"]["height"] == 96


def test_a_dicom_upload_keeps_its_identity(checkpoint, shared_data):
    dicom = next((shared_data / "dicom").glob("*.dcm"))
    answer = client_for(checkpoint).post("/predict", files={"file": ("x.bin", dicom.read_bytes(), "text/plain")})
    assert answer.status_code == 200, answer.text
    assert answer.json()["image"]["format"] == "DICOM" and answer.json()["image"]["sop_instance_uid"]


def test_oversize_uploads_are_refused_before_decoding(checkpoint):
    client = client_for(checkpoint, max_upload=4096)
    response = client.post("/predict", files={"file": ("big.png", png_bytes(300), "image/png")})
    assert response.status_code == 413 and "larger than" in response.json()["detail"]


@pytest.mark.parametrize("content", [b"just some text, not an image" * 10, b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50])
def test_content_is_judged_by_its_bytes(checkpoint, content):
    response = client_for(checkpoint).post("/predict", files={"file": ("chest.png", content, "image/png")})
    assert response.status_code == 415, response.text
    assert "PNG" in response.json()["detail"]


def test_a_hostile_file_name_is_only_a_name(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = Path("/etc/passwd").read_bytes()
    response = client_for(checkpoint).post("/predict", files={"file": ("../../etc/passwd", png_bytes(), "image/png")})
    assert response.status_code == 200
    assert Path("/etc/passwd").read_bytes() == before and list(tmp_path.iterdir()) == []


def test_a_token_guards_everything_but_health(checkpoint):
    client = client_for(checkpoint, token="s3cret")
    assert client.get("/health").status_code == 200
    assert client.get("/model").status_code == 401
    assert client.get("/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
    upload = {"file": ("chest.png", png_bytes(), "image/png")}
    assert client.post("/predict", files=upload).status_code == 401
    assert client.post("/predict", files=upload, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_serve_refuses_an_open_host_without_a_token(cli, checkpoint):
    code, _, stderr = cli("serve", str(checkpoint), "--host", "0.0.0.0")
    assert code == 2 and "needs --token" in stderr


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_crafted_pickle_is_not_a_model(cli, tmp_path):
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "marker.txt"
    with evil.open("wb") as handle:
        pickle.dump({"state_dict": Payload(marker)}, handle)
    code, _, stderr = cli("serve", str(evil))
    assert code == 2 and not marker.exists(), stderr


@pytest.fixture
def server(checkpoint):
    """The viewer on a free loopback port in a thread, as `lungscreen serve` runs it."""
    with served(create_app(Predictor(checkpoint), segmenter=ClassicalSegmenter())) as url:
        yield url


def test_the_page_shows_an_answer_in_headless_chromium(server, shared_data, tmp_path):
    """Upload a real radiograph through the page; the probabilities and the overlay appear, nothing errs."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    image = next((shared_data / "covid19-radiography-database").rglob("*.png"))
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("request", lambda request: request.url.startswith((server, "data:")) or problems.append(request.url))
            page.goto(server, wait_until="load")
            page.wait_for_function("document.getElementById('model').textContent.includes('resnet18')")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#result:not([hidden])")
            rows = page.locator("#probabilities tbody tr")
            assert rows.count() == 3 and "COVID-19" in rows.all_inner_texts()[2]
            assert page.get_attribute("#overlay", "src").startswith("data:image/png;base64,")
            assert page.evaluate("document.getElementById('overlay').naturalWidth") > 0
            assert ("threshold 0.30 chosen by the rule sensitivity/COVID-19 >= 0.95 on the val split"
                    in page.inner_text("#decision"))
            page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert (tmp_path / "viewer.png").stat().st_size > 10_000


def test_predict_rows_name_the_operating_point_that_decided_them(checkpoint, tmp_path):
    from lungscreen.inference.predict import predict_paths

    (tmp_path / "chest.png").write_bytes(png_bytes())
    row = predict_paths(checkpoint, [tmp_path]).iloc[0]
    assert row["decided_by"] == "COVID-19 if p >= 0.3 (operating point: sensitivity/COVID-19 >= 0.95, on val split)"
    assert row["prediction"] == ("COVID-19" if row["COVID-19"] >= 0.3 else
                                 max(["normal", "pneumonia"], key=lambda name: row[name]))


def test_with_the_lung_crop_the_heat_map_sits_on_the_window_the_model_saw(tmp_path, shared_data):
    """A lungcrop model sees the lung box only: its map is placed on that box of the original (EigenCAM, which
    needs no trained gradients, fills it) and is zero elsewhere; the answer names the box and the lung method."""
    import cv2

    from lungscreen.audit.cams import class_activation_maps
    from lungscreen.audit.screening import screen_image
    from lungscreen.io.images import read_image
    from lungscreen.preprocessing import get_pipeline
    from lungscreen.preprocessing.model_input import to_tensor

    torch.manual_seed(0)
    pipeline = get_pipeline("lungcrop", {"segment_lungs.method": "classical"}).to_dict()
    path = save_checkpoint(tmp_path / "best.pt", create("resnet18", num_classes=3, width=8),
                           spec=spec_for(CLASSES, pipeline=pipeline, size=96))
    image = read_image(next((shared_data / "openist-lung-masks").rglob("*.jpg")))
    screening = screen_image(Predictor(path), image, segmenter=ClassicalSegmenter(), method="eigencam")
    x0, y0, x1, y1 = (int(round(v)) for v in screening.seen)
    height, width = image.pixels.shape
    assert 0 < x1 - x0 < width or 0 < y1 - y0 < height, "the lung crop is smaller than the film"
    inside = np.zeros((height, width), bool)
    inside[y0:y1, x0:x1] = True
    assert screening.heatmap[~inside].max() == 0 and (screening.heatmap[inside] > 0).mean() > 0.5
    predictor = Predictor(path)
    sample = predictor.prepare(image.pixels)
    index = CLASSES.index(screening.prediction)
    cam = class_activation_maps(predictor.classifier, to_tensor([sample.image], predictor.spec.input), [index],
                                "eigencam")[0]
    expected = cv2.resize(cam.astype(np.float32), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    assert np.allclose(screening.heatmap[y0:y1, x0:x1], expected, atol=1e-4 * max(1.0, float(cam.max())))
    answer = screening.as_dict()
    assert answer["seen"] == [round(v, 1) for v in screening.seen] and answer["lungs"]["method"] == "classical"
    picture = screening.picture(image.pixels)
    assert picture.shape == (height, width, 3)
    assert (picture[y0 + 5: y1 - 5, max(0, x0 - 1): x0 + 2] == 255).all(axis=-1).any(), "dashed frame on the window"
