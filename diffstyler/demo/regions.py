"""A style's region as the page gathers it, and the click canvas that shows it over the photo.

The page keeps each style's clicks as `[x, y, label]` lists in the pixels of the photo, which is
the content already resized to the demo's resolution (`DemoConfig.resolution`): the pipeline
resizes nothing more, so a click is a content pixel as it is.

The click canvas is the photo enlarged by a whole factor (`canvas_scale`) until its longer side
reaches about `CANVAS_SIDE` pixels, so that a 64-pixel photo is not a few millimetres wide on the
screen; a larger photo is shown as it is (the browser shrinks it to fit). Gradio's
`SelectData.index` is `[x, y]` (column, row) in the canvas's own pixels, whatever size the browser
shows it at; `photo_pixel` divides by the factor. FastSAM's points and boxes take [x, y] too.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffstyler.errors import UserError

POINTS, BOX, TEXT, MASK_FILE, WHOLE_IMAGE = "points", "box", "text", "mask file", "whole image"
REGION_MODES = (POINTS, BOX, TEXT, MASK_FILE, WHOLE_IMAGE)
INCLUDE, EXCLUDE = "include", "exclude"
POINT_LABELS = {INCLUDE: 1, EXCLUDE: 0}  # FastSAM's point labels

Click = list[int]  # [x, y, label]

CANVAS_SIDE = 512
OVERLAY_COLOUR = np.array([255, 40, 40], dtype=np.float32)
OVERLAY_OPACITY = 0.5
MARK_COLOURS = {1: (40, 220, 40), 0: (40, 80, 255)}


def canvas_scale(size: tuple[int, int]) -> int:
    """The whole factor a photo of `size` (width, height) is enlarged by on the click canvas: its
    longer side becomes at most `CANVAS_SIDE` (1 for a photo that large already)."""
    return max(1, CANVAS_SIDE // max(size))


def photo_pixel(index: Any, size: tuple[int, int], where: str) -> tuple[int, int]:
    """The photo pixel (x, y) under a click at canvas pixel `index` ([x, y], Gradio's
    `SelectData.index`) on the canvas of a photo of `size`. A click that is not a point of the
    canvas (as a script may send) is one line naming the canvas."""
    scale = canvas_scale(size)
    width, height = size[0] * scale, size[1] * scale
    numbers = isinstance(index, (list, tuple)) and len(index) == 2 and all(
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) for value in index)
    if not numbers or not (0 <= index[0] < width and 0 <= index[1] < height):
        shown = repr(index) if len(repr(index)) <= 40 else repr(index)[:40] + "..."
        raise UserError("click outside the photo", where, f"a click is a pixel [x, y] of the {width}x{height} canvas, got {shown}")
    return int(index[0]) // scale, int(index[1]) // scale


def add_click(clicks: list[Click], pixel: tuple[int, int], kind: str) -> list[Click]:
    """The clicks with one more on photo pixel (x, y), an include or exclude point (or a box corner)."""
    return [*clicks, [pixel[0], pixel[1], POINT_LABELS[kind]]]


def missing_input(mode: str, clicks: list[Click], text: str, mask: Optional[Image.Image]) -> Optional[tuple[str, str]]:
    """(what is missing, what to do) while the region is not complete yet; None once it is."""
    if mode == POINTS and not clicks:
        return "no point clicked", "click the photo inside the region (or choose another region mode)"
    if mode == BOX and len(clicks) < 2:
        return "box not finished", "click two opposite corners of the box on the photo"
    if mode == TEXT and not text.strip():
        return "no text prompt", "type what the style should cover, e.g. 'the dog'"
    if mode == MASK_FILE and mask is None:
        return "no mask uploaded", "upload a mask image (white = where the style goes)"
    return None


def mask_source(mode: str, clicks: list[Click], text: str, mask: Optional[Image.Image]) -> Any:
    """What `DiffStylerPipeline.make_mask` takes as this region (None: the whole image)."""
    if mode == POINTS:
        return {"points": [[x, y] for x, y, _ in clicks], "point_labels": [label for _, _, label in clicks]}
    if mode == BOX:
        return {"box": box_of(clicks)}
    if mode == TEXT:
        return {"text": text.strip()}
    if mode == MASK_FILE:
        return mask
    return None


def box_of(clicks: list[Click]) -> list[int]:
    """[x0, y0, x1, y1] around the last two clicks, both corner pixels inside."""
    (xa, ya, _), (xb, yb, _) = clicks[-2:]
    return [min(xa, xb), min(ya, yb), max(xa, xb) + 1, max(ya, yb) + 1]


def canvas(content: Image.Image, mask: Optional[torch.Tensor], clicks: list[Click], mode: str) -> Image.Image:
    """The click canvas: the photo enlarged by `canvas_scale` (nearest neighbour: each photo pixel a
    square), the soft mask tinted over it, and the clicks (or the box) marked."""
    pixels = np.asarray(content.convert("RGB"), dtype=np.float32)
    if mask is not None:
        weight = OVERLAY_OPACITY * mask.float().clamp(0, 1).numpy()[..., None]
        pixels = pixels * (1 - weight) + OVERLAY_COLOUR * weight
    scale = canvas_scale(content.size)
    image = Image.fromarray(np.round(pixels).astype(np.uint8))
    image = image.resize((content.width * scale, content.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    radius = max(2, min(image.size) // 64)
    if mode == BOX and len(clicks) >= 2:
        x0, y0, x1, y1 = box_of(clicks)
        draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=MARK_COLOURS[1], width=max(1, scale // 2))
    elif mode in (POINTS, BOX):
        for x, y, label in clicks:
            centre_x, centre_y = (x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5
            draw.ellipse([centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius], fill=MARK_COLOURS[label])
    return image
