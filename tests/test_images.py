"""The image reader: every supported kind of file, and every kind of bad one with its specific reason."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, SecondaryCaptureImageStorage, generate_uid

from lungscreen.errors import ImageReadError
from lungscreen.io import read_image, read_mask
from lungscreen.io.files import atomic_path, iter_image_files, write_atomic


def gradient(width: int = 64, height: int = 48) -> np.ndarray:
    """uint8 horizontal gradient, so orientation and scaling are checkable."""
    return np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))


def save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def expect_error(path: Path, reason_fragment: str) -> ImageReadError:
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert str(path) in str(caught.value), "the message must name the file"
    assert reason_fragment in caught.value.reason, caught.value.reason
    return caught.value


# ----- readable inputs -------------------------------------------------------------------------------

def test_gray_png_8bit(tmp_path: Path) -> None:
    image = read_image(save(Image.fromarray(gradient()), tmp_path / "a.png"))
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (48, 64)
    assert image.size == (64, 48)
    assert image.pixels[0, 0] == 0.0 and image.pixels[0, -1] == 1.0


def test_png_16bit_keeps_depth(tmp_path: Path) -> None:
    values = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    values[0, 1] = 257  # a 16-bit level with no 8-bit equivalent below 1/255
    image = read_image(save(Image.fromarray(values), tmp_path / "a16.png"))
    assert image.pixels.max() == pytest.approx(1.0)
    assert image.pixels[0, 1] == pytest.approx(257 / 65535, abs=1e-7)


def test_rgb_jpeg_to_gray(tmp_path: Path) -> None:
    rgb = np.stack([gradient()] * 3, axis=-1)
    image = read_image(save(Image.fromarray(rgb), tmp_path / "a.jpg", quality=95))
    assert image.pixels.ndim == 2
    assert abs(float(image.pixels[:, -1].mean()) - 1.0) < 0.03


def test_rgba_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, :16, 3] = 255  # left half opaque white, right half transparent white
    image = read_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert image.pixels[:, :16].min() == 1.0 and image.pixels[:, 16:].max() == 0.0


def test_gray_alpha(tmp_path: Path) -> None:
    image = read_image(save(Image.fromarray(gradient()).convert("LA"), tmp_path / "la.png"))
    assert image.pixels.shape == (48, 64)


def test_palette_png(tmp_path: Path) -> None:
    palette = Image.fromarray(gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image = read_image(save(palette, tmp_path / "p.png"))
    assert image.pixels.shape == (48, 64) and image.pixels[0, -1] > 0.9


def test_one_bit_png(tmp_path: Path) -> None:
    image = read_image(save(Image.fromarray(gradient() > 128), tmp_path / "bw.png"))
    assert set(np.unique(image.pixels)) <= {0.0, 1.0}


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = Image.fromarray(np.stack([gradient()] * 3, axis=-1)).convert("CMYK")
    image = read_image(save(cmyk, tmp_path / "cmyk.jpg", quality=95))
    assert image.pixels.shape == (48, 64)
    assert image.pixels[:, -1].mean() > image.pixels[:, 0].mean() + 0.5


def test_exif_rotation_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(gradient(64, 32)).save(path, exif=exif.tobytes(), quality=95)
    image = read_image(path)
    assert image.pixels.shape == (64, 32)
    assert image.pixels[0].mean() < image.pixels[-1].mean()  # the gradient now runs top to bottom


def test_tiff_16bit_and_bmp(tmp_path: Path) -> None:
    values = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (20, 1))
    assert read_image(save(Image.fromarray(values), tmp_path / "a.tif")).pixels.max() == pytest.approx(1.0)
    assert read_image(save(Image.fromarray(gradient()), tmp_path / "a.bmp")).pixels.shape == (48, 64)


def dicom(path: Path, pixels: np.ndarray | None, **attributes) -> Path:
    """Write a minimal, valid DICOM file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = attributes.pop("transfer_syntax", ExplicitVRLittleEndian)
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    if pixels is not None:
        dataset.Rows, dataset.Columns = pixels.shape[:2]
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated = 16
        dataset.BitsStored = 12
        dataset.HighBit = 11
        dataset.PixelRepresentation = 0
        dataset.PixelData = pixels.astype(np.uint16).tobytes()
    for key, value in attributes.items():
        setattr(dataset, key, value)
    dataset.save_as(path, enforce_file_format=True)
    return path


