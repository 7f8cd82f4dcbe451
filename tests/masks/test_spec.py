"""MaskSpec: one source per mask, numbers checked and normalised; MaskError is a UserError."""

from __future__ import annotations

import pytest

from diffstyler.errors import UserError
from diffstyler.masks import MaskError, MaskSpec


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of file, text, box, points (got: none)"),
        ({"file": "a.png", "text": "dog"}, "(got: file, text)"),
        ({"box": [1, 2, 3]}, "4 numbers"),
        ({"box": [10, 0, 5, 8]}, "x0 < x1 and y0 < y1"),
        ({"box": [0, 8, 5, 8]}, "x0 < x1 and y0 < y1"),
        ({"points": [[1, 2], [3, 4]], "point_labels": [1]}, "point_labels has 1 entries but there are 2 points"),
        ({"points": [[1, 2]], "point_labels": [2]}, "1 (positive) or 0 (negative)"),
        ({"points": [[1, 2, 3]]}, "each point must be [x, y]"),
        ({"text": "  "}, "text prompt is empty"),
        ({"file": "a.png", "feather": -1}, "feather must be"),
    ],
)
def test_mask_spec_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError) as info:
        MaskSpec(**kwargs)
    assert message in str(info.value)


def test_mask_spec_normalises_numbers():
    spec = MaskSpec(box=[1, 2, 30, 40.5])
    assert spec.box == [1.0, 2.0, 30.0, 40.5]
    assert spec.describe() == "box [1.0, 2.0, 30.0, 40.5]"
    assert MaskSpec(points=[[3, 4]]).describe() == "points [[3.0, 4.0]] (labels [1])"


def test_mask_error_is_a_one_line_user_error_naming_the_source():
    """Catches MaskError left a bare ValueError: the command would not print it as its one line
    `what (where): why`."""
    error = MaskError("empty mask", "mask file 'a.png'", "no pixel would be styled")
    assert isinstance(error, UserError) and isinstance(error, ValueError)
    assert str(error) == "empty mask (mask file 'a.png'): no pixel would be styled"
