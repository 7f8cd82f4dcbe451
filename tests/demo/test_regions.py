"""The click canvas: how much a photo is enlarged, where a click lands on the photo, where the
canvas marks it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffstyler.demo.regions import MARK_COLOURS, POINTS, canvas, canvas_scale, photo_pixel
from diffstyler.errors import UserError


@pytest.mark.parametrize(("size", "scale"), [((64, 48), 8), ((48, 64), 8), ((100, 30), 5), ((300, 200), 1), ((1024, 768), 1)])
def test_a_small_photo_is_enlarged_by_a_whole_factor_up_to_the_canvas_side(size, scale):
    """Caught: a photo shown at its own size (a 64-pixel photo a few millimetres wide), a factor
    taken from the shorter side, or a fractional factor (pixels of uneven sizes)."""
    assert canvas_scale(size) == scale


@pytest.mark.parametrize(("size", "index", "pixel"), [
    ((64, 48), [0, 0], (0, 0)),
    ((64, 48), [7, 7], (0, 0)),
    ((64, 48), [8, 0], (1, 0)),
    ((64, 48), [415, 247], (51, 30)),
    ((64, 48), [511, 383], (63, 47)),
    ((1024, 768), [700, 300], (700, 300)),
    ((1024, 768), [700.9, 300.2], (700, 300)),
])
def test_a_click_on_the_canvas_is_the_photo_pixel_under_it(size, index, pixel):
    """Caught: the canvas's pixel taken for the photo's (off by the factor), a pixel rounded to
    the nearest instead of the one under the click, x and y swapped."""
    assert photo_pixel(index, size, "canvas") == pixel


@pytest.mark.parametrize("index", [[512, 0], [0, 384], [-1, 5], [float("nan"), 3], [1e300, 2], [3], "3,4", None, [True, 2]])
def test_a_click_outside_the_canvas_is_refused_naming_it(index):
    """Caught: a click a script sends (an index outside the canvas, NaN, not a pair) turned into a
    point outside the photo, or failing later with a traceback."""
    with pytest.raises(UserError) as error:
        photo_pixel(index, (64, 48), "Style 1 › canvas")
    assert error.value.line().startswith("click outside the photo (Style 1 › canvas): a click is a pixel [x, y] of the 512x384 canvas, got ")


def test_the_canvas_marks_a_click_in_the_middle_of_its_photo_pixel():
    """Caught: the mark drawn at the photo's coordinates on the enlarged canvas (at 1/8 of the
    place), or at the corner of the photo pixel instead of its middle."""
    photo = Image.new("RGB", (64, 48), (200, 200, 200))
    shown = canvas(photo, None, [[51, 30, 1], [16, 16, 0]], POINTS)
    assert shown.size == (512, 384)
    for label, (x, y) in ((1, (51, 30)), (0, (16, 16))):
        rows, columns = np.nonzero(np.all(np.asarray(shown) == MARK_COLOURS[label], axis=-1))
        assert (columns.mean(), rows.mean()) == pytest.approx((8 * x + 3.5, 8 * y + 3.5), abs=0.5)
