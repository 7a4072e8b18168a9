"""DICOM decoding for :mod:`lungscreen.io.images`: one dataset, its frames, and the tags worth keeping.

Pixels go through the modality LUT (rescale slope/intercept), then the VOI LUT or window when the file has
one, are stretched onto [0, 1] and inverted for MONOCHROME1, so every frame looks like a radiograph shown
by a viewer. The tags kept are the ones a PACS needs to file a result into the same study; patient names
and IDs are never read into lungscreen's metadata.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

from lungscreen.errors import ImageReadError

#: ImageMeta field -> DICOM keyword, for the text tags kept in the metadata.
TEXT_TAGS = {
    "modality": "Modality",
    "view_position": "ViewPosition",
    "photometric_interpretation": "PhotometricInterpretation",
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "sop_class_uid": "SOPClassUID",
}
#: ITU-R BT.601 luma weights, for the odd colour DICOM (secondary captures).
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def load(handle: BinaryIO, name: str) -> Dataset:
    """Parse a DICOM file that has pixel data (not decoded yet: frames are decoded one at a time)."""
    try:
        dataset = pydicom.dcmread(handle)
    except InvalidDicomError:
        raise ImageReadError(name, "not a DICOM file") from None
    except (OSError, EOFError, ValueError, KeyError) as error:
        raise ImageReadError(name, f"truncated or corrupt DICOM ({error})") from None
    if "PixelData" not in dataset:
        raise ImageReadError(name, "DICOM has no pixel data")
    return dataset


def size(dataset: Dataset) -> tuple[int, int]:
    """(width, height) of each frame as the header states it, to check before decoding anything."""
    return int(dataset.get("Columns", 0) or 0), int(dataset.get("Rows", 0) or 0)


def frame_count(dataset: Dataset) -> int:
    return int(dataset.get("NumberOfFrames", 1) or 1)


def describe(dataset: Dataset) -> dict[str, int | str | None]:
    """Bit depth and the identifying tags, None where a tag is absent or empty (never an exception)."""
    fields: dict[str, int | str | None] = {key: _text(dataset, keyword) for key, keyword in TEXT_TAGS.items()}
    fields["bit_depth"] = int(dataset.get("BitsStored") or dataset.get("BitsAllocated") or 8)
    return fields


def frame_pixels(dataset: Dataset, name: str, index: int) -> np.ndarray:
    """Frame ``index`` as float32 (height, width) in [0, 1], scaled on its own, 1 = white."""
    try:
        values = pixel_array(dataset, index=index)  # colour (YBR too) comes out as RGB
    except (RuntimeError, NotImplementedError) as error:
        raise ImageReadError(name, _decode_failure(dataset, error)) from None
    except (ValueError, EOFError) as error:
        raise ImageReadError(name, f"truncated or corrupt DICOM pixel data ({error})") from None
    if values.ndim == 3:
        return _stretch(values[..., :3].astype(np.float32) @ LUMA)
    values = apply_modality_lut(values, dataset)
    if _has_voi(dataset):
        values = apply_voi_lut(values, dataset)
    values = _stretch(np.asarray(values, dtype=np.float32))
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    return 1.0 - values if photometric == "MONOCHROME1" else values


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    text = "" if value is None else str(value).strip()
    return text or None


def _decode_failure(dataset: Dataset, error: Exception) -> str:
    """Say whether a codec is missing (and which to install) or the compressed data are corrupt."""
    syntax = getattr(dataset.file_meta, "TransferSyntaxUID", None)
    name = getattr(syntax, "name", str(syntax))
    text = str(error)
    if "missing dependencies" in text or "no plugins" in text.lower() or "not available" in text:
        return (f"compressed DICOM ({name}) and no codec installed to decode it: "
                "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
    return f"compressed DICOM ({name}) could not be decoded: {text.splitlines()[-1].strip()}"


def _has_voi(dataset: Dataset) -> bool:
    return "VOILUTSequence" in dataset or ("WindowCenter" in dataset and "WindowWidth" in dataset)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Map the DICOM output range onto [0, 1] (its values are detector units, not display levels)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)
