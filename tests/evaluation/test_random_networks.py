"""The random feature networks of the smoke config (diffstyler.evaluation.random_networks)."""

from __future__ import annotations

import torch

from diffstyler.evaluation.random_networks import random_cfsd_network
from tests.evaluation.images import images


def test_random_networks_are_seeded():
    first, again, other = (random_cfsd_network(seed) for seed in (4, 4, 5))
    batch = images(1, seed=13)
    with torch.no_grad():
        torch.testing.assert_close(first(batch), again(batch))
        assert not torch.allclose(first(batch), other(batch))
