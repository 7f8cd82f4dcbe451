"""The random feature networks of the smoke config (diffstyler.evaluation.random_networks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffstyler.evaluation.random_networks import random_cfsd_network, random_csd_network
from tests.evaluation.images import images


@pytest.mark.parametrize("make, size", [(random_cfsd_network, 64), (random_csd_network, 224)])
def test_random_networks_are_seeded(make, size):
    first, again, other = (make(seed) for seed in (4, 4, 5))
    batch = F.interpolate(images(1, seed=13), size=(size, size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(first(batch), again(batch))
        assert not torch.allclose(first(batch), other(batch))
