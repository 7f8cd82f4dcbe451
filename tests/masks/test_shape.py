"""Mask files and in-memory mask images to a hard mask; invert, grow, feather, emptiness; the
latent-grid rule; saving."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffstyler.errors import UserError
from diffstyler.masks import (
    MaskError,
    MaskSpec,
    hard_mask_from_image,
    load_mask_file,
    mask_to_latent,
    resolve_mask,
    save_mask_png,
    shape_mask,
)
from tests.masks.fixtures import content, no_segmenter, square_mask_file, write_png

# --------------------------------------------------------------------------------------------
# Mask files
# --------------------------------------------------------------------------------------------


def test_rgb_file_any_nonzero_channel_is_region(tmp_path):
    pixels = np.zeros((48, 80, 3), np.uint8)
    pixels[5:15, 10:30] = (255, 0, 0)
    pixels[40, 70] = (0, 0, 1)  # very dark: luminance rounds it to 0, but it is nonzero
    mask = load_mask_file(write_png(tmp_path / "rgb.png", pixels), (80, 48))
    assert mask.dtype == torch.bool and mask.shape == (48, 80)
    assert int(mask.sum()) == 10 * 20 + 1
    assert bool(mask[40, 70]) and bool(mask[5, 10]) and not bool(mask[15, 10])


def test_grayscale_file(tmp_path):
    pixels = np.zeros((48, 80), np.uint8)
    pixels[0:4, 0:80] = 7
    mask = load_mask_file(write_png(tmp_path / "gray.png", pixels), (80, 48))
    assert mask.shape == (48, 80)
    assert int(mask.sum()) == 4 * 80
    assert bool(mask[:4].all()) and not bool(mask[4:].any())


def test_file_of_another_size_is_resized_nearest(tmp_path):
    small = np.zeros((24, 40), np.uint8)
    small[5:10, 10:20] = 255
    mask = load_mask_file(write_png(tmp_path / "half.png", small), (80, 48))
    expected = torch.zeros(48, 80, dtype=torch.bool)
    expected[10:20, 20:40] = True
    assert torch.equal(mask, expected)


def test_rgba_with_used_alpha_follows_alpha(tmp_path):
    pixels = np.full((16, 16, 4), 255, np.uint8)  # white everywhere ...
    pixels[..., 3] = 0  # ... but transparent
    pixels[4:8, 4:12] = (0, 0, 0, 255)  # an opaque black cut-out
    mask = load_mask_file(write_png(tmp_path / "cutout.png", pixels), (16, 16))
    assert int(mask.sum()) == 4 * 8 and bool(mask[4:8, 4:12].all())


def test_rgba_fully_opaque_follows_colour(tmp_path):
    pixels = np.zeros((16, 16, 4), np.uint8)
    pixels[..., 3] = 255
    pixels[0:2, :, 0] = 200
    mask = load_mask_file(write_png(tmp_path / "opaque.png", pixels), (16, 16))
    assert int(mask.sum()) == 2 * 16


def test_missing_and_non_image_files_raise_mask_error_naming_the_file(tmp_path):
    missing = tmp_path / "nowhere.png"
    with pytest.raises(MaskError) as info:
        load_mask_file(missing, (8, 8))
    assert (info.value.what, info.value.where) == ("file not found", f"mask file '{missing}'")
    text_file = tmp_path / "notes.png"
    text_file.write_text("this is not an image")
    with pytest.raises(MaskError) as info:
        load_mask_file(text_file, (8, 8))
    assert (info.value.what, info.value.where) == ("not a readable image", f"mask file '{text_file}'")
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# In-memory mask images: the rules of mask files
# --------------------------------------------------------------------------------------------


def _scene(channels: int) -> np.ndarray:
    """24 x 40 uint8 pixels ([H, W] when channels is 0) where each rule matters: a very dark
    colour, and (with alpha) a transparent white background around an opaque black cut-out."""
    shape = (24, 40) if channels == 0 else (24, 40, channels)
    pixels = np.zeros(shape, np.uint8)
    pixels[2:9, 3:15] = 200
    pixels[20, 35] = 1
    if channels in (2, 4):
        pixels[..., :-1] = 255
        pixels[..., -1] = 0
        pixels[10:20, 20:30] = 0
        pixels[10:20, 20:30, -1] = 255
    return pixels


def _bool_scene() -> np.ndarray:
    return _scene(0) > 0


def _sixteen_bit_scene() -> np.ndarray:
    pixels = _scene(0).astype(np.uint16) * 300  # above 255: clipped, not scaled, by 8-bit conversions
    pixels[20, 35] = 1
    return pixels


IN_MEMORY_MASKS = {
    # name: (the mask as the API gets it, the same pixels as a numpy image to save as PNG)
    "grey uint8 [H, W]": (_scene(0), _scene(0)),
    "grey uint8 [H, W, 1]": (_scene(0)[..., None], _scene(0)),
    "grey + alpha [H, W, 2]": (_scene(2), _scene(2)),
    "RGB uint8": (_scene(3), _scene(3)),
    "RGBA uint8, alpha used": (_scene(4), _scene(4)),
    "bool [H, W]": (_bool_scene(), _bool_scene()),
    "bool [H, W, 3]": (np.repeat(_bool_scene()[..., None], 3, axis=-1), np.repeat(_bool_scene()[..., None], 3, axis=-1).astype(np.uint8) * 255),
    "16-bit grey": (_sixteen_bit_scene(), _sixteen_bit_scene()),
    "PIL RGBA": (Image.fromarray(_scene(4)), _scene(4)),
    "torch bool [H, W]": (torch.from_numpy(_bool_scene()), _bool_scene()),
    "torch uint8 [C, H, W]": (torch.from_numpy(_scene(4)).permute(2, 0, 1), _scene(4)),
}


@pytest.mark.parametrize("kind", IN_MEMORY_MASKS)
def test_an_in_memory_mask_equals_the_same_pixels_saved_as_a_png(tmp_path, kind):
    """Catches a rule applied to files only (or to arrays only): alpha, any-channel, high-bit
    greyscale or the nearest-neighbour resize (the content is twice the mask's size)."""
    in_memory, pixels = IN_MEMORY_MASKS[kind]
    from_file = load_mask_file(write_png(tmp_path / "mask.png", pixels), (80, 48))
    mask = hard_mask_from_image(in_memory, (80, 48))
    assert mask.dtype == torch.bool and mask.shape == (48, 80)
    assert 0 < int(from_file.sum()) < 48 * 80
    assert torch.equal(mask, from_file)


def test_the_alpha_rule_decides_for_in_memory_masks_too():
    """Guards the comparison above: with alpha, only the cut-out counts (not the white background)."""
    mask = hard_mask_from_image(_scene(4), (40, 24))
    expected = torch.zeros(24, 40, dtype=torch.bool)
    expected[10:20, 20:30] = True
    assert torch.equal(mask, expected)


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.full((8, 8), 0.5, np.float32), "float32"),
        (torch.ones(8, 8), "float32"),
        (np.zeros((8, 8, 5), np.uint8), "(8, 8, 5)"),
        (torch.zeros(3, 8, 8, 1, dtype=torch.uint8), "(3, 8, 8, 1)"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), "(8, 8, 3)"),
        (np.zeros((0, 8), np.uint8), "(0, 8)"),
        ([[0, 1], [1, 0]], "list"),
    ],
)
def test_unusable_in_memory_masks_are_refused_naming_the_mask(mask, message):
    """Catches a float (soft) mask or a wrong layout silently read as some other region."""
    with pytest.raises(MaskError) as info:
        hard_mask_from_image(mask, (8, 8), "mask image 2")
    assert info.value.where == "mask image 2" and message in info.value.why


