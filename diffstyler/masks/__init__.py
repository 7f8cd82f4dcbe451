"""Region masks for localized style transfer.

A mask says where the style goes. It comes from one of four sources (a mask file, a text prompt,
a box, or points; the Python API also takes in-memory images) and is then shaped the same way
whatever its source:

    hard mask -> invert -> grow/shrink -> (must not be empty) -> feather -> soft mask in [0, 1]

- `spec`: what the user asks for (`MaskSpec`, `SegmenterConfig`) and `MaskError`;
- `shape`: mask images and files to a hard mask, the shaping, the latent grid, saving;
- `fastsam`: text, box and point prompts answered by FastSAM offline, and the checks of its
  weights before any model loads.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from PIL import Image

from diffstyler.masks.fastsam import (
    FASTSAM_WEIGHTS_URL,
    TINY_FASTSAM,
    FastSAMSegmenter,
    TransformersClipScorer,
    build_random_fastsam_weights,
    check_clip_model,
    check_segmenter,
    torch_threads_kept,
)
from diffstyler.masks.shape import (
    MaskImage,
    feather_mask,
    grow_mask,
    hard_mask_from_image,
    load_mask_file,
    mask_to_latent,
    open_mask_file,
    save_mask_png,
    shape_mask,
)
from diffstyler.masks.spec import MaskError, MaskSpec, SegmenterConfig

__all__ = [
    "FASTSAM_WEIGHTS_URL",
    "TINY_FASTSAM",
    "FastSAMSegmenter",
    "MaskError",
    "MaskImage",
    "MaskSpec",
    "SegmenterConfig",
    "TransformersClipScorer",
    "build_random_fastsam_weights",
    "check_clip_model",
    "check_segmenter",
    "feather_mask",
    "grow_mask",
    "hard_mask_from_image",
    "load_mask_file",
    "mask_to_latent",
    "open_mask_file",
    "resolve_mask",
    "save_mask_png",
    "shape_mask",
    "torch_threads_kept",
]


def resolve_mask(
    spec: MaskSpec,
    image: Image.Image,
    segmenter_factory: Optional[Callable[[], FastSAMSegmenter]] = None,
) -> torch.Tensor:
    """Float [H, W] mask in [0, 1] for `image` (the content image).

    `segmenter_factory` is called only for text/box/point specs, so file masks never load
    FastSAM; None means a segmenter with the default SegmenterConfig.
    """
    hard = _hard_mask(spec, image, segmenter_factory or (lambda: FastSAMSegmenter(SegmenterConfig())))
    return shape_mask(hard, spec.describe(), invert=spec.invert, grow=spec.grow, feather=spec.feather)


def _hard_mask(spec: MaskSpec, image: Image.Image, segmenter_factory) -> torch.Tensor:
    if spec.file is not None:
        return hard_mask_from_image(spec.file, image.size)
    segmenter = segmenter_factory()
    if spec.text is not None:
        return segmenter.text(image, spec.text)
    if spec.box is not None:
        return segmenter.box(image, spec.box)
    return segmenter.points(image, spec.points, spec.point_labels)
