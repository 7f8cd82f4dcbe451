"""Reading and preparing images for Stable Diffusion, shared by training and stylization.

Size rule (`resize_to_multiple_of_8`): the LONGER side becomes `resolution` and the shorter side
keeps the aspect ratio, rounded to the nearest multiple of 8 (the VAE downsamples by 8). For the
square images of the paper this equals its `Resize(512)`; for other shapes it bounds memory by
`resolution`² and never asks the model for a size larger than the one it was trained at.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

LATENT_FACTOR = 8  # VAE downsampling factor of Stable Diffusion


class ImageLoadError(ValueError):
    """A file exists but is not an image that Pillow can read."""


def open_image_file(path: str | os.PathLike) -> Image.Image:
    """The decoded image at `path` as stored (mode and orientation untouched).

    Raises FileNotFoundError for a missing file and ImageLoadError for anything Pillow cannot
    decode; both messages name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: truncated files fail here, not later in a worker
            return image
    # ImportError: once ultralytics is imported (FastSAM masks) it patches Image.open to try the
    # optional pi-heif plugin on unreadable files, which fails with ImportError when absent.
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, ImportError) as error:
        raise ImageLoadError(f"not a readable image: {path} ({error})") from error


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as an RGB PIL image, upright per its EXIF orientation (errors as
    `open_image_file`)."""
    return ImageOps.exif_transpose(open_image_file(path)).convert("RGB")


def resize_to_multiple_of_8(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the longer side is `resolution` and both sides are multiples of 8 (aspect kept)."""
    if resolution < LATENT_FACTOR or resolution % LATENT_FACTOR:
        raise ValueError(f"resolution must be a positive multiple of {LATENT_FACTOR}, got {resolution}")
    width, height = image.size
    scale = resolution / max(width, height)
    size = (_round_to_multiple_of_8(width * scale), _round_to_multiple_of_8(height * scale))
    if size == image.size:
        return image.copy()
    return image.resize(size, Image.Resampling.BICUBIC)


def _round_to_multiple_of_8(length: float) -> int:
    return max(LATENT_FACTOR, int(round(length / LATENT_FACTOR)) * LATENT_FACTOR)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A float32 tensor [3, H, W] in [-1, 1], the VAE's input range."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() * 2.0 - 1.0


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
