"""Write the small, deterministic, licence-clean images that the smoke configs and tests use.

    python scripts/make_smoke_data.py [--out data]

- style_stripes.png      64x64: diagonal colour stripes over a gradient (a "style" to learn)
- content_shapes.png     64x48: a disc and a square on a sky-to-ground gradient (non-square content)
- content_shapes_mask.png 64x48: white rectangle around the square = the region to stylize
- styles/waves.png, styles/checks.png  64x64: two more styles, the style folder of the smoke protocol

Everything is computed from formulas (no randomness, no external files), so the bytes are the
same on every run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

MASK_BOX = (34, 18, 60, 44)  # left, top, right, bottom (exclusive) in content_shapes.png


def style_stripes(size: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    stripe = ((x + y) // 8) % 3  # diagonal bands, three colours
    palette = np.array([[220, 60, 40], [250, 200, 50], [30, 70, 160]], dtype=np.float32)
    shade = 0.6 + 0.4 * (y / (size - 1))[..., None]  # darker at the top
    return (palette[stripe] * shade).round().astype(np.uint8)


def content_shapes(width: int = 64, height: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    t = (y / (height - 1))[..., None]
    sky, ground = np.array([120, 180, 240.0]), np.array([70, 140, 60.0])
    image = (1 - t) * sky + t * ground
    disc = (x - 16) ** 2 + (y - 20) ** 2 <= 9**2
    image[disc] = [240, 220, 60]
    left, top, right, bottom = MASK_BOX
    square = (x >= left + 4) & (x < right - 4) & (y >= top + 4) & (y < bottom - 4)
    image[square] = [200, 40, 40]
    return image.round().astype(np.uint8)


def content_mask(width: int = 64, height: int = 48) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = MASK_BOX
    mask[top:bottom, left:right] = 255
    return mask


def style_waves(size: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    waves = np.stack([127 + 120 * np.sin(x / 5 + 2 * np.sin(y / 9)), 90 + 80 * np.cos(y / 6), 200 - 60 * np.sin((x + y) / 7)], -1)
    return np.clip(waves, 0, 255).astype(np.uint8)


def style_checks(size: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    light = (((x // 8) + (y // 8)) % 2)[..., None]
    return (light * np.array([230, 180, 40]) + (1 - light) * np.array([30, 40, 120])).astype(np.uint8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data", help="output folder (default: data)")
    out = Path(parser.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(style_stripes(), "RGB").save(out / "style_stripes.png")
    Image.fromarray(content_shapes(), "RGB").save(out / "content_shapes.png")
    Image.fromarray(content_mask(), "L").save(out / "content_shapes_mask.png")
    (out / "styles").mkdir(exist_ok=True)
    Image.fromarray(style_waves(), "RGB").save(out / "styles" / "waves.png", optimize=True)
    Image.fromarray(style_checks(), "RGB").save(out / "styles" / "checks.png", optimize=True)
    print(f"wrote style_stripes.png, content_shapes.png, content_shapes_mask.png, styles/ to {out}")


if __name__ == "__main__":
    main()