def _mask_of_width(width: int) -> np.ndarray:
    pixels = np.zeros((100, width), np.uint8)
    pixels[10:40, 10:40] = 255
    return pixels


def test_a_mask_of_another_aspect_ratio_warns_naming_the_file(tmp_path):
    """Catches an inverted or missing comparison: 2% off warns, 0.5% (a rounding) does not."""
    off_by_2_percent = write_png(tmp_path / "wide.png", _mask_of_width(204))
    with pytest.warns(UserWarning, match=r"mask file '.*wide\.png' is 204x100 .* differ by 2\.0%"):
        load_mask_file(off_by_2_percent, (200, 100))
    off_by_half_a_percent = write_png(tmp_path / "nearly.png", _mask_of_width(201))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_mask_file(off_by_half_a_percent, (200, 100))


def test_an_in_memory_mask_of_another_aspect_ratio_warns_naming_it():
    with pytest.warns(UserWarning, match=r"^mask image 3 is 196x100 "):
        hard_mask_from_image(_mask_of_width(196), (200, 100), "mask image 3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hard_mask_from_image(_mask_of_width(199), (200, 100), "mask image 3")


# --------------------------------------------------------------------------------------------
# Shaping: invert, grow, feather, emptiness
# --------------------------------------------------------------------------------------------


def test_file_mask_resolves_without_segmenter(tmp_path):
    mask = resolve_mask(MaskSpec(file=str(square_mask_file(tmp_path))), content(), no_segmenter)
    assert mask.dtype == torch.float32 and mask.shape == (64, 64)
    assert float(mask.sum()) == 100.0 and set(mask.unique().tolist()) == {0.0, 1.0}


def test_invert(tmp_path):
    mask = resolve_mask(MaskSpec(file=str(square_mask_file(tmp_path)), invert=True), content(), no_segmenter)
    assert float(mask.sum()) == 64 * 64 - 100
    assert float(mask[25, 25]) == 0.0 and float(mask[0, 0]) == 1.0


@pytest.mark.parametrize("grow, side", [(3, 16), (1, 12), (-3, 4), (-4, 2)])
def test_grow_and_shrink_a_square_exactly(tmp_path, grow, side):
    mask = resolve_mask(MaskSpec(file=str(square_mask_file(tmp_path)), grow=grow), content(), no_segmenter)
    assert float(mask.sum()) == side * side
    start = 20 - grow
    assert bool((mask[start : start + side, start : start + side] == 1).all())


def test_erosion_does_not_eat_from_the_image_border(tmp_path):
    path = square_mask_file(tmp_path, top=0, side=10)
    mask = resolve_mask(MaskSpec(file=str(path), grow=-2), content(), no_segmenter)
    assert float(mask.sum()) == 8 * 8 and float(mask[0, 0]) == 1.0


def test_grow_after_invert(tmp_path):
    # Inverting then growing the outside by 2 shrinks the hole from 10x10 to 6x6.
    spec = MaskSpec(file=str(square_mask_file(tmp_path)), invert=True, grow=2)
    assert float(resolve_mask(spec, content(), no_segmenter).sum()) == 64 * 64 - 36


def test_feather_band_and_exact_values(tmp_path):
    mask = resolve_mask(MaskSpec(file=str(square_mask_file(tmp_path)), feather=4), content(), no_segmenter)
    # Exactly 1 only where everything within 4 px is region: rows/cols 24..25 of the 20..29 square.
    assert torch.equal(mask == 1, _square(64, 24, 2))
    # Exactly 0 further than 4 px outside: nonzero only on rows/cols 16..33.
    assert torch.equal(mask > 0, _square(64, 16, 18))
    band = (mask > 0) & (mask < 1)
    assert int(band.sum()) == 18 * 18 - 4
    # The corner pixel sees 5x5 region pixels of its 9x9 window.
    assert float(mask[20, 20]) == pytest.approx(25 / 81, abs=1e-7)
    assert float(mask[24, 20]) == pytest.approx(45 / 81, abs=1e-7)


def test_feather_keeps_a_region_at_the_image_edge_fully_on(tmp_path):
    path = square_mask_file(tmp_path, top=0, side=10)
    mask = resolve_mask(MaskSpec(file=str(path), feather=3), content(), no_segmenter)
    assert float(mask[0, 0]) == 1.0 and float(mask[6, 6]) == 1.0 and float(mask[7, 7]) < 1.0


def _square(size: int, start: int, side: int) -> torch.Tensor:
    grid = torch.zeros(size, size, dtype=torch.bool)
    grid[start : start + side, start : start + side] = True
    return grid


def test_empty_masks_raise_naming_the_source(tmp_path):
    black = write_png(tmp_path / "black.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(MaskError, match=r"^empty mask \(mask file '.*black\.png'\): no pixel would be styled$"):
        resolve_mask(MaskSpec(file=str(black)), content((8, 8)), no_segmenter)
    white = write_png(tmp_path / "white.png", np.full((8, 8), 255, np.uint8))
    with pytest.raises(MaskError, match=r"white\.png'\): no pixel would be styled after invert$"):
        resolve_mask(MaskSpec(file=str(white), invert=True), content((8, 8)), no_segmenter)
    with pytest.raises(MaskError, match=r"square\.png'\): no pixel would be styled after grow=-5$"):
        resolve_mask(MaskSpec(file=str(square_mask_file(tmp_path)), grow=-5), content(), no_segmenter)


def test_shape_mask_shapes_an_in_memory_mask_as_resolve_mask_shapes_a_file(tmp_path):
    """The API's path (hard mask from an array, then shape_mask) and the config's path
    (resolve_mask of a file) give the same soft mask."""
    pixels = np.zeros((64, 64), np.uint8)
    pixels[20:30, 20:30] = 255
    path = write_png(tmp_path / "square.png", pixels)
    from_file = resolve_mask(MaskSpec(file=str(path), invert=True, grow=2, feather=3), content(), no_segmenter)
    hard = hard_mask_from_image(pixels, (64, 64), "mask image 0")
    assert torch.equal(shape_mask(hard, "mask image 0", invert=True, grow=2, feather=3), from_file)


def test_shape_mask_names_the_in_memory_mask_and_checks_its_numbers():
    """Catches the API's unchecked numbers reaching the box blur (a negative feather gives nonsense)."""
    with pytest.raises(MaskError, match=r"^empty mask \(mask image 1\)"):
        shape_mask(torch.zeros(8, 8, dtype=torch.bool), "mask image 1")
    with pytest.raises(ValueError, match="feather must be"):
        shape_mask(torch.ones(8, 8, dtype=torch.bool), "mask image 1", feather=-2)
    with pytest.raises(ValueError, match="grow must be"):
        shape_mask(torch.ones(8, 8, dtype=torch.bool), "mask image 1", grow=1.5)


# --------------------------------------------------------------------------------------------
# Latent grid and saving
# --------------------------------------------------------------------------------------------


def test_mask_to_latent_non_square_any_pixel_rule():
    mask = torch.zeros(64, 96)  # H=64, W=96 -> latent 8 x 12
    mask[10:30, 17:40] = 1.0
    mask[63, 95] = 1e-30  # one faint pixel still claims its whole cell
    latent = mask_to_latent(mask, (8, 12))
    expected = torch.zeros(8, 12)
    expected[1:4, 2:5] = 1.0  # rows 8..31 and cols 16..39 hold the rectangle's pixels
    expected[7, 11] = 1.0
    assert latent.dtype == torch.float32
    assert torch.equal(latent, expected)


def test_mask_to_latent_covers_feathered_band(tmp_path):
    mask = resolve_mask(MaskSpec(file=str(square_mask_file(tmp_path)), feather=4), content(), no_segmenter)
    latent = mask_to_latent(mask, (8, 8))
    expected = torch.zeros(8, 8)
    expected[2:5, 2:5] = 1.0  # nonzero pixels 16..33 touch cells 2, 3, 4
    assert torch.equal(latent, expected)


def test_mask_to_latent_rejects_bad_shapes():
    with pytest.raises(ValueError, match="positive"):
        mask_to_latent(torch.ones(16, 16), (0, 2))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        mask_to_latent(torch.ones(1, 16, 16), (2, 2))


def test_save_mask_png_roundtrip_atomically(tmp_path):
    mask = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.25, 0.0]])
    target = tmp_path / "out" / "mask.png"
    save_mask_png(mask, target)
    save_mask_png(mask.flip(1), target)  # overwrite in place
    with Image.open(target) as saved:
        assert saved.mode == "L"
        assert np.asarray(saved).tolist() == [[255, 128, 0], [0, 64, 255]]
    assert sorted(p.name for p in target.parent.iterdir()) == ["mask.png"]  # no temp file left
