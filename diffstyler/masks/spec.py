"""What the user asks for: one style region (`MaskSpec`), how FastSAM runs (`SegmenterConfig`),
their value checks, and `MaskError`, the error for a mask that cannot be made from what was given."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from diffstyler.errors import UserError


class MaskError(UserError):
    """A mask cannot be made from what the user gave (bad file, prompt that finds nothing, ...).

    `where` names the mask's source as `MaskSpec.describe` does (e.g. `mask file 'hair.png'`), or
    the config key (e.g. `model.segmenter.weights`).
    """


@dataclass
class MaskSpec:
    """One style region. Exactly one of `file`, `text`, `box`, `points` must be set.

    Args:
        file: a mask image; nonzero = region (any size: resized to the content, nearest neighbour).
        text: a text prompt (FastSAM's instances, the one CLIP matches best), e.g. "the dog".
        box: [x0, y0, x1, y1] in content-image pixels (FastSAM's instance of the best IoU).
        points: [x, y] pairs in content-image pixels (FastSAM's instances containing them).
        point_labels: 1 (the region contains this point) or 0 (it does not), one per point;
            default all 1.
        invert: swap region and background (applied first).
        grow: > 0 dilates, < 0 erodes the region by that many pixels.
        feather: softens the edge over that many pixels.
    """

    file: Optional[str] = None
    text: Optional[str] = None
    box: Optional[list[float]] = None
    points: Optional[list[list[float]]] = None
    point_labels: Optional[list[int]] = None
    invert: bool = False
    grow: int = 0
    feather: int = 0

    def __post_init__(self):
        given = [name for name in ("file", "text", "box", "points") if getattr(self, name) is not None]
        if len(given) != 1:
            found = ", ".join(given) if given else "none"
            raise ValueError(f"a mask needs exactly one of file, text, box, points (got: {found})")
        if self.file is not None and not str(self.file).strip():
            raise ValueError("mask file path is empty")
        if self.text is not None and not self.text.strip():
            raise ValueError("mask text prompt is empty")
        if self.box is not None:
            self.box = checked_box(self.box)
        if self.points is not None:
            self.points = checked_points(self.points)
        if self.point_labels is not None:
            if self.points is None:
                raise ValueError("point_labels were given without points")
            self.point_labels = checked_labels(self.point_labels, len(self.points))
        self.grow, self.feather = checked_grow(self.grow), checked_feather(self.feather)

    def describe(self) -> str:
        """Name the source in error messages, so the user knows which of several masks failed."""
        if self.file is not None:
            return describe_mask_file(self.file)
        if self.text is not None:
            return f"text prompt '{self.text}'"
        if self.box is not None:
            return f"box {self.box}"
        labels = self.point_labels if self.point_labels is not None else [1] * len(self.points)
        return f"points {self.points} (labels {labels})"


def describe_mask_file(path: str | os.PathLike) -> str:
    return f"mask file '{path}'"


def checked_box(box) -> list[float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"box must be [x0, y0, x1, y1] (4 numbers), got {box!r}")
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must contain 4 numbers, got {box!r}") from None
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"box {box!r} must have x0 < x1 and y0 < y1")
    return [x0, y0, x1, y1]


def check_box_inside(box, size: tuple[int, int]) -> list[float]:
    """The box, checked to lie inside an image of `size` (width, height) in pixels."""
    x0, y0, x1, y1 = checked_box(box)
    width, height = size
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise MaskError("box outside the content image", f"box {box}", f"the content image is {width}x{height} pixels")
    return [x0, y0, x1, y1]


def check_points_inside(points, labels, size: tuple[int, int]) -> tuple[list[list[float]], list[int], str]:
    """(points, labels, their description), the points checked to index pixels of an image of
    `size` (width, height): x == width is already outside (ultralytics would clamp it silently)."""
    points = checked_points(points)
    labels = checked_labels(labels, len(points)) if labels is not None else [1] * len(points)
    width, height = size
    outside = [p for p in points if not (0 <= p[0] < width and 0 <= p[1] < height)]
    source = f"points {points} (labels {labels})"
    if outside:
        raise MaskError("points outside the content image", source, f"points {outside} lie outside the {width}x{height} content image")
    return points, labels, source


def check_prompt_inside(spec: "MaskSpec", size: tuple[int, int]) -> None:
    """A box or points prompt fits an image of `size` (width, height); text and files need no size."""
    if spec.box is not None:
        check_box_inside(spec.box, size)
    elif spec.points is not None:
        check_points_inside(spec.points, spec.point_labels, size)


def checked_points(points) -> list[list[float]]:
    if not isinstance(points, (list, tuple)) or not points:
        raise ValueError(f"points must be a non-empty list of [x, y] pairs, got {points!r}")
    checked = []
    for point in points:
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            raise ValueError(f"each point must be [x, y], got {point!r} in {points!r}")
        try:
            checked.append([float(point[0]), float(point[1])])
        except (TypeError, ValueError):
            raise ValueError(f"point {point!r} must contain 2 numbers") from None
    return checked


def checked_labels(labels, n_points: int) -> list[int]:
    if len(labels) != n_points:
        raise ValueError(f"point_labels has {len(labels)} entries but there are {n_points} points")
    if any(label not in (0, 1) for label in labels):
        raise ValueError(f"point_labels must be 1 (positive) or 0 (negative), got {labels!r}")
    return [int(label) for label in labels]


def checked_grow(grow) -> int:
    if int(grow) != grow:
        raise ValueError(f"grow must be a whole number of pixels, got {grow!r}")
    return int(grow)


def checked_feather(feather) -> int:
    if int(feather) != feather or feather < 0:
        raise ValueError(f"feather must be a whole number of pixels >= 0, got {feather!r}")
    return int(feather)


@dataclass
class SegmenterConfig:
    """How to run FastSAM, for masks given by text, a box or points.

    Args:
        weights: a local FastSAM-s.pt / FastSAM-x.pt file, or `tiny`: FastSAM's architecture
            (YOLOv8-seg) with seeded random weights, for smoke runs without weights (it finds
            arbitrary instances, and only at a very low `conf`).
        device: where FastSAM runs (None: the model's device).
        imgsz: the side FastSAM resizes the content to.
        conf: FastSAM's confidence threshold: if a prompt finds nothing, lower it or use a mask file.
        iou: FastSAM's IoU threshold of non-maximum suppression.
        clip_model: a transformers CLIP model id or local folder, used only for text prompts.
    """

    weights: str = "FastSAM-s.pt"
    device: Optional[str] = None
    imgsz: int = 1024
    conf: float = 0.4
    iou: float = 0.9
    clip_model: str = "openai/clip-vit-base-patch32"
