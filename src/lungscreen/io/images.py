"""The one image reader every part of lungscreen uses, and the one lung-mask reader.

PNG/JPEG (8 or 16 bit; gray, RGB, RGBA, palette, CMYK; EXIF-rotated) and DICOM (MONOCHROME1 inverted,
rescale slope/intercept, VOI LUT or window, one frame at a time) all come out the same way: a float32
grayscale array in [0, 1] plus :class:`ImageMeta` (format, size, bit depth and, for DICOM, the study, series
and instance UIDs a PACS needs to file a result). A source is a path, the bytes of a file, or a binary file
object (an upload), decoded the same way. Anything unreadable raises :class:`ImageReadError` whose message
names the source and the reason, so a batch job can report it and go on.

Example:
    >>> image = read_image("chest.png")            # doctest: +SKIP
    >>> image.pixels.dtype, image.pixels.max() <= 1.0, image.meta.format
    (dtype('float32'), True, 'PNG')
    >>> read_image(upload.file, name=upload.filename)   # doctest: +SKIP
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lungscreen.errors import ImageReadError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image

#: What :func:`read_image` reads: a file path, a file's bytes, or a binary file object.
ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO

#: Smallest side we accept: below this there is no chest to screen.
MIN_SIDE = 16
#: Largest image (or DICOM frame) we decode (pixels); a full-field detector is about 4300 x 4300 = 18.5 M.
MAX_PIXELS = 100_000_000
#: Extensions read as DICOM even without the "DICM" preamble.
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
#: Extensions a folder scan treats as images.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"} | DICOM_SUFFIXES

#: Mask grey levels (in [0, 1]): above this is lung; from IGNORE_FROM up to it is v7labs' 127 "Ignore".
LUNG_ABOVE = 0.65
IGNORE_FROM = 0.35
#: Aspect ratios of mask and image may differ by this share (rounding in downscaled copies), no more.
ASPECT_TOLERANCE = 0.03

#: Bits per sample of the Pillow modes that are not 8 bits.
_MODE_BITS = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}


@dataclass(frozen=True)
class ImageMeta:
    """What the file says about the image besides its pixels.

    The DICOM identifiers let a later PACS integration write results back into the same study; patient
    names and IDs are deliberately not kept, so results and logs never carry them.

    Attributes:
        name: what messages call the image (its path, the name given, or "<bytes>" / "<stream>").
        format: "PNG", "JPEG", "TIFF", "BMP", "DICOM", ... (Pillow's name for rasters).
        width: width at full resolution (after EXIF orientation), as in ``pixels``.
        height: height at full resolution (after EXIF orientation), as in ``pixels``.
        bit_depth: bits per sample as stored (DICOM: BitsStored; rasters: of the decoded band).
        frames: frames in the file (1 for rasters).
        frame: index of the frame read; None for a single-frame file.
        modality, view_position, photometric_interpretation, study_instance_uid, series_instance_uid,
            sop_instance_uid, sop_class_uid: DICOM tags; None when absent or not DICOM.
    """

    name: str
    format: str
    width: int
    height: int
    bit_depth: int
    frames: int = 1
    frame: int | None = None
    modality: str | None = None
    view_position: str | None = None
    photometric_interpretation: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None

    def as_dict(self) -> dict[str, str | int | None]:
        """Plain JSON types, for reports and result files."""
        return asdict(self)


@dataclass(frozen=True)
class ChestImage:
    """A decoded image.

    Attributes:
        pixels: float32 array (height, width), values in [0, 1], 1 = white (dense tissue on a CXR).
        meta: format, size, bit depth and DICOM identifiers.
    """

    pixels: np.ndarray
    meta: ImageMeta

    @property
    def width(self) -> int:
        return self.meta.width

    @property
    def height(self) -> int:
        return self.meta.height

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), PIL's order."""
        return self.meta.width, self.meta.height


@dataclass(frozen=True)
class MaskLayers:
    """A reference lung mask: ``lung``, and ``ignore`` where the truth is unknown (both bool (H, W)).

    v7labs paints devices and markup over the lungs as "Ignore" (grey 127): those pixels count neither as
    lung nor as background in a loss or in Dice.
    """

    lung: np.ndarray
    ignore: np.ndarray


def read_image(source: ImageSource, *, name: str | None = None, frame: int | None = None) -> ChestImage:
    """Read a chest image into a float32 grayscale array in [0, 1] with its metadata.

    Args:
        source: a PNG, JPEG, BMP, TIFF or DICOM file, as a path, its bytes, or a binary file object
            (read from its current position to the end).
        name: what messages and metadata call the image; also a DICOM suffix here marks DICOM.
        frame: the frame of a multi-frame DICOM to read; None or 0 for a single-frame file.

    Raises:
        ImageReadError: missing, empty, truncated, not an image, absurd size, DICOM without pixel data or
            without a codec for its compression, a multi-frame DICOM without ``frame`` (a screening tool
            must not silently pick one slice), a frame index out of range.
    """
    with _opened(source, name) as (label, handle):
        if _looks_like_dicom(handle, label):
            return _read_dicom(handle, label, frame)[0]
        _frame_index(label, 1, frame)
        return _read_raster(handle, label)


def read_frames(source: ImageSource, *, name: str | None = None) -> list[ChestImage]:
    """Every frame of an image, each scaled on its own (a raster or single-frame DICOM gives one).

    Raises:
        ImageReadError: as :func:`read_image`.
    """
    with _opened(source, name) as (label, handle):
        if _looks_like_dicom(handle, label):
            return _read_dicom(handle, label, frame=None, every_frame=True)
        return [_read_raster(handle, label)]


def read_mask_layers(source: ImageSource, shape: tuple[int, int] | None = None, *,
                     name: str | None = None) -> MaskLayers:
    """Read a lung mask and align it with an image of ``shape`` (height, width).

    Grey levels: bright (> 0.65) is lung, mid-grey (0.35-0.65, v7labs' 127 "Ignore") is unknown, dark is
    background; a mask stored as 0/1 is read as 0/max. Both layers are resized with nearest neighbour (the
    viral-pneumonia masks are 256 px for 299 px images), but a mask of another aspect ratio is refused.

    Args:
        source: the mask file, as for :func:`read_image`.
        shape: (height, width) of the image the mask belongs to; None keeps the mask's size.
        name: what messages call the mask.

    Raises:
        ImageReadError: unreadable file, or an aspect ratio unlike the image's (the mask of another picture).
    """
    image = read_image(source, name=name)
    values = _mask_levels(image)
    if shape is None:
        shape = values.shape
    else:
        _check_aspect(image.meta.name, image.size, shape)
    lung = values > LUNG_ABOVE
    ignore = (values >= IGNORE_FROM) & ~lung
    return MaskLayers(_resize_nearest(lung, shape), _resize_nearest(ignore, shape))


def read_mask(source: ImageSource, size: tuple[int, int] | None = None, *, name: str | None = None) -> np.ndarray:
    """The ``lung`` layer of :func:`read_mask_layers`, resized (nearest neighbour) to ``size``.

    ``size`` is a target (width, height), not checked against the mask's aspect ratio: training stretches
    images to squares and their masks with them. To align a mask with its own image, use
    :func:`read_mask_layers` with the image's shape, which refuses the mask of another picture.
    """
    lung = read_mask_layers(source, name=name).lung
    return lung if size is None else _resize_nearest(lung, (size[1], size[0]))


def is_dicom(path: str | Path) -> bool:
    """True when the file has a DICOM suffix or the "DICM" magic at byte 128."""
    try:
        with Path(path).open("rb") as handle:
            return _looks_like_dicom(handle, str(path))
    except OSError:
        return Path(path).suffix.lower() in DICOM_SUFFIXES


# ----- sources ---------------------------------------------------------------------------------------

@contextmanager
def _opened(source: ImageSource, name: str | None) -> Iterator[tuple[str, BinaryIO]]:
    """Yield the source's name and a binary file at its start; a file object is read whole, so it may be
    any stream (seekable or not, at any position) and decoding never depends on what it is."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(path)
        _check_file(path, label)
        try:
            handle = path.open("rb")
        except OSError as error:
            raise ImageReadError(label, f"cannot open ({error.strerror or error})") from None
        with handle:
            yield label, handle
        return
    if isinstance(source, (bytes, bytearray, memoryview)):
        label, data = name or "<bytes>", source
    elif callable(getattr(source, "read", None)):
        own = getattr(source, "name", None)
        label = name or (own if isinstance(own, str) and own else "<stream>")
        data = source.read()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageReadError(label, "file object opened in text mode; open it in binary mode ('rb')")
    else:
        raise TypeError(f"an image source is a path, bytes or a binary file object, not {type(source).__name__}")
    if memoryview(data).nbytes == 0:
        raise ImageReadError(label, "empty file (0 bytes)")
    yield label, io.BytesIO(data)


def _check_file(path: Path, name: str) -> None:
    if not path.exists():
        raise ImageReadError(name, "no such file")
    if not path.is_file():
        raise ImageReadError(name, "not a file")
    if path.stat().st_size == 0:
        raise ImageReadError(name, "empty file (0 bytes)")


def _looks_like_dicom(handle: BinaryIO, name: str) -> bool:
    """A DICOM suffix on the name or the file's path, or the "DICM" magic at byte 128 (files renamed
    without a suffix)."""
    names = (name, getattr(handle, "name", None))
    if any(isinstance(text, str) and Path(text).suffix.lower() in DICOM_SUFFIXES for text in names):
        return True
    handle.seek(128)
    magic = handle.read(4)
    handle.seek(0)
    return magic == b"DICM"


def _frame_index(name: str, count: int, frame: int | None) -> int:
    """The frame to read: ``frame`` if in range; with None only for a single-frame file."""
    if frame is None:
        if count > 1:
            raise ImageReadError(name, f"multi-frame DICOM ({count} frames): pass frame=INDEX (0 to {count - 1}) "
                                       "to read one, or use read_frames for all")
        return 0
    if not 0 <= frame < count:
        has = "1 frame (index 0)" if count == 1 else f"{count} frames (0 to {count - 1})"
        raise ImageReadError(name, f"no frame {frame}: the file has {has}")
    return frame


def _check_size(name: str, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageReadError(name, f"absurd size {width}x{height} (limit {MAX_PIXELS:,} pixels)")
    if min(width, height) < MIN_SIDE:
        raise ImageReadError(name, f"too small {width}x{height} (each side must be >= {MIN_SIDE} px)")


# ----- DICOM -----------------------------------------------------------------------------------------

def _read_dicom(handle: BinaryIO, name: str, frame: int | None, *,
                every_frame: bool = False) -> list[ChestImage]:
    """Frame ``frame`` (or every frame) of a DICOM file, with the file's metadata on each."""
    from lungscreen.io import dicom  # pydicom is imported only when a DICOM shows up

    dataset = dicom.load(handle, name)
    width, height = dicom.size(dataset)
    _check_size(name, width, height)
    count = dicom.frame_count(dataset)
    indices = range(count) if every_frame else [_frame_index(name, count, frame)]
    fields = dicom.describe(dataset)
    return [ChestImage(dicom.frame_pixels(dataset, name, index),
                       ImageMeta(name=name, format="DICOM", width=width, height=height, frames=count,
                                 frame=index if count > 1 else None, **fields))
            for index in indices]