def ramp12() -> np.ndarray:
    return np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (32, 1))


def test_dicom_monochrome2(tmp_path: Path) -> None:
    image = read_image(dicom(tmp_path / "a.dcm", ramp12()))
    assert image.pixels[0, 0] == 0.0 and image.pixels[0, -1] == 1.0


def test_dicom_monochrome1_inverted(tmp_path: Path) -> None:
    image = read_image(dicom(tmp_path / "m1.dcm", ramp12(), PhotometricInterpretation="MONOCHROME1"))
    assert image.pixels[0, 0] == 1.0 and image.pixels[0, -1] == 0.0


def test_dicom_window_applied(tmp_path: Path) -> None:
    # Window 1000..2000 (centre 1500, width 1000): everything below is black, above white.
    image = read_image(dicom(tmp_path / "w.dcm", ramp12(), WindowCenter=1500, WindowWidth=1000))
    columns = np.linspace(0, 4095, 64)
    assert np.all(image.pixels[0, columns < 950] == 0.0)
    assert np.all(image.pixels[0, columns > 2050] == 1.0)
    assert 0.0 < image.pixels[0, np.argmin(abs(columns - 1500))] < 1.0


def test_dicom_rescale_slope_intercept(tmp_path: Path) -> None:
    # A CT-like rescale: HU = 2 * raw - 1024; with a lung window the ordering must survive.
    image = read_image(dicom(tmp_path / "ct.dcm", ramp12(), RescaleSlope=2, RescaleIntercept=-1024,
                             WindowCenter=-600, WindowWidth=1500))
    assert image.pixels[0, 0] == 0.0 and image.pixels[0, -1] == 1.0
    assert np.all(np.diff(image.pixels[0]) >= 0)


def test_real_rsna_dicom(shared_data: Path) -> None:
    path = next((shared_data / "dicom").glob("*.dcm"))
    image = read_image(path)
    assert image.size == (1024, 1024)
    assert 0.2 < float(image.pixels.mean()) < 0.8


def test_dicom_detected_by_magic_without_suffix(tmp_path: Path) -> None:
    path = dicom(tmp_path / "a.dcm", ramp12())
    renamed = path.rename(tmp_path / "IMG0001")
    assert read_image(renamed).size == (64, 32)


# ----- bad inputs: each with its own clear reason --------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.png", "no such file")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    expect_error(tmp_path, "not a file")


def test_zero_bytes(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    expect_error(path, "empty file")


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("patient notes, not an image\n")
    expect_error(path, "not an image")


def test_truncated_png(tmp_path: Path) -> None:
    path = save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256), np.uint8)), tmp_path / "t.png")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_error(path, "truncated")


