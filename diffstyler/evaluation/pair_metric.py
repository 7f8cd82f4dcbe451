"""`PairMeanMetric`: the bookkeeping shared by the per-pair metrics (CFSD, CSD), a mean over pairs that
syncs over DDP processes and keeps every pair's value for the per-image table."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class PairMeanMetric(Metric):
    """The mean of per-pair values over all pairs. Subclasses compute a batch's values and hand them
    to `add_pairs`. The states are a sum and a count (`dist_reduce_fx="sum"`), so DDP sync and
    `merge_state` give the mean over all pairs.

    Per-pair values: `pair_values()`, in update order on one process (a "cat" list state: after a DDP
    sync it holds all processes' values, process by process; `merge_state(other)` puts `other`'s first).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("values", [], dist_reduce_fx="cat")

    def add_pairs(self, values: Tensor) -> None:
        """Count one batch's per-pair values [B]."""
        self.total += values.sum().to(self.total.dtype)
        self.count += values.numel()
        self.values.append(values)

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            raise RuntimeError(f"{type(self).__name__}.compute() before any update: no pairs")
        return self.total / self.count

    def pair_values(self) -> Tensor:
        """The value of every pair so far, [N] (see the class docstring for the order)."""
        if isinstance(self.values, Tensor):
            return self.values
        if not self.values:
            return torch.zeros(0, dtype=self.total.dtype, device=self.total.device)
        return dim_zero_cat(self.values)


def check_image_pair(first: Tensor, second: Tensor, names: tuple[str, str]) -> None:
    """A ValueError unless both are float RGB images [B, 3, H, W] in [0, 1] of one shape."""
    check_unit_images(first, names[0])
    check_unit_images(second, names[1])
    if first.shape != second.shape:
        raise ValueError(f"{names[0]} {tuple(first.shape)} and {names[1]} {tuple(second.shape)} differ in shape")


def check_unit_images(images: Tensor, name: str) -> None:
    """A ValueError unless `images` are float RGB images [B, 3, H, W] with values in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"{name}: expected float images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"{name}: expected values in [0, 1], got [{images.min():.3g}, {images.max():.3g}]")
