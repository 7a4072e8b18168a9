"""The one image reader every part of lungscreen uses.

PNG/JPEG (8 or 16 bit; gray, RGB, RGBA, palette, CMYK; EXIF-rotated) and DICOM (MONOCHROME1 inverted,
rescale slope/intercept, VOI LUT or window) all come out the same way: a float32 grayscale array in
[0, 1] plus the size of the image as stored. Anything unreadable raises :class:`ImageReadError` whose
message names the file and the reason, so a batch job can report it and go on.

Example:
    >>> image = read_image("chest.png")            # doctest: +SKIP
    >>> image.pixels.dtype, image.pixels.max() <= 1.0
    (dtype('float32'), True)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lungscreen.errors import ImageReadError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image

#: Smallest side we accept: below this there is no chest to screen.
MIN_SIDE = 16
#: Largest image we decode (pixels); a full-field detector is about 4300 x 4300 = 18.5 M.
MAX_PIXELS = 100_000_000
#: Extensions read as DICOM even without the "DICM" preamble.
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
#: Extensions a folder scan treats as images.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"} | DICOM_SUFFIXES


@dataclass(frozen=True)
class ChestImage:
    """A decoded image.

    Attributes:
        pixels: float32 array (height, width), values in [0, 1], 1 = white (dense tissue on a CXR).
        width: width of the image as stored in the file.
        height: height of the image as stored in the file.
    """

    pixels: np.ndarray
    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), PIL's order."""
        return self.width, self.height


def is_dicom(path: Path) -> bool:
    """True when the file has a DICOM suffix or the "DICM" magic at byte 128."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path: str | Path) -> ChestImage:
    """Read a chest image file into a float32 grayscale array in [0, 1].

    Args:
        path: a PNG, JPEG, BMP, TIFF or DICOM file.

    Returns:
        The decoded image and its stored size.

    Raises:
        ImageReadError: missing, empty, truncated, not an image, absurd size, DICOM without pixel data or
            without a codec for its compression.
    """
    path = Path(path)
    _check_file(path)
    pixels = _read_dicom(path) if is_dicom(path) else _read_raster(path)
    height, width = pixels.shape
    return ChestImage(pixels=pixels, width=width, height=height)


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a lung mask as a boolean array, optionally resized (nearest neighbour) to ``size``.

    A pixel is lung where the mask is brighter than mid-grey, so the v7labs "Ignore" value (127) counts as
    background; a mask stored as 0/1 (no value above 1) is lung wherever it is 1.

    Args:
        path: mask image file.
        size: (width, height) of the image the mask belongs to; None keeps the stored size.
    """
    path = Path(path)
    _check_file(path)
    with _open_raster(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("1", "L", "P", "RGB", "RGBA", "LA"):
            image = image.convert("L")
        if size is not None and image.size != tuple(size):
            image = image.resize(tuple(size), Image.NEAREST)
        raw = np.asarray(image)
    if raw.size and raw.max() <= 1:
        return raw > 0
    return _to_unit_range(raw) > 0.5


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageReadError(path, "no such file")
    if not path.is_file():
        raise ImageReadError(path, "not a file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")


def _open_raster(path: Path) -> Image.Image:
    """Open with PIL, turning its many exception types into one of ours with a clear reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            _check_size(path, *image.size)
            image.load()
            return image
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (unknown format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageReadError(path, "absurd size (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError) as error:
        text = str(error)
        if "truncated" in text or "broken data stream" in text or "unrecognized data stream" in text:
            raise ImageReadError(path, f"truncated or corrupt file ({text})") from None
        raise ImageReadError(path, f"cannot decode: {text}") from None


def _check_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageReadError(path, f"absurd size {width}x{height} (limit {MAX_PIXELS:,} pixels)")
    if min(width, height) < MIN_SIDE:
        raise ImageReadError(path, f"too small {width}x{height} (each side must be >= {MIN_SIDE} px)")


def _read_raster(path: Path) -> np.ndarray:
    with _open_raster(path) as image:
        image = ImageOps.exif_transpose(image)
        return _to_unit_range(np.asarray(_to_gray(image)))


def _to_gray(image: Image.Image) -> Image.Image:
    """Any PIL mode to a single band, keeping 16-bit depth where the file has it."""
    if image.mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels carry no exposure: composite onto black, the X-ray background.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    return image.convert("RGB").convert("L")  # palette, CMYK, YCbCr, 1-bit, RGB


def _to_unit_range(values: np.ndarray) -> np.ndarray:
    """Scale by the dtype's range (not per image: a dark film stays dark; equalization comes later)."""
    if values.dtype == np.bool_:
        return values.astype(np.float32)
    if values.dtype == np.uint8:
        return values.astype(np.float32) / 255.0
    if values.dtype.kind in "ui" and values.dtype.itemsize == 2:
        return values.astype(np.float32) / 65535.0
    values = values.astype(np.float32)
    if values.size and values.max() > 255:  # 32-bit "I" images holding 16-bit data
        return np.clip(values / 65535.0, 0.0, 1.0)
    if values.size and values.max() > 1:
        return np.clip(values / 255.0, 0.0, 1.0)
    return np.clip(values, 0.0, 1.0)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(path)
    except InvalidDicomError:
        raise ImageReadError(path, "not a DICOM file") from None
    except (OSError, EOFError, ValueError, KeyError) as error:
        raise ImageReadError(path, f"truncated or corrupt DICOM ({error})") from None
    if "PixelData" not in dataset:
        raise ImageReadError(path, "DICOM has no pixel data")
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    _check_size(path, columns, rows)
    try:
        values = dataset.pixel_array
    except (RuntimeError, NotImplementedError) as error:
        raise ImageReadError(path, _decode_failure(dataset, error)) from None
    except (ValueError, EOFError) as error:
        raise ImageReadError(path, f"truncated or corrupt DICOM pixel data ({error})") from None
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(path, f"multi-frame DICOM ({frames} frames); pass one slice per file")
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if values.ndim == 3:  # RGB or YBR colour DICOM (secondary captures)
        from pydicom.pixels import convert_color_space

        if photometric.startswith("YBR"):
            values = convert_color_space(values, photometric, "RGB")
        values = values[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return _stretch(values)
    values = apply_modality_lut(values, dataset)
    values = apply_voi_lut(values, dataset) if _has_voi(dataset) else values
    values = _stretch(np.asarray(values, dtype=np.float32))
    return 1.0 - values if photometric == "MONOCHROME1" else values


def _decode_failure(dataset, error: Exception) -> str:
    """Say whether a codec is missing (and which to install) or the compressed data are corrupt."""
    syntax = getattr(dataset.file_meta, "TransferSyntaxUID", None)
    name = getattr(syntax, "name", str(syntax))
    text = str(error)
    if "missing dependencies" in text or "no plugins" in text.lower() or "not available" in text:
        return (f"compressed DICOM ({name}) and no codec installed to decode it: "
                "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
    return f"compressed DICOM ({name}) could not be decoded: {text.splitlines()[-1].strip()}"


def _has_voi(dataset) -> bool:
    return "VOILUTSequence" in dataset or ("WindowCenter" in dataset and "WindowWidth" in dataset)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Map the DICOM output range onto [0, 1] (its values are detector units, not display levels)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)