def test_truncated_jpeg(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (256, 256), np.uint8)
    path = save(Image.fromarray(noise), tmp_path / "t.jpg", quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_error(path, "truncated")


def test_png_header_only(tmp_path: Path) -> None:
    path = save(Image.fromarray(gradient()), tmp_path / "h.png")
    path.write_bytes(path.read_bytes()[:40])
    expect_error(path, "")


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims a size; the (tiny) pixel stream does not matter for the size check."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_absurd_size(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(png_with_size(200_000, 200_000))
    expect_error(path, "absurd size")


def test_one_by_one(tmp_path: Path) -> None:
    expect_error(save(Image.new("L", (1, 1)), tmp_path / "dot.png"), "too small")


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    expect_error(dicom(tmp_path / "nopix.dcm", None), "no pixel data")


def compressed_dicom(path: Path, syntax: str, stream: bytes) -> Path:
    from pydicom.encaps import encapsulate

    dicom(path, ramp12())
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.PixelData = encapsulate([stream])
    dataset["PixelData"].is_undefined_length = True
    dataset.save_as(path)
    return path


def test_compressed_jpeg_ls_dicom_names_the_codec_or_the_broken_stream(tmp_path: Path) -> None:
    # Without a JPEG-LS decoder (pylibjpeg, pyjpegls, gdcm) the reason says what to install; with one (highdicom,
    # the PACS layer's dependency, brings pyjpegls) a broken stream is named as such.
    import importlib.util

    path = compressed_dicom(tmp_path / "jls.dcm", JPEGLSLossless, b"\xff\xd8\xff\xf7" + b"\x00" * 64)
    if any(importlib.util.find_spec(name) for name in ("jpeg_ls", "libjpeg", "gdcm")):
        error = expect_error(path, "could not be decoded")
    else:
        error = expect_error(path, "no codec installed")
        assert "pip install" in error.reason
    assert "JPEG-LS" in error.reason


def test_compressed_dicom_corrupt_stream(tmp_path: Path) -> None:
    # Pillow decodes JPEG 2000, so here the codec exists and the data are what is wrong.
    path = compressed_dicom(tmp_path / "j2k.dcm", JPEG2000Lossless, b"\xff\x4f\xff\x51" + b"\x00" * 64)
    error = expect_error(path, "could not be decoded")
    assert "JPEG 2000" in error.reason


def test_text_file_named_dcm(tmp_path: Path) -> None:
    path = tmp_path / "fake.dcm"
    path.write_text("not a dicom at all")
    expect_error(path, "DICOM")


def test_truncated_dicom(tmp_path: Path) -> None:
    path = dicom(tmp_path / "cut.dcm", ramp12())
    path.write_bytes(path.read_bytes()[:-1000])
    expect_error(path, "DICOM")


def test_multiframe_dicom_refused(tmp_path: Path) -> None:
    frames = np.stack([ramp12()] * 3)
    path = tmp_path / "mf.dcm"
    dicom(path, frames[0])
    dataset = pydicom.dcmread(path)
    dataset.NumberOfFrames = 3
    dataset.PixelData = frames.tobytes()
    dataset.save_as(path)
    expect_error(path, "multi-frame")


# ----- masks, folders, atomic writes ---------------------------------------------------------------

def test_read_mask_binarizes_and_resizes(tmp_path: Path) -> None:
    values = np.zeros((20, 40), np.uint8)
    values[:, :10] = 127  # v7labs "Ignore" is not lung
    values[:, 20:] = 255
    mask = read_mask(save(Image.fromarray(values), tmp_path / "m.png"), size=(80, 40))
    assert mask.shape == (40, 80) and mask.dtype == bool
    assert not mask[:, :39].any() and mask[:, 41:].all()


def test_read_mask_zero_one_values(tmp_path: Path) -> None:
    values = np.zeros((20, 20), np.uint8)
    values[5:15, 5:15] = 1
    mask = read_mask(save(Image.fromarray(values), tmp_path / "01.png"))
    assert mask.sum() == 100


def test_iter_image_files_recursive(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.png", "a/b/y.JPG", "a/b/notes.txt", "z.dcm"):
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_image_files(tmp_path)]
    assert found == ["a/b/y.JPG", "a/x.png", "z.dcm"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    target.write_text("old\n")

    def failing(path: Path) -> None:
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, failing)
    assert target.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [target], "no temporary file may remain"
    with atomic_path(target) as temporary:
        temporary.write_text("new\n")
    assert target.read_text() == "new\n"
    assert target.stat().st_mode & 0o044, "outputs are readable by others (umask permitting), not private temp files"


def test_image_bytes_in_memory_roundtrip(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(gradient()).save(buffer, format="PNG")
    path = tmp_path / "from-bytes.png"
    path.write_bytes(buffer.getvalue())
    assert read_image(path).size == (64, 48)