# ----- rasters ---------------------------------------------------------------------------------------

def _read_raster(handle: BinaryIO, name: str) -> ChestImage:
    with _open_raster(handle, name) as image:
        meta_format, bit_depth = image.format or "unknown", _bit_depth(image)
        pixels = _to_unit_range(np.asarray(_to_gray(ImageOps.exif_transpose(image))))
    height, width = pixels.shape
    return ChestImage(pixels, ImageMeta(name=name, format=meta_format, width=width, height=height,
                                        bit_depth=bit_depth))


def _open_raster(handle: BinaryIO, name: str) -> Image.Image:
    """Open with PIL, turning its many exception types into one of ours with a clear reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(handle)
            _check_size(name, *image.size)
            image.load()
            return image
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(name, "not an image (unknown format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageReadError(name, "absurd size (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError) as error:
        text = str(error)
        if "truncated" in text or "broken data stream" in text or "unrecognized data stream" in text:
            raise ImageReadError(name, f"truncated or corrupt file ({text})") from None
        raise ImageReadError(name, f"cannot decode: {text}") from None


def _bit_depth(image: Image.Image) -> int:
    """Bits per sample of the band lungscreen reads (Pillow widens 16-bit colour PNGs to 8-bit RGB)."""
    if image.mode == "I" and image.format == "PNG":
        return 16  # older Pillow opens 16-bit gray PNGs as 32-bit "I"; PNG has no 32-bit samples
    return _MODE_BITS.get(image.mode, 8)


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


# ----- masks -----------------------------------------------------------------------------------------

def _mask_levels(image: ChestImage) -> np.ndarray:
    """The mask's grey levels in [0, 1]; a mask stored as 0/1 (at any bit depth) scaled to 0/1.0."""
    levels = 2.0 ** image.meta.bit_depth - 1
    if 0 < image.pixels.max() <= 1.5 / levels:
        return image.pixels * np.float32(levels)
    return image.pixels


def _check_aspect(name: str, mask_size: tuple[int, int], shape: tuple[int, int]) -> None:
    (mask_w, mask_h), (height, width) = mask_size, shape
    if abs((mask_w / mask_h) / (width / height) - 1) > ASPECT_TOLERANCE:
        raise ImageReadError(name, f"mask of size {mask_w}x{mask_h} does not fit an image of size {width}x{height} "
                                   "(another aspect ratio: the mask of another picture?)")


def _resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``shape`` (height, width)."""
    height, width = shape
    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
