"""The run's metrics (diffstyler.evaluation.metrics): LPIPS, FID, ArtFID, CFSD and CSD together, on tiny
images and seeded random networks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance

from diffstyler.errors import UserError
from diffstyler.evaluation import metrics
from diffstyler.evaluation.cfsd import CFSD
from tests.evaluation.images import images

# ---------------------------------------------------------------------------------------------------
# LPIPS and CFSD: zero for an unchanged image, positive otherwise
# ---------------------------------------------------------------------------------------------------


def test_result_equal_to_content_scores_zero(networks):
    content = images(2, seed=1)
    lpips, cfsd = metrics.OfflineLPIPS(networks.lpips), CFSD(networks.cfsd)
    lpips.update(content, content.clone())
    cfsd.update(content, content.clone())
    assert abs(float(lpips.compute())) < 1e-6
    assert abs(float(cfsd.compute())) < 1e-6


def test_result_that_is_another_image_scores_above_zero(networks):
    content, other = images(2, seed=1), images(2, seed=2)
    lpips, cfsd = metrics.OfflineLPIPS(networks.lpips), CFSD(networks.cfsd)
    lpips.update(content, other)
    cfsd.update(content, other)
    assert float(lpips.compute()) > 1e-4
    assert (cfsd.pair_values() > 1e-6).all()
    assert (lpips.pair_values() > 1e-4).all()


# ---------------------------------------------------------------------------------------------------
# FID on a custom feature module, ArtFID, the metrics of a run
# ---------------------------------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero_and_against_a_shifted_set_is_not(networks):
    assert networks.fid.num_features == 16
    reference = images(64, seed=9)  # 64 images for 16 features: a well-conditioned covariance
    same, shifted = metrics.fid_metric(networks.fid), metrics.fid_metric(networks.fid)
    same.update(reference, real=True)
    same.update(reference.clone(), real=False)
    shifted.update(reference, real=True)
    shifted.update(reference * 0.7 + 0.3, real=False)

    self_distance, shifted_distance = float(same.compute()), float(shifted.compute())

    assert isinstance(same, FrechetInceptionDistance)
    assert same.real_features_sum.shape == (16,)  # num_features was read from the module
    assert abs(self_distance) < 1e-6
    assert shifted_distance > 1e-4
    assert shifted_distance > 1000 * abs(self_distance)


def test_fid_sees_float_images_unchanged(networks):
    """With a custom module, torchmetrics must pass float [0, 1] images through (no uint8 cast)."""
    seen = []

    class Recorder(torch.nn.Module):
        num_features = 16

        def forward(self, x):
            seen.append(x)
            return networks.fid(x)

    fid = metrics.fid_metric(Recorder())
    batch = images(4, seed=10)
    fid.update(batch, real=True)
    assert seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0], batch)


def test_artfid_formula():
    assert metrics.artfid(0.5, 10.0) == pytest.approx(16.5)
    assert metrics.artfid(0.0, 0.0) == pytest.approx(1.0)
    assert metrics.artfid(0.25, 3.0) == pytest.approx(5.0)


def csd_size(batch: torch.Tensor) -> torch.Tensor:
    """The images at CSD's input size (any resampling: the tests compare with the same inputs)."""
    return F.interpolate(batch, size=(224, 224), mode="bilinear", align_corners=False)


def update(quality, content, style, result, rows: slice) -> dict[str, torch.Tensor]:
    return quality.update(content[rows], style[rows], result[rows], cfsd_content=content[rows],
                          cfsd_result=result[rows], csd_style=csd_size(style[rows]), csd_result=csd_size(result[rows]))


@pytest.mark.slow
def test_build_metrics_random_config_reports_all_five():
    quality = metrics.build_metrics(metrics.feature_networks(metrics.MetricsConfig(random=True, seed=3)))
    content, style = images(20, seed=11), images(20, seed=12)
    result = 0.5 * content + 0.5 * style
    update(quality, content, style, result, slice(0, 12))
    update(quality, content, style, result, slice(12, 20))

    scores = quality.compute()

    assert set(scores) == {"lpips", "fid", "artfid", "cfsd", "csd"}
    assert scores["artfid"] == pytest.approx((1 + scores["lpips"]) * (1 + scores["fid"]))
    assert scores["lpips"] > 0 and scores["cfsd"] > 0 and scores["fid"] > 0
    assert 0 < scores["csd"] < 1
    assert len(quality.cfsd.pair_values()) == len(quality.lpips.pair_values()) == len(quality.csd.pair_values()) == 20


def test_metrics_config_refuses_unknown_kind():
    with pytest.raises(UserError, match="fid_kind"):
        metrics.MetricsConfig(fid_kind="imagenet21k")


def test_update_returns_the_per_pair_values_of_its_own_batch():
    """The evaluator's per-image table is built from what `update` returns. Catches: the values of the
    first batch (or of all batches so far) returned instead of this batch's."""
    quality = metrics.build_metrics(metrics.feature_networks(metrics.MetricsConfig(random=True, seed=3)))
    content, style = images(5, seed=11), images(5, seed=12)
    result = 0.5 * content + 0.5 * style
    first = update(quality, content, style, result, slice(0, 2))
    second = update(quality, content, style, result, slice(2, 5))

    for metric in ("lpips", "cfsd", "csd"):
        torch.testing.assert_close(torch.cat([first[metric], second[metric]]), getattr(quality, metric).pair_values())
        assert second[metric].shape == (3,)
