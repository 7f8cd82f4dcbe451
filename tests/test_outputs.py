import numpy as np
import torch
from PIL import Image

from diffstyler.outputs import (
    atomic_save,
    format_parameters,
    image_grid,
    parse_parameters,
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
