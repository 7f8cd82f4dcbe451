"""The quality metrics (diffstyler.evaluation.metrics) on tiny images and seeded random networks.

Nothing is downloaded: every weights file a test needs is written by the test (random tensors in
torchvision's layout), except the LPIPS linear layers that torchmetrics ships in its package.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from torchmetrics.image.fid import FrechetInceptionDistance

from diffstyler.errors import MissingFileError, UserError
from diffstyler.evaluation import metrics

SIZE = 64


def images(count: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """Smooth random images in [0, 1]: coarse noise upsampled, so images differ as wholes."""
    coarse = torch.rand(count, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test instead of reaching the network."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args} {kwargs}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="module")
def networks() -> metrics.FeatureNetworks:
    return metrics.random_feature_networks(seed=0)


# ---------------------------------------------------------------------------------------------------
# LPIPS and CFSD: zero for an unchanged image, positive otherwise
# ---------------------------------------------------------------------------------------------------


def test_result_equal_to_content_scores_zero(networks):
    content = images(2, seed=1)
    lpips, cfsd = metrics.OfflineLPIPS(networks.lpips), metrics.CFSD(networks.cfsd)
    lpips.update(content, content.clone())
    cfsd.update(content, content.clone())
    assert abs(float(lpips.compute())) < 1e-6
    assert abs(float(cfsd.compute())) < 1e-6


def test_result_that_is_another_image_scores_above_zero(networks):
    content, other = images(2, seed=1), images(2, seed=2)
    lpips, cfsd = metrics.OfflineLPIPS(networks.lpips), metrics.CFSD(networks.cfsd)
    lpips.update(content, other)
    cfsd.update(content, other)
    assert float(lpips.compute()) > 1e-4
    assert (cfsd.pair_values() > 1e-6).all()
    assert (lpips.pair_values() > 1e-4).all()


# ---------------------------------------------------------------------------------------------------
# CFSD: the definition, by hand
# ---------------------------------------------------------------------------------------------------


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

    cfsd = metrics.CFSD(features, row_chunk=row_chunk)
    cfsd.update(content, result)

    assert content_features.shape[1] > 1  # the division by C is visible
    assert expected[0] != pytest.approx(float(expected[1]), rel=1e-3)  # per-pair values are distinguishable
    torch.testing.assert_close(cfsd.pair_values(), expected, rtol=1e-7, atol=0)  # float64 rounding only
    assert float(cfsd.compute()) == pytest.approx(float(expected.mean()), rel=1e-7)


def test_cfsd_is_not_symmetric_content_is_the_reference():
    content, result = images(1, seed=5), images(1, seed=6)
    forward, backward = metrics.CFSD(PixelFeatures()), metrics.CFSD(PixelFeatures())
    forward.update(content, result)
    backward.update(result, content)
    by_hand = hand_cfsd(PixelFeatures()(content)[0], PixelFeatures()(result)[0])
    assert float(forward.compute()) == pytest.approx(float(by_hand), rel=1e-7)
    assert float(forward.compute()) != pytest.approx(float(backward.compute()), rel=1e-2)


def test_cfsd_merged_halves_equal_one_metric_over_all(networks):
    content, result = images(8, seed=7), images(8, seed=8)
    whole = metrics.CFSD(networks.cfsd)
    whole.update(content[:3], result[:3])
    whole.update(content[3:], result[3:])
    first, second = metrics.CFSD(networks.cfsd), metrics.CFSD(networks.cfsd)
    first.update(content[:3], result[:3])  # unequal halves: a mean of means would differ
    second.update(content[3:], result[3:])

    second.merge_state(first)  # what a DDP sync does with the states' dist_reduce_fx

    assert int(second.count) == 8
    assert float(second.compute()) == pytest.approx(float(whole.compute()), rel=1e-9)
    torch.testing.assert_close(second.pair_values(), whole.pair_values())


def test_cfsd_refuses_pairs_of_different_sizes(networks):
    with pytest.raises(ValueError, match="shape"):
        metrics.CFSD(networks.cfsd).update(images(1, seed=1), images(1, seed=2, size=32))


# ---------------------------------------------------------------------------------------------------
# FID on a custom feature module, ArtFID
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


def test_build_metrics_random_config_reports_all_four():
    quality = metrics.build_metrics(metrics.MetricsConfig(random=True, seed=3))
    content, style = images(20, seed=11), images(20, seed=12)
    result = 0.5 * content + 0.5 * style
    quality.update(content[:12], style[:12], result[:12])
    quality.update(content[12:], style[12:], result[12:])

    scores = quality.compute()

    assert set(scores) == {"lpips", "fid", "artfid", "cfsd"}
    assert scores["artfid"] == pytest.approx((1 + scores["lpips"]) * (1 + scores["fid"]))
    assert scores["lpips"] > 0 and scores["cfsd"] > 0 and scores["fid"] > 0
    assert len(quality.cfsd.pair_values()) == 20 and len(quality.lpips.pair_values()) == 20


def test_metrics_config_refuses_unknown_kind():
    with pytest.raises(UserError, match="fid_kind"):
        metrics.MetricsConfig(fid_kind="imagenet21k")


def test_random_networks_are_seeded():
    first, again, other = (metrics.random_cfsd_network(seed) for seed in (4, 4, 5))
    batch = images(1, seed=13)
    with torch.no_grad():
        torch.testing.assert_close(first(batch), again(batch))
        assert not torch.allclose(first(batch), other(batch))


# ---------------------------------------------------------------------------------------------------
# Loading weights from local files
# ---------------------------------------------------------------------------------------------------


def test_missing_weights_file_names_the_file_and_where_to_get_it(tmp_path):
    missing = tmp_path / "nowhere" / "vgg19.pth"
    with pytest.raises(MissingFileError) as caught:
        metrics.vgg_features(str(missing))
    line = str(caught.value)
    assert str(missing) in line and "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" in line
    assert "\n" not in line


def test_missing_default_file_names_the_torch_hub_cache_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    expected = {
        "alexnet-owt-7be5be79.pth": lambda: metrics.lpips_metric(),
        "art_inception.pth": lambda: metrics.inception_features(kind="art"),
        "inception_v3_google-0cc3c7bd.pth": lambda: metrics.inception_features(kind="imagenet"),
        "vgg16-397923af.pth": lambda: metrics.vgg16_features(),
    }
    for name, load in expected.items():
        with pytest.raises(MissingFileError, match=re.escape(str(tmp_path / "checkpoints" / name))):
            load()
    with pytest.raises(MissingFileError, match="huggingface.co/matthias-wright/art_inception"):
        metrics.inception_features(kind="art")


class CreatesMarker:
    """Unpickled by full pickle, this runs open(marker, "w"): a file appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "marker"
    weights = tmp_path / "evil.pth"
    torch.save({"features.0.weight": CreatesMarker(marker)}, weights)

    with pytest.raises(UserError, match="refused weights file") as caught:
        metrics.vgg_features(str(weights))
    assert str(weights) in str(caught.value)
    assert not isinstance(caught.value, MissingFileError)
    assert not marker.exists()

    # Control: the file really is dangerous, so the test above means something.
    control = tmp_path / "control"
    torch.save({"x": CreatesMarker(control)}, tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)["x"].close()
    assert control.exists()


