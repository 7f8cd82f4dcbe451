"""From a hard mask to the soft mask on the latent grid.

A hard mask (bool [H, W], True = style here) comes from a mask file, an in-memory image, or
FastSAM. It is shaped the same way whatever its source:

    hard mask -> invert -> grow/shrink -> (must not be empty) -> feather -> soft mask in [0, 1]

The diffusion model works on a latent grid 8x smaller than the image; `mask_to_latent` brings a
pixel mask onto that grid so that the style region always covers the whole pixel mask.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffstyler.images import HIGH_BIT_MODES, ImageLoadError, open_upright_image
from diffstyler.masks.spec import MaskError, checked_feather, checked_grow, describe_mask_file
from diffstyler.outputs import atomic_save

# Mask images as the Python API takes them: a file path, a PIL image, a numpy array [H, W] or
# [H, W, C], or a torch tensor [H, W] or [C, H, W] (torch's image layout).
MaskImage = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

# Mask and content aspect ratios further apart than this get a warning: the mask is stretched.
ASPECT_TOLERANCE = 0.01


# --------------------------------------------------------------------------------------------
# Mask images and files -> hard mask
# --------------------------------------------------------------------------------------------


def hard_mask_from_image(mask: MaskImage, size: tuple[int, int], name: Optional[str] = None) -> torch.Tensor:
    """Bool [H, W] region of a mask image, for a content image of `size` = (width, height).

    Nonzero means region. For colour images a pixel is in the region if any colour channel is
    nonzero (a luminance conversion would round very dark colours to 0 and lose them). If the
    image has an alpha channel that is actually used (some pixel not fully opaque), the alpha
    alone decides (alpha > 0), because cut-outs often hide arbitrary colours under transparent
    pixels. Greyscale of more than 8 bits counts nonzero values, unclipped. A mask of another
    size is resized with nearest neighbour so no grey values appear; one of another aspect ratio
    (by more than 1%) is stretched, with a warning.

    Arrays follow the same rules as the same pixels saved as an image file: numpy arrays are
    [H, W] or [H, W, C] (C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA), torch tensors [H, W] or
    [C, H, W]; bool or uint8 (uint16 for [H, W] greyscale). `name` names the mask in errors and
    warnings (default: `mask file '<path>'` for paths, else `mask image`).
    """
    if isinstance(mask, (str, os.PathLike)):
        name = name or describe_mask_file(mask)
        image = open_mask_file(mask)
    else:
        name = name or "mask image"
        image = _as_image(mask, name)
    return _resized(_nonzero_region(image), size, name)


def load_mask_file(path: str | os.PathLike, size: tuple[int, int]) -> torch.Tensor:
    """`hard_mask_from_image` of a mask file. Lossy formats (JPEG) put faint noise near edges
    that counts as region: prefer PNG."""
    return hard_mask_from_image(path, size)


def open_mask_file(path: str | os.PathLike) -> Image.Image:
    """The decoded mask image at `path`, upright like the content (`load_image`), so the mask
    lines up with the photo it was drawn on. A MaskError names the file if it cannot be read."""
    try:
        return open_upright_image(path)
    except ImageLoadError as error:
        raise MaskError(error.what, describe_mask_file(path), error.why) from error
    except FileNotFoundError as error:
        raise MaskError("file not found", describe_mask_file(path)) from error


def _as_image(mask, name: str) -> Image.Image:
    if isinstance(mask, Image.Image):
        return mask
    if isinstance(mask, torch.Tensor):
        return _array_as_image(_tensor_as_array(mask, name), name)
    if isinstance(mask, np.ndarray):
        return _array_as_image(mask, name)
    raise MaskError(
        "not a mask image", name,
        f"got a {type(mask).__name__}; give a file path, a PIL image, a numpy array or a torch tensor",
    )


def _tensor_as_array(mask: torch.Tensor, name: str) -> np.ndarray:
    """[H, W] stays, [C, H, W] (torch's image layout) becomes [H, W, C] (numpy's)."""
    if not (mask.ndim == 2 or (mask.ndim == 3 and 1 <= mask.shape[0] <= 4)):
        raise MaskError(
            "mask tensor of the wrong shape", name,
            f"got shape {tuple(mask.shape)}; give [H, W] or [C, H, W] with C = 1 to 4",
        )
    pixels = mask.detach().cpu()
    return (pixels.permute(1, 2, 0) if pixels.ndim == 3 else pixels).numpy()


def _array_as_image(pixels: np.ndarray, name: str) -> Image.Image:
    """The image the same pixels make when saved as a file, so that one set of rules decides."""
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] in (2, 3, 4))):
        raise MaskError(
            "mask array of the wrong shape", name,
            f"got shape {tuple(pixels.shape)}; give [H, W] or [H, W, C] with C = 1 to 4",
        )
    if min(pixels.shape[:2]) == 0:
        raise MaskError("mask array without pixels", name, f"got shape {tuple(pixels.shape)}")
    if pixels.dtype == np.bool_:
        pixels = pixels.astype(np.uint8) * 255
    allowed = (np.uint8, np.uint16) if pixels.ndim == 2 else (np.uint8,)
    if pixels.dtype not in allowed:
        raise MaskError(
            "mask array of the wrong type", name,
            f"got {pixels.dtype}; give bool or uint8 (uint16 for [H, W] greyscale), nonzero = region",
        )
    return Image.fromarray(np.ascontiguousarray(pixels))


def _nonzero_region(image: Image.Image) -> np.ndarray:
    if image.mode in HIGH_BIT_MODES:
        # 16-bit and float greyscale would be clipped by a conversion to 8-bit RGB.
        return np.asarray(image) != 0
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return alpha > 0
    return np.asarray(image.convert("RGB")).max(axis=-1) > 0


def _resized(region: np.ndarray, size: tuple[int, int], name: str) -> torch.Tensor:
    width, height = size
    mask_height, mask_width = region.shape
    aspect_change = (mask_width / mask_height) / (width / height) - 1
    if abs(aspect_change) > ASPECT_TOLERANCE:
        warnings.warn(
            f"{name} is {mask_width}x{mask_height} pixels and the content image {width}x{height}: their aspect "
            f"ratios differ by {abs(aspect_change):.1%}, so the mask is stretched to the content's size",
            stacklevel=3,
        )
    if region.shape != (height, width):
        as_image = Image.fromarray(region.astype(np.uint8) * 255)
        region = np.asarray(as_image.resize((width, height), Image.Resampling.NEAREST)) > 0
    return torch.from_numpy(np.ascontiguousarray(region))


# --------------------------------------------------------------------------------------------
# Shaping: invert, grow, emptiness, feather
# --------------------------------------------------------------------------------------------


def shape_mask(hard: torch.Tensor, source: str, invert: bool = False, grow: int = 0, feather: int = 0) -> torch.Tensor:
    """Float [H, W] soft mask in [0, 1] from a bool [H, W] hard mask: inverted, grown (or shrunk
    for grow < 0), then feathered. A MaskError naming `source` (e.g. `MaskSpec.describe()`) if no
    pixel is left to style."""
    feather = checked_feather(feather)
    return feather_mask(styled_region(hard, source, invert, grow), feather)


def styled_region(hard: torch.Tensor, source: str, invert: bool = False, grow: int = 0) -> torch.Tensor:
    """The bool [H, W] region `shape_mask` styles before feathering: `hard` inverted, grown (or
    shrunk); a MaskError naming `source` if it is empty (also checked before the model loads:
    `data.inputs`)."""
    grow = checked_grow(grow)
    hard = ~hard.bool() if invert else hard.bool()
    hard = grow_mask(hard, grow)
    if not hard.any():
        steps = [step for step, used in (("invert", invert), (f"grow={grow}", grow)) if used]
        after = f" after {' and '.join(steps)}" if steps else ""
        raise MaskError("empty mask", source, f"no pixel would be styled{after}")
    return hard


def grow_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate (pixels > 0) or erode (pixels < 0) a bool mask with a square of side 2|pixels|+1.

    A square keeps counts predictable: a k x k square becomes (k + 2n) x (k + 2n). Pixels beyond
    the image border are ignored (max-pool pads with -inf), so erosion does not eat a region
    from the image edge.
    """
    if pixels == 0:
        return mask.bool()
    n = abs(pixels)
    grid = mask.bool().float()[None, None]
    if pixels > 0:
        return (F.max_pool2d(grid, 2 * n + 1, stride=1, padding=n) > 0)[0, 0]
    outside = F.max_pool2d(1 - grid, 2 * n + 1, stride=1, padding=n)
    return (outside == 0)[0, 0]


