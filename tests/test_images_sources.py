"""The image reader's sources (paths, bytes, file objects), metadata, multi-frame DICOM and mask layers."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from test_images import dicom, gradient, ramp12, save

from lungscreen.errors import ImageReadError
from lungscreen.io import ImageMeta, MaskLayers, iter_image_files, read_frames, read_image, read_mask, read_mask_layers

RSNA = "dicom/c64d5667-a776-4f95-9e21-bfabafb07740.dcm"


def other_meta(meta: ImageMeta) -> dict:
    """The metadata without the name (which depends on the kind of source)."""
    return {k: v for k, v in meta.as_dict().items() if k != "name"}


def assert_same_image(a, b) -> None:
    assert np.array_equal(a.pixels, b.pixels)
    assert other_meta(a.meta) == other_meta(b.meta)


# ----- every kind of source decodes the same ---------------------------------------------------------

def png8(folder: Path) -> Path:
    return save(Image.fromarray(gradient()), folder / "g8.png")


def png16(folder: Path) -> Path:
    return save(Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))), folder / "g16.png")


def jpeg(folder: Path) -> Path:
    return save(Image.fromarray(np.stack([gradient()] * 3, axis=-1)), folder / "c.jpg", quality=90)


def palette(folder: Path) -> Path:
    image = Image.fromarray(gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return save(image, folder / "p.png")


def dicom_file(folder: Path) -> Path:
    return dicom(folder / "d.dcm", ramp12(), PhotometricInterpretation="MONOCHROME1", WindowCenter=2000,
                 WindowWidth=3000)


def dicom_without_suffix(folder: Path) -> Path:
    return dicom(folder / "d.dcm", ramp12()).rename(folder / "IMG0001")


SOURCES: dict[str, Callable[[Path], object]] = {
    "bytes": lambda path: path.read_bytes(),
    "bytearray": lambda path: bytearray(path.read_bytes()),
    "memoryview": lambda path: memoryview(path.read_bytes()),
    "BytesIO": lambda path: io.BytesIO(path.read_bytes()),
    "str path": str,
}


@pytest.mark.parametrize("make", [png8, png16, jpeg, palette, dicom_file, dicom_without_suffix])
@pytest.mark.parametrize("kind", SOURCES)
def test_every_source_reads_like_the_path(tmp_path: Path, make, kind: str) -> None:
    path = make(tmp_path)
    assert_same_image(read_image(SOURCES[kind](path)), read_image(path))


@pytest.mark.parametrize("make", [png8, png16, jpeg, palette, dicom_file, dicom_without_suffix])
def test_open_file_handle_reads_like_the_path(tmp_path: Path, make) -> None:
    path = make(tmp_path)
    with path.open("rb") as handle:
        image = read_image(handle)
    assert_same_image(image, read_image(path))
    assert image.meta.name == str(path), "a file object is called by its own name"


def test_stream_is_read_from_its_position(tmp_path: Path) -> None:
    path = png8(tmp_path)
    stream = io.BytesIO(b"header before the image" + path.read_bytes())
    stream.seek(len(b"header before the image"))
    assert_same_image(read_image(stream, name="upload.png"), read_image(path))


def test_names(tmp_path: Path) -> None:
    path = png8(tmp_path)
    assert read_image(path).meta.name == str(path)
    assert read_image(path.read_bytes()).meta.name == "<bytes>"
    assert read_image(path.read_bytes(), name="upload.png").meta.name == "upload.png"
    assert read_image(io.BytesIO(path.read_bytes())).meta.name == "<stream>"


@pytest.mark.shared_data
def test_real_files_as_bytes(shared_data: Path) -> None:
    """Bytes of real files from every folder (every format in it) decode exactly like their paths."""
    sample = [shared_data / RSNA]
    for folder in sorted(p for p in shared_data.iterdir() if p.is_dir() and p.name != "dicom"):
        files = list(iter_image_files(folder))
        if not files:
            continue
        firsts = {f.suffix.lower(): f for f in reversed(files)}.values()  # the first file of each suffix
        spread = files[:: max(1, len(files) // 3)][:3]
        sample += sorted(set(spread) | set(firsts))
    assert len(sample) >= 20 and len({p.relative_to(shared_data).parts[0] for p in sample}) >= 8
    for path in sample:
        from_bytes, from_path = read_image(path.read_bytes()), read_image(path)
        assert_same_image(from_bytes, from_path)
        assert from_bytes.meta.name == "<bytes>"


@pytest.mark.shared_data
def test_rsna_dicom_metadata(shared_data: Path) -> None:
    path = shared_data / RSNA
    truth = pydicom.dcmread(path, stop_before_pixels=True)
    meta = read_image(path.read_bytes(), name=path.name).meta
    assert meta.format == "DICOM" and meta.name == path.name
    assert (meta.width, meta.height, meta.frames, meta.frame) == (1024, 1024, 1, None)
    assert meta.study_instance_uid == truth.StudyInstanceUID
    assert meta.series_instance_uid == truth.SeriesInstanceUID
    assert meta.sop_instance_uid == truth.SOPInstanceUID
    assert meta.sop_class_uid == truth.SOPClassUID
    assert (meta.modality, meta.view_position) == ("CR", "AP")
    assert meta.bit_depth == truth.BitsStored == 8
    assert meta.photometric_interpretation == "MONOCHROME2"
    text = json.dumps(other_meta(meta))  # (the RSNA file is named by its patient ID, so leave the name out)
    assert str(truth.PatientID) not in text, "no patient identifier in the metadata"


# ----- metadata --------------------------------------------------------------------------------------

def test_raster_metadata(tmp_path: Path) -> None:
    eight, sixteen = read_image(png8(tmp_path)).meta, read_image(png16(tmp_path)).meta
    assert (eight.format, eight.bit_depth, eight.width, eight.height) == ("PNG", 8, 64, 48)
    assert (sixteen.format, sixteen.bit_depth) == ("PNG", 16)
    assert read_image(jpeg(tmp_path)).meta.format == "JPEG"
    assert read_image(save(Image.fromarray(gradient() > 128), tmp_path / "bw.png")).meta.bit_depth == 1
    assert (eight.frames, eight.frame, eight.modality, eight.study_instance_uid) == (1, None, None, None)
    assert json.loads(json.dumps(eight.as_dict())) == eight.as_dict()


def test_dicom_metadata_absent_tags_are_none(tmp_path: Path) -> None:
    path = dicom(tmp_path / "a.dcm", ramp12(), PatientName="Doe^Jane", PatientID="PID-12345")
    truth = pydicom.dcmread(path)
    meta = read_image(path).meta
    assert (meta.format, meta.modality, meta.bit_depth, meta.photometric_interpretation) == ("DICOM", "CR", 12, "MONOCHROME2")
    assert meta.sop_instance_uid == truth.SOPInstanceUID and meta.sop_class_uid == truth.SOPClassUID
    assert meta.view_position is None and meta.study_instance_uid is None and meta.series_instance_uid is None
    text = json.dumps(meta.as_dict())
    assert "Doe" not in text and "PID-12345" not in text


def test_exif_rotated_size_is_the_displayed_one(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(gradient(64, 32)).save(path, exif=exif.tobytes(), quality=95)
    image = read_image(path)
    assert image.size == (32, 64) == (image.meta.width, image.meta.height)
    assert image.pixels.shape == (64, 32)


# ----- multi-frame DICOM -----------------------------------------------------------------------------

def frames16() -> np.ndarray:
    """Three 16-bit frames: a horizontal ramp, a vertical ramp, and a dim horizontal ramp (0..100)."""
    horizontal = np.tile(np.linspace(0, 65535, 64), (32, 1))
    vertical = np.tile(np.linspace(0, 65535, 32)[:, None], (1, 64))
    return np.stack([horizontal, vertical, horizontal * 100 / 65535]).round().astype(np.uint16)


def multiframe(path: Path, frames: np.ndarray, **attributes) -> Path:
    return dicom(path, frames[0], NumberOfFrames=len(frames), PixelData=frames.tobytes(), BitsStored=16, HighBit=15,
                 **attributes)


def stretched(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return ((values - values.min()) / (values.max() - values.min())).astype(np.float32)


@pytest.mark.parametrize("rescale", [{}, {"RescaleSlope": 2, "RescaleIntercept": -1024}])
def test_multiframe_frames_each_scaled_on_its_own(tmp_path: Path, rescale: dict) -> None:
    raw = frames16()
    path = multiframe(tmp_path / "mf.dcm", raw, **rescale)
    images = read_frames(path)
    assert len(images) == 3
    for index, image in enumerate(images):
        assert (image.meta.frame, image.meta.frames, image.meta.bit_depth) == (index, 3, 16)
        np.testing.assert_allclose(image.pixels, stretched(raw[index]), atol=1e-6)
        assert_same_image(read_image(path, frame=index), image)
        assert_same_image(read_image(path.read_bytes(), frame=index), image)
    assert images[2].pixels.max() == 1.0, "the dim frame is stretched on its own, not by the file's range"


def test_multiframe_monochrome1_inverted(tmp_path: Path) -> None:
    raw = frames16()
    two = read_frames(multiframe(tmp_path / "m2.dcm", raw))
    one = read_frames(multiframe(tmp_path / "m1.dcm", raw, PhotometricInterpretation="MONOCHROME1"))
    for first, second in zip(one, two, strict=True):
        np.testing.assert_allclose(first.pixels, 1.0 - second.pixels, atol=1e-6)
    assert one[1].meta.photometric_interpretation == "MONOCHROME1"


def test_multiframe_needs_a_frame(tmp_path: Path) -> None:
    path = multiframe(tmp_path / "mf.dcm", frames16())
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert "3 frames" in caught.value.reason and "frame=" in caught.value.reason
    assert "read_frames" in caught.value.reason and str(path) in str(caught.value)
    for bad in (3, -1):
        with pytest.raises(ImageReadError, match="3 frames"):
            read_image(path, frame=bad)


def test_single_frame_files_accept_frame_zero(tmp_path: Path) -> None:
    for path in (dicom(tmp_path / "a.dcm", ramp12()), png8(tmp_path)):
        assert_same_image(read_image(path, frame=0), read_image(path))
        [only] = read_frames(path)
        assert_same_image(only, read_image(path))
        assert (only.meta.frames, only.meta.frame) == (1, None)
        with pytest.raises(ImageReadError, match="1 frame"):
            read_image(path, frame=1)


# ----- errors name the source ------------------------------------------------------------------------

@pytest.mark.parametrize("source", [b"", bytearray(), memoryview(b""), io.BytesIO()])
def test_empty_sources(source) -> None:
    with pytest.raises(ImageReadError) as caught:
        read_image(source, name="upload.png")
    assert caught.value.reason == "empty file (0 bytes)" and "upload.png" in str(caught.value)


def test_garbage_bytes() -> None:
    with pytest.raises(ImageReadError, match="^<bytes>: not an image"):
        read_image(b"patient notes, not an image\n" * 10)
    with pytest.raises(ImageReadError, match="^scan.png: not an image"):
        read_image(b"patient notes, not an image\n" * 10, name="scan.png")
    with pytest.raises(ImageReadError, match="^scan.dcm: not a DICOM file"):  # the name's suffix says DICOM
        read_image(b"patient notes, not an image\n" * 10, name="scan.dcm")


def test_dicom_suffix_of_the_path_counts_under_another_name(tmp_path: Path) -> None:
    path = tmp_path / "fake.dcm"
    path.write_text("not a dicom at all")
    with pytest.raises(ImageReadError, match="^upload: not a DICOM file"):
        read_image(path, name="upload")


def test_truncated_bytes(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (256, 256), np.uint8)
    data = save(Image.fromarray(noise), tmp_path / "t.png").read_bytes()
    with pytest.raises(ImageReadError, match="^upload.png: truncated"):
        read_image(data[: len(data) // 2], name="upload.png")


def test_text_mode_file_and_unknown_source(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("text")
    with path.open() as handle, pytest.raises(ImageReadError, match="binary mode"):
        read_image(handle)
    with pytest.raises(TypeError):
        read_image(42)  # type: ignore[arg-type]


# ----- masks -----------------------------------------------------------------------------------------

def mask_file(path: Path, values: np.ndarray) -> Path:
    return save(Image.fromarray(values), path)


def test_mask_layers_levels(tmp_path: Path) -> None:
    values = np.zeros((20, 30), np.uint8)
    values[:, 10:20] = 127  # v7labs "Ignore"
    values[:, 20:] = 255
    layers = read_mask_layers(mask_file(tmp_path / "m.png", values))
    assert isinstance(layers, MaskLayers) and layers.lung.dtype == bool and layers.ignore.dtype == bool
    assert layers.lung[:, 20:].all() and not layers.lung[:, :20].any()
    assert layers.ignore[:, 10:20].all() and not layers.ignore[:, :10].any() and not layers.ignore[:, 20:].any()
    assert np.array_equal(read_mask(tmp_path / "m.png"), layers.lung)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_zero_one_masks(tmp_path: Path, dtype) -> None:
    values = np.zeros((20, 20), dtype)
    values[5:15, 5:15] = 1
    layers = read_mask_layers(mask_file(tmp_path / "01.png", values))
    assert layers.lung.sum() == 100 and not layers.ignore.any()


def test_mask_resized_nearest_to_its_image(tmp_path: Path) -> None:
    values = np.zeros((16, 32), np.uint8)
    values[:, 16:] = 255
    values[:8, :8] = 127
    layers = read_mask_layers(mask_file(tmp_path / "m.png", values), shape=(32, 64))
    assert layers.lung.shape == layers.ignore.shape == (32, 64)
    assert layers.lung[:, 32:].all() and not layers.lung[:, :32].any()
    assert layers.ignore[:16, :16].all() and layers.ignore.sum() == 256


def test_mask_of_another_aspect_ratio_refused(tmp_path: Path) -> None:
    path = mask_file(tmp_path / "m.png", np.zeros((20, 40), np.uint8))
    with pytest.raises(ImageReadError) as caught:
        read_mask_layers(path, shape=(40, 40))
    assert caught.value.reason == ("mask of size 40x20 does not fit an image of size 40x40 "
                                   "(another aspect ratio: the mask of another picture?)")
    assert read_mask_layers(path, shape=(41, 80)).lung.shape == (41, 80), "rounding (< 3 %) is accepted"
    assert read_mask(path, size=(40, 40)).shape == (40, 40), "read_mask's size is a target: it stretches"


def test_mask_from_bytes(tmp_path: Path) -> None:
    values = np.zeros((20, 20), np.uint8)
    values[:10] = 255
    path = mask_file(tmp_path / "m.png", values)
    layers = read_mask_layers(path.read_bytes(), (40, 40), name="mask.png")
    assert np.array_equal(layers.lung, read_mask_layers(path, (40, 40)).lung)
    with pytest.raises(ImageReadError, match="^mask.png: mask of size"):
        read_mask_layers(path.read_bytes(), (20, 40), name="mask.png")


def test_colour_dicom_converted_once(tmp_path: Path) -> None:
    """pydicom already turns YBR into RGB; converting again would mix chroma into the gray levels."""
    luma = np.tile(np.linspace(60, 190, 64), (32, 1)).round().astype(np.uint8)
    ybr = np.stack([luma, np.full_like(luma, 160), np.full_like(luma, 100)], axis=-1)
    path = dicom(tmp_path / "ybr.dcm", luma, SamplesPerPixel=3, PhotometricInterpretation="YBR_FULL",
                 PlanarConfiguration=0, BitsAllocated=8, BitsStored=8, HighBit=7, PixelData=ybr.tobytes())
    image = read_image(path)
    assert image.meta.photometric_interpretation == "YBR_FULL"
    np.testing.assert_allclose(image.pixels, stretched(luma), atol=0.03)
