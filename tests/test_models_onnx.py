"""Every model of the zoo exports to ONNX and runs in onnxruntime with PyTorch's outputs (within 1e-4)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from lungscreen.models import create, list_models, model_info

# The legacy exporter turns adaptive pooling into fixed pooling, so the input must give a last map whose
# side is a multiple of the pooled grid: COVID-Net's 7x7 flatten at 224 px, Conv8's 2x2 at its 1024 px.
# Constant folding is left to onnxruntime (it is the slow part of the export on two shared cores).
SIDE = {"covidnet": 224, "conv8": 1024}


@pytest.mark.parametrize("name", list_models())
def test_onnx_export_matches_pytorch(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create(name, num_classes=3, in_channels=1).eval()
    side = SIDE.get(name, 64)
    images = torch.rand(2, 1, side, side)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(model, (images,), path, dynamo=False, opset_version=17, do_constant_folding=False,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (exported,) = session.run(None, {"image": images.numpy()})
    with torch.no_grad():
        expected = model(images).numpy()
    segmentation = model_info(name).task == "segmentation"
    assert exported.shape == ((2, 3, side, side) if segmentation else (2, 3))
    np.testing.assert_allclose(exported, expected, rtol=0, atol=1e-4)
