"""CT slices cut from papers: the crop keeps the body (lungs included) and drops what lies beside it."""

from __future__ import annotations

import numpy as np
import pytest

from lungscreen.errors import ConfigError
from lungscreen.preprocessing import get_pipeline
from lungscreen.preprocessing.ct import CropToBody, PercentileWindow, body_mask
from lungscreen.preprocessing.transforms import Sample


def synthetic_slice() -> np.ndarray:
    """A 200 x 240 figure: black margin, an elliptic body (bright wall, two dark lungs touching nothing,
    a bright mediastinum) and a white letter block to its right."""
    y, x = np.mgrid[:200, :240]
    image = np.full((200, 240), 0.02, np.float32)
    body = ((x - 100) / 80) ** 2 + ((y - 100) / 70) ** 2 <= 1
    image[body] = 0.75
    for centre in (65, 135):
        image[((x - centre) / 28) ** 2 + ((y - 100) / 45) ** 2 <= 1] = 0.1  # lungs
    image[180:195, 205:235] = 1.0  # a letter block beside the body
    return image


def test_the_body_crop_keeps_the_lungs_and_drops_the_letters():
    image = synthetic_slice()
    cropped = CropToBody(margin=0.0)(Sample(image)).framed()
    x0, y0, x1, y1 = cropped.geometry.box
    assert (x0, y0) == pytest.approx((20, 30), abs=2) and (x1, y1) == pytest.approx((181, 171), abs=2)
    assert cropped.image.max() < 1.0  # the letters are gone
    assert body_mask(image)[100, 65] and body_mask(image)[100, 135]  # the lungs are inside the body


def test_a_slice_that_is_all_body_is_left_alone():
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32) * 0.2 + 0.7
    assert CropToBody()(Sample(image)).image.shape == (64, 64)


def test_the_percentile_window_spans_zero_to_one():
    image = synthetic_slice() * 0.5 + 0.2  # another display window
    out = PercentileWindow(low=1, high=99)(Sample(image)).image
    assert out.min() == 0.0 and out.max() == 1.0
    with pytest.raises(ConfigError, match="percentile_window needs"):
        PercentileWindow(low=50, high=10)


def test_ctcrop_on_real_slices(shared_data):
    from lungscreen.io.images import read_image

    pipeline = get_pipeline("ctcrop")
    for path in sorted((shared_data / "ucsd-covid-ct" / "CT_COVID").glob("*.png"))[:8]:
        image = read_image(path).pixels
        out = pipeline(image)
        assert out.shape[0] <= image.shape[0] and out.shape[1] <= image.shape[1]
        assert out.shape[0] >= 0.5 * image.shape[0] and out.shape[1] >= 0.5 * image.shape[1]  # the body, not a part
        assert out.min() == 0.0 and out.max() == 1.0
