"""Test images for the metric tests."""

from __future__ import annotations

import torch

SIZE = 64


def images(count: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """Smooth random images in [0, 1]: coarse noise upsampled, so images differ as wholes."""
    coarse = torch.rand(count, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
