"""Reading images and masks, and writing files safely."""

from lungscreen.io.files import atomic_path, iter_image_files, write_atomic
from lungscreen.io.images import (
    ChestImage,
    ImageMeta,
    MaskLayers,
    read_frames,
    read_image,
    read_mask,
    read_mask_layers,
)

__all__ = [
    "ChestImage",
    "ImageMeta",
    "MaskLayers",
    "atomic_path",
    "iter_image_files",
    "read_frames",
    "read_image",
    "read_mask",
    "read_mask_layers",
    "write_atomic",
]
