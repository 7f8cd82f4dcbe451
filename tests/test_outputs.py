import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from diffstyler.errors import UserError
from diffstyler.masks import save_mask_png
from diffstyler.outputs import (
    atomic_save,
    format_parameters,
    image_grid,
    parse_parameters,
    path_inside,
    pil_to_unit,
    read_parameters,
    read_settings,
    save_result,
    to_pil,
)


def test_parameters_round_trip_with_awkward_values():
    settings = {"Steps": 50, "CFG scale": 10.5, "Seed": 123, "Model": "sd2-community/x", "Styles": [{"a": 1, "b": "x, y"}], "Note": 'say "hi": now'}
    text = format_parameters("painting of sss | photo", "ugly, blurry", settings)
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "painting of sss | photo"
    assert parsed["Negative prompt"] == "ugly, blurry"
    assert parsed["Steps"] == "50" and parsed["CFG scale"] == "10.5" and parsed["Seed"] == "123"
    assert parsed["Model"] == "sd2-community/x"
    assert parsed["Note"] == 'say "hi": now'
    assert parsed["Styles"] == '[{"a": 1, "b": "x, y"}]'


def test_saved_png_carries_both_chunks(tmp_path):
    image = Image.new("RGB", (16, 8), (10, 20, 30))
    path = save_result(image, tmp_path / "out.png", "p", "n", {"Seed": 5, "Nested": {"k": [1, 2]}})
    assert read_settings(path) == {"prompt": "p", "negative_prompt": "n", "Seed": 5, "Nested": {"k": [1, 2]}}
    assert read_parameters(path)["Seed"] == "5"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left


def test_atomic_save_keeps_the_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "out.png"
    atomic_save(Image.new("RGB", (4, 4), (1, 2, 3)), path)
    before = path.read_bytes()

    class Broken:
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    try:
        atomic_save(Broken(), path)
    except OSError:
        pass
    else:
        raise AssertionError("the broken save should have raised")
    assert path.read_bytes() == before


def test_pixel_conversions_are_exact_on_8_bit_values():
    image = Image.fromarray((torch.arange(48, dtype=torch.uint8).view(4, 4, 3) * 5).numpy())
    assert np.array_equal(np.array(to_pil(pil_to_unit(image))), np.array(image))


def test_grid_scales_tiles_to_one_height():
    grid = image_grid([Image.new("RGB", (64, 48)), Image.new("RGB", (32, 32))], height=48)
    assert grid.height == 48 + 4
    assert grid.width == 2 * 64 + 3 * 2


AWKWARD_PROMPTS = [
    "two\nlines",
    "a prompt\nNegative prompt: not the negative one",
    "Negative prompt: at the start",
    '"quoted", with commas, and: colons',
    'ends with a quote"',
    "windows\r\nline end",
    "a literal backslash-n \\n and \\( brackets \\)",
    "",
    "  spaces around  ",
]


@pytest.mark.parametrize("prompt", AWKWARD_PROMPTS)
def test_parameters_round_trip_for_any_prompt_and_negative_prompt(prompt):
    """Mistake caught: splitting the text at its first two newlines (a multi-line prompt breaks it)."""
    settings = {"Steps": 6, "Seed": 1}
    for text in (format_parameters(prompt, "ugly, blurry", settings), format_parameters("p", prompt, settings)):
        parsed = parse_parameters(text)
        assert parsed["Steps"] == "6" and parsed["Seed"] == "1"
    assert parse_parameters(format_parameters(prompt, "n", settings))["prompt"] == prompt
    assert parse_parameters(format_parameters("p", prompt, settings))["Negative prompt"] == prompt


def test_a_one_line_prompt_is_written_as_is_for_other_tools():
    text = format_parameters("painting of sss, \\(detail\\)", "ugly", {"Steps": 6})
    assert text == "painting of sss, \\(detail\\)\nNegative prompt: ugly\nSteps: 6"


def test_written_files_get_the_usual_permissions(tmp_path):
    """Mistake caught: NamedTemporaryFile / mkstemp temporaries (0600) renamed into place."""
    old_umask = os.umask(0o022)
    try:
        png = atomic_save(Image.new("RGB", (4, 4)), tmp_path / "result.png")
        mask = tmp_path / "mask.png"
        save_mask_png(torch.ones(4, 4), mask)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(png.stat().st_mode) == 0o644
    assert stat.S_IMODE(mask.stat().st_mode) == 0o644


def test_a_255_byte_file_name_fits_its_temporary_name(tmp_path):
    """Mistake caught: temporary names built from the target's stem (over the 255-byte name limit)."""
    stem = "c" * 245  # + "_grid.png" is 254 bytes, a legal name
    png = atomic_save(Image.new("RGB", (4, 4)), tmp_path / f"{stem}_grid.png")
    mask = tmp_path / f"{stem}_m0.png"
    save_mask_png(torch.ones(4, 4), mask)
    assert png.is_file() and mask.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([png.name, mask.name])


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    class Broken:
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save(Broken(), tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../x.png", "a/../../x.png", "/etc/x.png", "..", "."])
def test_a_target_outside_the_output_folder_is_refused(tmp_path, name):
    folder = tmp_path / "out"
    with pytest.raises(UserError, match="outside the output folder"):
        path_inside(folder, name, "model.output.folder")
    assert path_inside(folder, "x.png", "model.output.folder") == (folder / "x.png").resolve()
