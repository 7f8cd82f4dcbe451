"""Reading content, style and mask images: bit depth, EXIF orientation, decompression bombs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffstyler.errors import UserError
from diffstyler.images import ImageLoadError, load_image
from diffstyler.masks import MaskError, load_mask_file

MAX_PIXELS_VARIABLE = "DIFFSTYLER_MAX_IMAGE_PIXELS"  # the documented name, spelled out on purpose
EXIF_ORIENTATION = 0x0112
ROTATE_90_CLOCKWISE_TO_VIEW = 6  # EXIF: the stored pixels must be turned 90 degrees clockwise


# --------------------------------------------------------------------------------------------
# High bit depths
# --------------------------------------------------------------------------------------------

SIXTEEN_BIT_VALUES = [0, 257, 32768, 65535]
EIGHT_BIT_VALUES = [0, 1, 128, 255]  # value * 255 / 65535, rounded


def high_bit_image(mode: str, values: list) -> Image.Image:
    row = np.array([values], dtype=np.uint16)
    if mode == "I;16B":
        return Image.frombytes("I;16B", (len(values), 1), row.astype(">u2").tobytes())
    if mode == "I":
        return Image.fromarray(row.astype(np.int32))
    if mode == "F":
        return Image.fromarray(row.astype(np.float32))
    return Image.fromarray(row)  # I;16


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_high_bit_greyscale_is_scaled_to_8_bit_not_clipped(tmp_path, mode):
    path = tmp_path / "deep.tiff"  # TIFF stores all four modes as they are
    high_bit_image(mode, SIXTEEN_BIT_VALUES).save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode  # the file really holds the mode under test
    image = load_image(path)
    assert image.mode == "RGB"
    assert np.asarray(image)[0].tolist() == [[v, v, v] for v in EIGHT_BIT_VALUES]


def test_16_bit_png_is_scaled_to_8_bit(tmp_path):
    path = tmp_path / "deep.png"
    high_bit_image("I;16", SIXTEEN_BIT_VALUES).save(path)
    assert np.asarray(load_image(path))[0, :, 0].tolist() == EIGHT_BIT_VALUES


def test_float_image_in_unit_range_is_scaled_from_0_1(tmp_path):
    path = tmp_path / "unit.tiff"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(path)
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 128, 255]


# --------------------------------------------------------------------------------------------
# EXIF orientation: a mask file lines up with the content it was drawn on
# --------------------------------------------------------------------------------------------


def save_with_orientation(image: Image.Image, path: Path, orientation: int) -> Path:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    image.save(path, exif=exif)
    return path


def test_mask_file_gets_the_same_exif_orientation_as_the_content(tmp_path):
    # A 6 x 4 stored image with one marked pixel in its top-left corner; turned upright (90 degrees
    # clockwise) it is 4 x 6 with the mark in the top-right corner.
    stored = np.zeros((4, 6), np.uint8)
    stored[0, 0] = 255
    turn = ROTATE_90_CLOCKWISE_TO_VIEW
    content = save_with_orientation(Image.fromarray(stored).convert("RGB"), tmp_path / "photo.png", turn)
    mask_file = save_with_orientation(Image.fromarray(stored), tmp_path / "mask.png", turn)

    upright = load_image(content)
    assert upright.size == (4, 6)
    content_mark = np.asarray(upright)[..., 0] > 0
    mask = load_mask_file(mask_file, upright.size)
    expected = np.zeros((6, 4), bool)
    expected[0, 3] = True
    assert content_mark.tolist() == expected.tolist()
    assert torch.equal(mask, torch.from_numpy(expected))


# --------------------------------------------------------------------------------------------
# Decompression bombs
# --------------------------------------------------------------------------------------------


def image_of_pixels(tmp_path: Path, width: int, height: int) -> Path:
    path = tmp_path / f"big_{width}x{height}.png"
    Image.new("L", (width, height), 200).save(path)
    return path


@pytest.mark.parametrize(
    "size",
    [(15, 10), (30, 10)],  # Pillow only warns up to twice its limit and raises beyond it: both refused
)
def test_image_over_the_pixel_limit_is_refused_in_one_line(tmp_path, monkeypatch, size):
    monkeypatch.setenv(MAX_PIXELS_VARIABLE, "100")
    path = image_of_pixels(tmp_path, *size)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert str(path) in message and "100 pixels" in message and MAX_PIXELS_VARIABLE in message
    assert "\n" not in message


def test_raising_the_limit_lets_the_image_load(tmp_path, monkeypatch):
    path = image_of_pixels(tmp_path, 30, 10)
    monkeypatch.setenv(MAX_PIXELS_VARIABLE, "300")
    assert load_image(path).size == (30, 10)


def test_mask_file_over_the_pixel_limit_names_the_mask(tmp_path, monkeypatch):
    monkeypatch.setenv(MAX_PIXELS_VARIABLE, "100")
    path = image_of_pixels(tmp_path, 30, 10)
    with pytest.raises(MaskError, match=rf"mask file '.*big_30x10\.png'.*100 pixels.*{MAX_PIXELS_VARIABLE}"):
        load_mask_file(path, (30, 10))


@pytest.mark.parametrize("value", ["lots", "0", "-5"])
def test_a_bad_pixel_limit_names_the_variable(tmp_path, monkeypatch, value):
    monkeypatch.setenv(MAX_PIXELS_VARIABLE, value)
    with pytest.raises(UserError, match=MAX_PIXELS_VARIABLE):
        load_image(image_of_pixels(tmp_path, 4, 4))


def test_the_pixel_limit_is_ours_alone_pillows_global_is_put_back(tmp_path, monkeypatch):
    """Pillow's limit is process-wide: a read with DIFFSTYLER_MAX_IMAGE_PIXELS must not leave it changed
    for other code (it once made every later Image.open in the process refuse small images)."""
    from PIL import Image as PILImage

    from diffstyler.images import load_image

    path = tmp_path / "small.png"
    PILImage.new("RGB", (20, 20)).save(path)
    before = PILImage.MAX_IMAGE_PIXELS
    monkeypatch.setenv(MAX_PIXELS_VARIABLE, "1000")
    load_image(path)
    assert PILImage.MAX_IMAGE_PIXELS == before


def test_file_hashes_are_remembered_until_the_file_changes(tmp_path):
    """sha256_file is called per job for the content and every LoRA; a rewritten file must not keep
    its old hash (resume and the inversion cache trust it)."""
    import hashlib
    import os

    from diffstyler.images import sha256_file

    path = tmp_path / "weights.bin"
    path.write_bytes(b"first")
    assert sha256_file(path) == hashlib.sha256(b"first").hexdigest()
    path.write_bytes(b"second!")
    os.utime(path, ns=(1, 1))  # even with an old modification time, the size differs
    assert sha256_file(path) == hashlib.sha256(b"second!").hexdigest()
    path.write_bytes(b"third!!")  # same size as before
    os.utime(path, ns=(2, 2))
    assert sha256_file(path) == hashlib.sha256(b"third!!").hexdigest()
