"""CFSD (diffstyler.evaluation.cfsd) against its definition, computed by hand with the whole n x n matrices."""

from __future__ import annotations

import pytest
import torch

from diffstyler.evaluation.cfsd import CFSD
from tests.evaluation.images import images


def hand_cfsd(content_features: torch.Tensor, result_features: torch.Tensor) -> torch.Tensor:
    """StyleID's CFSD of one pair from feature maps [C, h, w], with the whole n x n matrices:
    rows f_i / C, S = X X^T, row softmax, KL(content || result) summed over all rows."""
    channels = content_features.shape[0]
    x_content = content_features.double().reshape(channels, -1).T / channels
    x_result = result_features.double().reshape(channels, -1).T / channels
    p = torch.softmax(x_content @ x_content.T, dim=1)
    q = torch.softmax(x_result @ x_result.T, dim=1)
    return (p * torch.log(p / q)).sum()


class PixelFeatures(torch.nn.Module):
    """Block-averaged pixels, scaled: 3 channels on an 8x8 grid, similarities large enough that the
    softmax rows are far from uniform (so the KL's direction shows, unlike on near-uniform rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 8) * 6.0


@pytest.mark.parametrize("row_chunk", [7, 4096])  # blocks of rows that do not divide n, and one block
@pytest.mark.parametrize("network", ["random", "pixels"])
def test_cfsd_equals_hand_computation(networks, network, row_chunk):
    features = networks.cfsd if network == "random" else PixelFeatures()
    content, result = images(2, seed=3), images(2, seed=4)
    # A per-channel scale makes the result's structure differ from the content's in every channel.
    result = (result * torch.tensor([1.0, 0.4, 0.7]).view(1, 3, 1, 1)).clamp(0, 1)
    with torch.no_grad():
        content_features, result_features = features(content), features(result)
    expected = torch.stack([hand_cfsd(content_features[i], result_features[i]) for i in range(2)])

    cfsd = CFSD(features, row_chunk=row_chunk)
    cfsd.update(content, result)

    assert content_features.shape[1] > 1  # the division by C is visible
    assert expected[0] != pytest.approx(float(expected[1]), rel=1e-3)  # per-pair values are distinguishable
    torch.testing.assert_close(cfsd.pair_values(), expected, rtol=1e-7, atol=0)  # float64 rounding only
    assert float(cfsd.compute()) == pytest.approx(float(expected.mean()), rel=1e-7)


def test_cfsd_is_not_symmetric_content_is_the_reference():
    content, result = images(1, seed=5), images(1, seed=6)
    forward, backward = CFSD(PixelFeatures()), CFSD(PixelFeatures())
    forward.update(content, result)
    backward.update(result, content)
    by_hand = hand_cfsd(PixelFeatures()(content)[0], PixelFeatures()(result)[0])
    assert float(forward.compute()) == pytest.approx(float(by_hand), rel=1e-7)
    assert float(forward.compute()) != pytest.approx(float(backward.compute()), rel=1e-2)


def test_cfsd_merged_halves_equal_one_metric_over_all(networks):
    content, result = images(8, seed=7), images(8, seed=8)
    whole = CFSD(networks.cfsd)
    whole.update(content[:3], result[:3])
    whole.update(content[3:], result[3:])
    first, second = CFSD(networks.cfsd), CFSD(networks.cfsd)
    first.update(content[:3], result[:3])  # unequal halves: a mean of means would differ
    second.update(content[3:], result[3:])

    second.merge_state(first)  # what a DDP sync does with the states' dist_reduce_fx

    assert int(second.count) == 8
    assert float(second.compute()) == pytest.approx(float(whole.compute()), rel=1e-9)
    torch.testing.assert_close(second.pair_values(), whole.pair_values())


def test_cfsd_refuses_pairs_of_different_sizes(networks):
    with pytest.raises(ValueError, match="shape"):
        CFSD(networks.cfsd).update(images(1, seed=1), images(1, seed=2, size=32))
