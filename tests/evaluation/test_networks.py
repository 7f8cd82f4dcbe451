"""Loading the feature networks from local files (diffstyler.evaluation.networks).

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
from diffstyler.evaluation import metrics, networks
from tests.evaluation.images import SIZE, images
from tests.evaluation.weights import CreatesMarker


@pytest.mark.parametrize("load, url", [
    (networks.vgg_features, "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"),
    (networks.csd_network, "https://huggingface.co/tomg-group-umd/CSD-ViT-L/resolve/main/pytorch_model.bin"),
])
def test_missing_weights_file_names_the_file_and_where_to_get_it(tmp_path, load, url):
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(MissingFileError) as caught:
        load(str(missing))
    line = str(caught.value)
    assert str(missing) in line and url in line
    assert "\n" not in line


def test_missing_default_file_names_the_torch_hub_cache_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    expected = {
        "alexnet-owt-7be5be79.pth": lambda: metrics.OfflineLPIPS(networks.lpips_network()),
        "art_inception.pth": lambda: networks.inception_features(kind="art"),
        "inception_v3_google-0cc3c7bd.pth": lambda: networks.inception_features(kind="imagenet"),
        "vgg16-397923af.pth": lambda: networks.vgg16_features(),
    }
    for name, load in expected.items():
        with pytest.raises(MissingFileError, match=re.escape(str(tmp_path / "checkpoints" / name))):
            load()
    with pytest.raises(MissingFileError, match="huggingface.co/matthias-wright/art_inception"):
        networks.inception_features(kind="art")


def test_a_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "marker"
    weights = tmp_path / "evil.pth"
    torch.save({"features.0.weight": CreatesMarker(marker)}, weights)

    with pytest.raises(UserError, match="refused weights file") as caught:
        networks.vgg_features(str(weights))
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
        networks.inception_features(str(weights))


def vgg_state(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-layout VGG `features` state dict: real shapes (and random values) for the first 12
    modules, tiny stand-ins beyond, which the loader only counts (keeps the file small)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128)}
    state = {}
    for index in networks.VGG_CONV_INDICES[arch]:
        out_channels, in_channels = shapes.get(index, (1, 1))
        state[f"features.{index}.weight"] = torch.randn(out_channels, in_channels, 3, 3, generator=generator) * 0.05
        state[f"features.{index}.bias"] = torch.randn(out_channels, generator=generator) * 0.05
    state["classifier.0.bias"] = torch.zeros(4)  # heads are ignored
    return state


def test_vgg_features_load_the_relu3_1_trunk_with_imagenet_normalisation(tmp_path):
    state = vgg_state("vgg19")
    torch.save(state, tmp_path / "vgg19.pth")
    network = networks.vgg_features(str(tmp_path / "vgg19.pth"))
    batch = images(1, seed=14)

    # By hand: normalise, conv-relu, conv-relu, pool, conv-relu, conv-relu, pool, conv-relu.
    mean = torch.tensor(networks.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(networks.IMAGENET_STD).view(1, 3, 1, 1)
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
        networks.vgg_features(str(tmp_path / "vgg16.pth"), arch="vgg19")
    assert networks.vgg16_features(str(tmp_path / "vgg16.pth"))[1][0].weight.shape == (64, 3, 3, 3)


@pytest.mark.slow
def test_lpips_metric_loads_alexnet_and_the_torchmetrics_linear_layers(tmp_path):
    with networks.seeded(21):
        alexnet = torchvision.models.alexnet(weights=None)
    features_only = {key: value for key, value in alexnet.state_dict().items() if key.startswith("features.")}
    torch.save(features_only, tmp_path / "alexnet.pth")  # the classifier is not needed, so not written

    lpips = metrics.OfflineLPIPS(networks.lpips_network(str(tmp_path / "alexnet.pth")))

    loaded = lpips.net.state_dict()
    for index, slice_number in ((0, 1), (3, 2), (6, 3), (8, 4), (10, 5)):
        torch.testing.assert_close(loaded[f"net.slice{slice_number}.{index}.weight"], features_only[f"features.{index}.weight"])
    shipped = torch.load(networks.LPIPS_LINEAR_FILE, map_location="cpu", weights_only=True)
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
    with networks.seeded(31):
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
    features = networks.inception_features(str(tmp_path / "art_inception.pth"), kind="art")

    loaded = features.trunk.state_dict()
    torch.testing.assert_close(loaded["Mixed_7c.branch_pool.bn.running_var"], state["Mixed_7c.branch_pool.bn.running_var"])
    assert not any(key.split(".")[0] in networks.INCEPTION_HEADS for key in loaded)
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
    features = networks.inception_features(str(tmp_path / "inception.pth"), kind="imagenet")
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
        networks.inception_features(str(tmp_path / "damaged.pth"), kind="art")
    assert "damaged.pth" in str(caught.value)
