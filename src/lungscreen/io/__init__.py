"""Reading images and writing files safely."""

from lungscreen.io.files import atomic_path, iter_image_files, write_atomic
from lungscreen.io.images import ChestImage, read_image, read_mask

__all__ = ["ChestImage", "atomic_path", "iter_image_files", "read_image", "read_mask", "write_atomic"]