def test_unreadable_weights_file_is_a_user_error(tmp_path):
    weights = tmp_path / "broken.pth"
    weights.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="unreadable weights file"):
        metrics.inception_features(str(weights))


def vgg_state(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-layout VGG `features` state dict: real shapes (and random values) for the first 12
    modules, tiny stand-ins beyond, which the loader only counts (keeps the file small)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128)}
    state = {}
    for index in metrics.VGG_CONV_INDICES[arch]:
        out_channels, in_channels = shapes.get(index, (1, 1))
        state[f"features.{index}.weight"] = torch.randn(out_channels, in_channels, 3, 3, generator=generator) * 0.05
        state[f"features.{index}.bias"] = torch.randn(out_channels, generator=generator) * 0.05
    state["classifier.0.bias"] = torch.zeros(4)  # heads are ignored
    return state


def test_vgg_features_load_the_relu3_1_trunk_with_imagenet_normalisation(tmp_path):
    state = vgg_state("vgg19")
    torch.save(state, tmp_path / "vgg19.pth")
    network = metrics.vgg_features(str(tmp_path / "vgg19.pth"))
    batch = images(1, seed=14)

    # By hand: normalise, conv-relu, conv-relu, pool, conv-relu, conv-relu, pool, conv-relu.
    mean = torch.tensor(metrics.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(metrics.IMAGENET_STD).view(1, 3, 1, 1)
    x = (batch - mean) / std
    for index in (0, 2, "pool", 5, 7, "pool", 10):
        if index == "pool":
            x = torch.nn.functional.max_pool2d(x, 2)
        else:
            x = torch.relu(
                torch.nn.functional.conv2d(x, state[f"features.{index}.weight"], state[f"features.{index}.bias"], padding=1)
            )
    with torch.no_grad():
        features = network(batch)
    assert features.shape == (1, 256, SIZE // 4, SIZE // 4)
    torch.testing.assert_close(features, x)


def test_vgg_features_refuse_the_other_architecture(tmp_path):
    torch.save(vgg_state("vgg16"), tmp_path / "vgg16.pth")
    with pytest.raises(UserError, match="vgg16 state dict"):
        metrics.vgg_features(str(tmp_path / "vgg16.pth"), arch="vgg19")
    assert metrics.vgg16_features(str(tmp_path / "vgg16.pth"))[1][0].weight.shape == (64, 3, 3, 3)


def test_lpips_metric_loads_alexnet_and_the_torchmetrics_linear_layers(tmp_path):
    with metrics._seeded(21):
        alexnet = torchvision.models.alexnet(weights=None)
    features_only = {key: value for key, value in alexnet.state_dict().items() if key.startswith("features.")}
    torch.save(features_only, tmp_path / "alexnet.pth")  # the classifier is not needed, so not written

    lpips = metrics.lpips_metric(str(tmp_path / "alexnet.pth"))

    loaded = lpips.net.state_dict()
    for index, slice_number in ((0, 1), (3, 2), (6, 3), (8, 4), (10, 5)):
        torch.testing.assert_close(loaded[f"net.slice{slice_number}.{index}.weight"], features_only[f"features.{index}.weight"])
    shipped = torch.load(metrics.LPIPS_LINEAR_FILE, map_location="cpu", weights_only=True)
    for k in range(5):
        torch.testing.assert_close(loaded[f"lin{k}.model.1.weight"], shipped[f"lin{k}.model.1.weight"])

    content, result = images(2, seed=15), images(2, seed=16)
    lpips.update(content, result)
    with torch.no_grad():
        direct = lpips.net(content, result, normalize=True).flatten()
    torch.testing.assert_close(lpips.pair_values(), direct)
    assert float(lpips.compute()) == pytest.approx(float(direct.mean()))
    lpips.reset()
    lpips.update(content, content)
    assert abs(float(lpips.compute())) < 1e-6


@pytest.fixture(scope="module")
def inception_trunk_state() -> dict[str, torch.Tensor]:
    """A random torchvision Inception-v3 trunk state dict (no heads), built once."""
    with metrics._seeded(31):
        model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("fc.")}
    for key, value in list(state.items()):
        if key.endswith("running_var"):
            state[key] = value + torch.rand_like(value)  # not the defaults, so loading them is visible
    return state


def inception_file(path: Path, trunk: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Write `trunk` with the heads of ArtFID's art_inception.pth ("art": fc1/fc2 and AuxLogits1/2)
    or of torchvision's inception_v3_google ("imagenet": fc and AuxLogits)."""
    state = dict(trunk)
    heads = ("fc1", "fc2", "AuxLogits1", "AuxLogits2") if layout == "art" else ("fc", "AuxLogits")
    for head in heads:
        state[f"{head}.weight"] = torch.zeros(3, 2048)
        state[f"{head}.bias"] = torch.zeros(3)
    torch.save(state, path)
    return state


def test_art_inception_loads_torchvision_keys_without_heads_and_feeds_fid(tmp_path, inception_trunk_state):
    state = inception_file(tmp_path / "art_inception.pth", inception_trunk_state, "art")
    features = metrics.inception_features(str(tmp_path / "art_inception.pth"), kind="art")

    loaded = features.trunk.state_dict()
    torch.testing.assert_close(loaded["Mixed_7c.branch_pool.bn.running_var"], state["Mixed_7c.branch_pool.bn.running_var"])
    assert not any(key.split(".")[0] in metrics.INCEPTION_HEADS for key in loaded)
    features.train()
    assert not features.training  # batch norm stays in eval mode

    batch = images(2, seed=17, size=80)
    with torch.no_grad():
        pooled = features(batch)
    assert pooled.shape == (2, 2048)
    fid = FrechetInceptionDistance(feature=features, normalize=True)
    assert fid.real_features_sum.shape == (2048,)


class Seen(Exception):
    """Stops a forward pass once its input was seen (the rest of a 299x299 Inception is slow on a CPU)."""


def test_imagenet_inception_resizes_to_299_and_scales_to_minus_one_one(tmp_path, inception_trunk_state):
    inception_file(tmp_path / "inception.pth", inception_trunk_state, "imagenet")
    features = metrics.inception_features(str(tmp_path / "inception.pth"), kind="imagenet")
    seen = []

    def record(module, inputs):
        seen.append(inputs[0])
        raise Seen

    features.trunk.Conv2d_1a_3x3.register_forward_pre_hook(record)
    batch = images(1, seed=18, size=64)
    with torch.no_grad(), pytest.raises(Seen):
        features(batch)
    assert seen[0].shape[-2:] == (299, 299)
    torch.testing.assert_close(seen[0].mean(), 2 * batch.mean() - 1, atol=1e-3, rtol=0)


@pytest.mark.parametrize("damage", ["missing key", "prefixed keys"])
def test_inception_state_dict_that_does_not_fit_fails_loudly(tmp_path, inception_trunk_state, damage):
    state = inception_file(tmp_path / "art_inception.pth", inception_trunk_state, "art")
    if damage == "missing key":
        del state["Mixed_6e.branch1x1.conv.weight"]
    else:  # saved from a DataParallel wrapper: ArtFID's strict=False would silently load nothing
        state = {f"module.{key}": value for key, value in state.items()}
    torch.save(state, tmp_path / "damaged.pth")
    with pytest.raises(UserError, match="weights do not fit") as caught:
        metrics.inception_features(str(tmp_path / "damaged.pth"), kind="art")
    assert "damaged.pth" in str(caught.value)
