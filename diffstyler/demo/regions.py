"""A style's region as the page gathers it, and the preview of its mask over the photo.

The page keeps each style's clicks as `[x, y, label]` lists in the pixels of the photo it shows,
which is the content already resized to the demo's resolution (`DemoConfig.resolution`): the
pipeline resizes nothing more, so a click is a content pixel as it is. Gradio's `SelectData.index`
is `[x, y]` (column, row), the order FastSAM's points and boxes take too.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffstyler.errors import UserError

POINTS, BOX, TEXT, MASK_FILE, WHOLE_IMAGE = "points", "box", "text", "mask file", "whole image"
REGION_MODES = (POINTS, BOX, TEXT, MASK_FILE, WHOLE_IMAGE)
INCLUDE, EXCLUDE = "include", "exclude"
POINT_LABELS = {INCLUDE: 1, EXCLUDE: 0}  # FastSAM's point labels

Click = list[int]  # [x, y, label]

OVERLAY_COLOUR = np.array([255, 40, 40], dtype=np.float32)
OVERLAY_OPACITY = 0.5
MARK_COLOURS = {1: (40, 220, 40), 0: (40, 80, 255)}


def add_click(clicks: list[Click], index: tuple[int, int], kind: str) -> list[Click]:
    """The clicks with one more at Gradio's `SelectData.index` ([x, y] in the shown photo's pixels)."""
    x, y = int(index[0]), int(index[1])
    return [*clicks, [x, y, POINT_LABELS[kind]]]


def missing_input(mode: str, clicks: list[Click], text: Optional[str], mask_file: Optional[str]) -> Optional[tuple[str, str]]:
    """(what is missing, what to do) while the region is not complete yet; None once it is."""
    if mode == POINTS and not clicks:
        return "no point clicked", "click the photo inside the region (or choose another region mode)"
    if mode == BOX and len(clicks) < 2:
        return "box not finished", "click two opposite corners of the box on the photo"
    if mode == TEXT and not (text or "").strip():
        return "no text prompt", "type what the style should cover, e.g. 'the dog'"
    if mode == MASK_FILE and mask_file is None:
        return "no mask uploaded", "upload a mask image (white = where the style goes)"
    if mode not in REGION_MODES:
        return f"unknown region mode {mode!r}", f"choose one of {', '.join(REGION_MODES)}"
    return None


def mask_source(mode: str, clicks: list[Click], text: Optional[str], mask_file: Optional[str], where: str) -> Optional[dict]:
    """What `DiffStylerPipeline` takes as this style's mask (None: the whole image). `where` names
    the style in errors ("Style 1")."""
    missing = missing_input(mode, clicks, text, mask_file)
    if missing is not None:
        raise UserError(missing[0], where, missing[1])
    if mode == POINTS:
        return {"points": [[x, y] for x, y, _ in clicks], "point_labels": [label for _, _, label in clicks]}
    if mode == BOX:
        return {"box": box_of(clicks)}
    if mode == TEXT:
        return {"text": text.strip()}
    if mode == MASK_FILE:
        return {"file": mask_file}
    return None


def box_of(clicks: list[Click]) -> list[int]:
    """[x0, y0, x1, y1] around the last two clicks, both corner pixels inside."""
    (xa, ya, _), (xb, yb, _) = clicks[-2:]
    return [min(xa, xb), min(ya, yb), max(xa, xb) + 1, max(ya, yb) + 1]


def preview(content: Image.Image, mask: Optional[torch.Tensor], clicks: list[Click], mode: str) -> Image.Image:
    """The photo with the soft mask tinted over it, and the clicks (or the box) marked."""
    pixels = np.asarray(content.convert("RGB"), dtype=np.float32)
    if mask is not None:
        weight = OVERLAY_OPACITY * mask.float().clamp(0, 1).numpy()[..., None]
        pixels = pixels * (1 - weight) + OVERLAY_COLOUR * weight
    image = Image.fromarray(np.round(pixels).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    radius = max(1, min(image.size) // 64)
    if mode == BOX and len(clicks) >= 2:
        x0, y0, x1, y1 = box_of(clicks)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=MARK_COLOURS[1])
    elif mode in (POINTS, BOX):
        for x, y, label in clicks:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=MARK_COLOURS[label])
    return image
