"""Reading and preparing images for Stable Diffusion, shared by training and stylization.

Size rule (`resize_to_multiple`): the LONGER side becomes `resolution` and the shorter side
keeps the aspect ratio, rounded to the nearest multiple of 8 (the VAE downsamples by 8). For the
square images of the paper this equals its `Resize(512)`; for other shapes it bounds memory by
`resolution`² and never asks the model for a size larger than the one it was trained at.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from diffstyler.errors import MissingFileError, UserError

LATENT_FACTOR = 8  # VAE downsampling factor of Stable Diffusion

# Greyscale modes with more than 8 bits: 16-bit integers (all byte orders), 32-bit integers and
# floats. Pillow's conversion to 8-bit clips them at 255 instead of scaling.
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
SIXTEEN_BIT_MAX = 65535

MAX_PIXELS_VARIABLE = "DIFFSTYLER_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default guard (about 9459 x 9459)


class ImageLoadError(UserError):
    """A file exists but is not an image that can be read (or is too large to read safely)."""


def max_image_pixels() -> int:
    """The largest image, in pixels, that is decoded: DIFFSTYLER_MAX_IMAGE_PIXELS, else Pillow's default.

    Read at every load, so the variable can be set at any time before an image is read.
    """
    value = os.environ.get(MAX_PIXELS_VARIABLE, "").strip()
    if not value:
        return DEFAULT_MAX_IMAGE_PIXELS
    if not value.isdigit() or int(value) <= 0:
        raise UserError(
            "invalid environment variable",
            MAX_PIXELS_VARIABLE,
            f"must be a positive whole number of pixels, got {value!r}",
        )
    return int(value)


def open_image_file(path: str | os.PathLike) -> Image.Image:
    """The decoded image at `path` as stored (mode and orientation untouched).

    Raises MissingFileError (a FileNotFoundError too) for a missing file and ImageLoadError for anything Pillow cannot
    decode and for images of more than `max_image_pixels()` pixels; all messages name the file.
    """
    with guarded_image(path) as image:
        image.load()  # decode now: truncated files fail here, not later in a worker
        return image


def upright_image_size(path: str | os.PathLike, decode: bool = True) -> tuple[int, int]:
    """(width, height) of the image at `path` once turned upright per its EXIF orientation (as
    `load_image` gives it), failing as `open_image_file` does. `decode` False reads only the header:
    a missing file, a file that is not an image and one over the pixel limit fail, a truncated one
    does not (its decode would)."""
    with guarded_image(path) as image:
        width, height = image.size
        if decode:
            # A JPEG is decoded at 1/8 scale, which reads every byte all the same (a truncated file fails).
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
        # A PNG's EXIF may follow its pixels, and Pillow decodes them to find it: from the header,
        # only an EXIF chunk before them counts.
        exif_known = decode or image.format != "PNG" or "exif" in image.info
        turned = exif_known and image.getexif().get(EXIF_ORIENTATION) in EXIF_TRANSPOSED
        return (height, width) if turned else (width, height)


EXIF_ORIENTATION = 0x0112
EXIF_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height (ImageOps.exif_transpose)


@contextlib.contextmanager
def guarded_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """`Image.open(path)` under the pixel limit, with every way of failing (in the block too, e.g.
    a decode) as a MissingFileError or ImageLoadError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("image file not found", str(path))
    limit = max_image_pixels()
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        # Pillow's decompression-bomb guard is the process-wide Image.MAX_IMAGE_PIXELS (set for this
        # read only, then put back); between the limit and twice it Pillow only warns, so the
        # warning is made an error too.
        Image.MAX_IMAGE_PIXELS = limit
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                yield image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(
            "image too large",
            str(path),
            f"more than {limit} pixels, refused as a possible decompression bomb; if you trust the file, "
            f"set the environment variable {MAX_PIXELS_VARIABLE} to a larger number of pixels",
        ) from error
    # ImportError: once ultralytics is imported (FastSAM masks) it patches Image.open to try the
    # optional pi-heif plugin on unreadable files, which fails with ImportError when absent.
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, ImportError) as error:
        raise ImageLoadError("not a readable image", str(path), " ".join(str(error).split())) from error
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def check_image_header(path: str | os.PathLike) -> None:
    """Fail like `open_image_file` when `path` is missing or not an image Pillow can identify,
    reading only the header (cheap: for the files named one by one in a config). The pixel limit
    is checked when the image is decoded, by `open_image_file`."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("image file not found", str(path))
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, ImportError) as error:
        raise ImageLoadError("not a readable image", str(path), " ".join(str(error).split())) from error
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def open_upright_image(path: str | os.PathLike) -> Image.Image:
    """`open_image_file`, turned upright per the file's EXIF orientation (mode untouched).

    Content, style and mask images all go through here, so a mask drawn on a photo lines up
    with the photo however the camera stored it.
    """
    return ImageOps.exif_transpose(open_image_file(path))


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as an 8-bit RGB PIL image, upright per its EXIF orientation (errors as
    `open_image_file`). High-bit greyscale is scaled to 8 bits (see `to_8_bit_rgb`)."""
    return to_8_bit_rgb(open_upright_image(path))