def feather_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Soft edge of `pixels` px on each side of the region's border.

    Rule: each output pixel is the fraction of region pixels in the (2p+1) x (2p+1) square
    around it (a box blur). So a pixel whose every neighbour within p px (Chebyshev distance,
    inside the image) is region is exactly 1, a pixel with no region within p px is exactly 0,
    and only the band within p px of the border is in between. Outside the image the nearest
    edge pixel is repeated, so a region touching the border stays 1 there. Counts are summed in
    integers, which makes 0 and 1 exact rather than merely close.
    """
    hard = mask.bool()
    if pixels == 0:
        return hard.float()
    p = pixels
    counts = hard.to(torch.int64)
    for dim in (0, 1):
        counts = _window_sums(counts, p, dim)
    return counts.float() / float((2 * p + 1) ** 2)


def _window_sums(values: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    # Sum of the 2r+1 values centred on each position along `dim`, edges replicated.
    length = values.shape[dim]
    index = torch.arange(-radius, length + radius).clamp(0, length - 1)
    padded = values.index_select(dim, index)
    cumulative = torch.cumsum(padded, dim=dim)
    zero = torch.zeros_like(cumulative.narrow(dim, 0, 1))
    cumulative = torch.cat([zero, cumulative], dim=dim)
    window = 2 * radius + 1
    return cumulative.narrow(dim, window, length) - cumulative.narrow(dim, 0, length)


# --------------------------------------------------------------------------------------------
# Latent grid and saving
# --------------------------------------------------------------------------------------------


def mask_to_latent(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Float 0/1 [h, w] mask on the latent grid (the image is 8x larger in each direction).

    A latent cell is inside if ANY pixel of its window has mask > 0, so the styled latent region
    covers the whole pixel mask including its feathered band; pixels outside the mask are put
    back from the content image afterwards. The windows are those of area interpolation
    (adaptive pooling): exactly the 8 x 8 block when the image is 8x the latent size.
    """
    h, w = (int(v) for v in latent_hw)
    if h <= 0 or w <= 0:
        raise ValueError(f"latent size must be positive, got {latent_hw!r}")
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {tuple(mask.shape)}")
    # Max over the window is "any > 0" without the underflow an average of tiny values could hit.
    pooled = F.adaptive_max_pool2d(mask.float()[None, None], (h, w))[0, 0]
    return (pooled > 0).float()


def save_mask_png(mask: torch.Tensor, path, text_chunks: Optional[dict[str, str]] = None) -> None:
    """Write `mask` ([H, W], values in [0, 1]) as an 8-bit greyscale PNG (0..255), atomically, with
    optional PNG text chunks (`outputs.atomic_save`)."""
    pixels = (mask.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    atomic_save(Image.fromarray(pixels), path, text_chunks)
