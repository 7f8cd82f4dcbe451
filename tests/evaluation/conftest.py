"""Fixtures of the evaluation tests: no test may download weights, and one set of seeded random
feature networks for the metric tests."""

from __future__ import annotations

import pytest
import torch
import torchvision

from diffstyler.evaluation.networks import FeatureNetworks
from diffstyler.evaluation.random_networks import random_feature_networks


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test instead of reaching the network."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args} {kwargs}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="module")
def networks() -> FeatureNetworks:
    return random_feature_networks(seed=0)