def to_8_bit_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel. Greyscale of more than 8 bits (HIGH_BIT_MODES) is scaled from
    the 16-bit range, value * 255 / 65535 rounded (65535 -> 255, 32768 -> 128), not clipped;
    a float image whose values all lie in [0, 1] is scaled from that range instead."""
    if image.mode not in HIGH_BIT_MODES:
        return image.convert("RGB")
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    in_unit_range = image.mode == "F" and values.min() >= 0 and values.max() <= 1
    full_scale = 1.0 if in_unit_range else SIXTEEN_BIT_MAX
    grey = np.clip(np.floor(values * (255 / full_scale) + 0.5), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def resize_to_multiple(image: Image.Image, resolution: int, multiple: int = LATENT_FACTOR) -> Image.Image:
    """Resize so the longer side is `resolution` and both sides are multiples of `multiple` (aspect
    kept): 8 for a UNet's latent grid, 16 for a transformer's 2x2 patches of it."""
    size = size_at_resolution(image.size, resolution, multiple)
    if size == image.size:
        return image.copy()
    return image.resize(size, Image.Resampling.BICUBIC)


def size_at_resolution(size: tuple[int, int], resolution: int, multiple: int = LATENT_FACTOR) -> tuple[int, int]:
    """The (width, height) `resize_to_multiple` gives an image of `size`."""
    if resolution < multiple or resolution % multiple:
        raise ValueError(f"resolution must be a positive multiple of {multiple}, got {resolution}")
    width, height = size
    scale = resolution / max(width, height)
    return _round_to_multiple(width * scale, multiple), _round_to_multiple(height * scale, multiple)


def _round_to_multiple(length: float, multiple: int) -> int:
    return max(multiple, int(round(length / multiple)) * multiple)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A float32 tensor [3, H, W] in [-1, 1], the VAE's input range."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() * 2.0 - 1.0


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes.

    Remembered per (path, size, modification time): every job hashes its content and each LoRA
    for its settings, and community LoRAs weigh hundreds of MB. A rewritten file is hashed again.
    """
    if not os.path.isfile(path):
        raise MissingFileError("file not found", str(path))
    status = os.stat(path)
    return _sha256_of(os.path.realpath(path), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


DEFAULT_RESOLUTION = 512  # the longer side stylization works at (the paper's 512 x 512)


def as_rgb_image(value: "str | os.PathLike | Image.Image | np.ndarray | torch.Tensor", argument: str) -> Image.Image:
    """An image given to the Python API as a path, a PIL image, a uint8 array [H, W(, C)] or a float
    array / tensor in [0, 1] ([H, W, C] or [C, H, W]), as an 8-bit RGB PIL image (files upright per EXIF)."""
    if isinstance(value, (str, os.PathLike)):
        try:
            return load_image(value)
        except FileNotFoundError as error:
            raise UserError("image file not found", argument, str(value)) from error
    if isinstance(value, Image.Image):
        return to_8_bit_rgb(value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
        if value.ndim == 3 and value.shape[0] in (1, 3) and value.shape[-1] not in (1, 3):
            value = value.transpose(1, 2, 0)
    if isinstance(value, np.ndarray):
        if value.ndim not in (2, 3) or (value.ndim == 3 and value.shape[-1] not in (1, 3, 4)):
            raise UserError("not an image", argument, f"an array of shape {value.shape}; give [H, W] or [H, W, 3]")
        if value.dtype != np.uint8:
            if not np.isfinite(value).all() or value.min() < 0 or value.max() > 1:
                raise UserError("not an image", argument, f"a {value.dtype} array must hold values in [0, 1]")
            value = np.floor(value * 255 + 0.5).astype(np.uint8)
        return Image.fromarray(value.squeeze(-1) if value.ndim == 3 and value.shape[-1] == 1 else value).convert("RGB")
    raise UserError("not an image", argument, f"got {type(value).__name__}; give a path, a PIL image or an array")
