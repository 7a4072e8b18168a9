"""Every model of the zoo exports to ONNX and runs in onnxruntime with PyTorch's outputs (within 1e-4), every
head of a multi-task model too."""

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
    info = model_info(name)
    heads = list(info.heads) or ["logits"]
    model = create(name, num_classes={head: 3 for head in heads} if info.heads else 3, in_channels=1).eval()
    side = SIDE.get(name, 64)
    images = torch.rand(2, 1, side, side)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(model, (images,), path, dynamo=False, opset_version=17, do_constant_folding=False,
                          input_names=["image"], output_names=heads,
                          dynamic_axes={"image": {0: "batch"}, **{head: {0: "batch"} for head in heads}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = dict(zip(heads, session.run(heads, {"image": images.numpy()}), strict=True))
    with torch.no_grad():
        out = model(images)
    expected = {head: value.numpy() for head, value in out.items()} if isinstance(out, dict) else {"logits": out.numpy()}
    assert set(expected) == set(heads)
    if info.task != "multitask":
        segmentation = info.task == "segmentation"
        assert exported["logits"].shape == ((2, 3, side, side) if segmentation else (2, 3))
    for head in heads:
        np.testing.assert_allclose(exported[head], expected[head], rtol=0, atol=1e-4, err_msg=head)
