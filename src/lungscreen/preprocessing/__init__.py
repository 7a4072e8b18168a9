"""Preprocessing that removes dataset bias: intensity steps, lung masking, crops, named pipelines, a cache.

Example:
    >>> from lungscreen.preprocessing import get_pipeline
    >>> pipeline = get_pipeline("tartaglione")                           # doctest: +SKIP
    >>> pixels = pipeline(read_image("chest.png").pixels)                 # doctest: +SKIP

See :mod:`lungscreen.preprocessing.pipelines` for the named chains and how a checkpoint carries one, and
:mod:`lungscreen.preprocessing.cache` for ``preprocess_manifest`` / ``preprocess_file``.
"""

from lungscreen.preprocessing import ct  # noqa: F401  (registers the CT steps)
from lungscreen.preprocessing.cache import (
    PreprocessCache,
    PreprocessResult,
    preprocess_file,
    preprocess_manifest,
    read_sample,
    run_file,
)
from lungscreen.preprocessing.pipelines import (
    PIPELINES,
    Pipeline,
    get_pipeline,
    list_pipelines,
    load_pipeline,
)
from lungscreen.preprocessing.transforms import (
    LUNGS,
    REFERENCE,
    PreprocessingError,
    Sample,
    Transform,
    list_transforms,
    register_transform,
    transform_from_dict,
)

__all__ = [
    "LUNGS",
    "PIPELINES",
    "REFERENCE",
    "Pipeline",
    "PreprocessCache",
    "PreprocessResult",
    "PreprocessingError",
    "Sample",
    "Transform",
    "get_pipeline",
    "list_pipelines",
    "list_transforms",
    "load_pipeline",
    "preprocess_manifest",
    "preprocess_file",
    "register_transform",
    "read_sample",
    "run_file",
    "transform_from_dict",
]
