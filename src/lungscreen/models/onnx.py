"""A model in ONNX form: written from a checkpoint with its inference spec inside, run on onnxruntime.

An exported file is self-describing like a checkpoint: its ONNX metadata holds the checkpoint's metadata
(``lungscreen.meta``: name, build options, training provenance) and the inference spec
(``lungscreen.spec``), so every consumer feeds it from the file alone. Reading it needs numpy and
onnxruntime only: :class:`OnnxModel` never imports torch (writing one does, lazily).

The graph has one input ``image`` (N, channels, size, size) float32 with a dynamic batch axis and one output
per head of the spec, named after the head, holding logits (the spec's activation turns them into
probabilities: :meth:`InferenceSpec.probabilities`); a model with an out-of-distribution gate adds
``features``, its pooled embedding, which the gate reads.

Example:
    >>> export_checkpoint(load_checkpoint("runs/r/best.pt"), "model.onnx")   # doctest: +SKIP
    >>> model = OnnxModel("model.onnx")                                        # doctest: +SKIP
    >>> model.spec.class_names, model(np.zeros((2, 1, 256, 256), np.float32))["findings"].shape  # doctest: +SKIP
    (['normal', 'pneumonia', 'COVID-19'], (2, 3))
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lungscreen.errors import ConfigError, WeightsError
from lungscreen.io.files import atomic_path, file_sha256
from lungscreen.models.inference_spec import InferenceSpec

if TYPE_CHECKING:
    from collections.abc import Iterable

    from lungscreen.models.checkpoint import Checkpoint

#: ONNX metadata keys
FORMAT_KEY, META_KEY, SPEC_KEY = "lungscreen.format", "lungscreen.meta", "lungscreen.spec"
ONNX_FORMAT = "lungscreen-onnx-1"
#: the input tensor's name
INPUT_NAME = "image"
#: the output holding the pooled embedding, in exports of a model with an OOD gate
EMBEDDING_NAME = "features"
OPSET = 17
#: largest difference from PyTorch an fp32 export may show on random inputs
PARITY_TOLERANCE = 1e-4


def is_onnx(path: str | Path) -> bool:
    """A file named ``*.onnx`` (ONNX has no magic bytes; the name is the contract)."""
    return Path(path).suffix.lower() == ".onnx" and Path(path).is_file()


def export_checkpoint(checkpoint: Checkpoint, path: str | Path, *, spec: InferenceSpec | None = None,
                      check: bool = True) -> float:
    """Write ``checkpoint``'s model as ONNX (fp32, opset 17) with its metadata and ``spec`` (default: its own).

    Args:
        check: run PyTorch and onnxruntime on two random inputs and refuse an export whose outputs differ
            by more than :data:`PARITY_TOLERANCE`.

    Returns:
        The largest absolute difference of the check (0.0 without it).

    Raises:
        ConfigError: the export differs from the PyTorch model.
    """
    import onnx
    import torch

    from lungscreen.models.layers import WithEmbedding

    spec = spec or checkpoint.spec
    names = [head.name for head in spec.heads]
    model = checkpoint.model.eval()
    if spec.gate is not None and len(names) == 1 and hasattr(model, "features"):
        model, names = WithEmbedding(model, names[0]).eval(), [names[0], EMBEDDING_NAME]  # what the gate reads
    images = torch.rand(2, spec.input.channels, spec.input.size, spec.input.size, generator=torch.Generator().manual_seed(0))
    with atomic_path(path) as temporary, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(model, (images,), temporary, dynamo=False, opset_version=OPSET, input_names=[INPUT_NAME],
                          output_names=names, dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in names}})
        graph = onnx.load(str(temporary))
        meta = {**checkpoint.meta, "spec": spec.model_dump(mode="json"), "exported_from": checkpoint.sha256}
        for key, value in ((FORMAT_KEY, ONNX_FORMAT), (META_KEY, json.dumps(meta, sort_keys=True)),
                           (SPEC_KEY, spec.model_dump_json())):
            graph.metadata_props.add(key=key, value=value)
        onnx.save(graph, str(temporary))
        difference = 0.0
        if check:
            with torch.inference_mode():
                expected = model(images)
            expected = expected if isinstance(expected, dict) else {names[0]: expected}
            outputs = OnnxModel(temporary)(images.numpy())
            difference = max(float(np.abs(outputs[n] - expected[n].float().numpy()).max()) for n in names)
            if difference > PARITY_TOLERANCE:
                raise ConfigError(f"the ONNX export of {checkpoint.path} differs from PyTorch by {difference:.2e} "
                                  f"(more than {PARITY_TOLERANCE:g}); not written")
    return difference


def quantize_int8(source: str | Path, target: str | Path, calibration: Iterable[np.ndarray]) -> Path:
    """Static int8 quantisation (QDQ, per-channel weights) of an exported model, calibrated on real inputs.

    Args:
        calibration: batches (N, channels, size, size) float32 prepared as the spec says (a few hundred
            training or validation images; never test images).
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, np.float32)}

    import onnx

    metadata = {p.key: p.value for p in onnx.load(str(source)).metadata_props}
    with atomic_path(target) as temporary:
        quant_pre_process(str(source), str(temporary), skip_symbolic_shape=True)
        quantize_static(str(temporary), str(temporary), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        graph = onnx.load(str(temporary))
        del graph.metadata_props[:]
        for key, value in metadata.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.save(graph, str(temporary))
    return Path(target)


def beside(spec: InferenceSpec, folder: Path) -> InferenceSpec:
    """The spec with its pipeline's exported files (``method: onnx`` steps: the lung U-Net, stored by bare
    file name) found in ``folder``, where they were exported beside the model.

    Raises:
        WeightsError: a stored name that is a path (the artefact's files stay in its folder).
    """
    steps = []
    for step in spec.input.pipeline["steps"]:
        if step.get("method") == "onnx" and step.get("model"):
            name = str(step["model"])
            if Path(name).name != name:
                raise WeightsError(f"pipeline step {step.get('name')} names {name!r}: an exported file must lie "
                                   "beside the model (a bare file name)")
            step = {**step, "model": str(folder / name)}
        steps.append(step)
    return spec.with_pipeline_steps(steps)


class OnnxModel:
    """An exported model on onnxruntime (all graph optimisations; ``threads`` intra-op threads).

    Attributes:
        spec: the inference spec stored in the file.
        meta: the checkpoint metadata stored in the file (name, build options, training provenance).
        path: the file.

    Raises:
        WeightsError: not an ONNX file onnxruntime can load, or one without lungscreen metadata.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime

        self.path = Path(path)
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own unexported exception types
            raise WeightsError(f"{self.path}: not an ONNX model onnxruntime can load ({error})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        if metadata.get(FORMAT_KEY) != ONNX_FORMAT or SPEC_KEY not in metadata:
            raise WeightsError(f"{self.path}: an ONNX model without lungscreen metadata; export one with "
                               "`lungscreen export RUN --onnx OUT.onnx`")
        self.spec = beside(InferenceSpec.parse(json.loads(metadata[SPEC_KEY]), f"{self.path}: inference spec"),
                           self.path.parent)
        self.meta: dict[str, Any] = json.loads(metadata.get(META_KEY, "{}"))
        self.output_names = [output.name for output in self.session.get_outputs()]

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Logits per head for a batch (N, channels, size, size) float32."""
        outputs = self.session.run(self.output_names, {INPUT_NAME: np.ascontiguousarray(images, np.float32)})
        return dict(zip(self.output_names, outputs, strict=True))
