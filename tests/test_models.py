"""Model loading: the tiny stand-in has SD 2.1-base topology, and bad names fail fast, offline."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from diffstyler.models import DEFAULT_MODEL, ModelLoadError, ModelSpec, build_tiny_pipeline, load_pipeline


def test_tiny_unet_has_sd21_base_topology(tiny_pipe):
    unet = tiny_pipe().unet
    assert [type(block).__name__ for block in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert [type(block).__name__ for block in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert all(len(block.resnets) == 2 for block in unet.down_blocks)
    assert all(len(block.resnets) == 3 for block in unet.up_blocks)  # layers_per_block + 1, as in SD
    assert unet.config.layers_per_block == 2
    assert len(unet.attn_processors) == 32


def test_tiny_cross_attention_reads_the_text_encoder(tiny_pipe):
    pipe = tiny_pipe()
    cross_attentions = [name for name in pipe.unet.attn_processors if ".attn2." in name]
    self_attentions = [name for name in pipe.unet.attn_processors if ".attn1." in name]
    assert len(cross_attentions) == len(self_attentions) == 16
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.num_train_timesteps == 1000


def test_tiny_vae_maps_64_pixels_to_an_8x8_latent(tiny_pipe):
    pipe = tiny_pipe()
    with torch.no_grad():
        latent = pipe.vae.encode(torch.zeros(1, 3, 64, 48)).latent_dist.mean
    assert latent.shape == (1, 4, 8, 6)


def test_tiny_weights_depend_only_on_the_seed():
    first, second, other = build_tiny_pipeline(0), build_tiny_pipeline(0), build_tiny_pipeline(1)
    for component in ("unet", "vae", "text_encoder"):
        weights, same_seed = getattr(first, component).state_dict(), getattr(second, component).state_dict()
        assert weights.keys() == same_seed.keys()
        for name, weight in weights.items():
            assert torch.equal(weight, same_seed[name]), f"{component}.{name}"
    assert not torch.equal(first.unet.conv_in.weight, other.unet.conv_in.weight)


def test_tiny_does_not_touch_the_global_rng():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_pipeline(ModelSpec("tiny"))
    assert torch.equal(torch.rand(3), expected)


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection attempt is recorded and refused."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"test forbids network access ({address})")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.mark.parametrize(
    "name",
    [
        "nobody-diffstyler-test/no-such-model",  # hub id
        "{tmp}/empty_folder",  # folder without model_index.json
        "{tmp}/no/such/folder",  # path that does not exist
        "{tmp}/missing.safetensors",  # single file that does not exist
        "{tmp}/missing.ckpt",
    ],
)
def test_unloadable_model_fails_fast_offline_listing_the_options(name, tmp_path, no_network):
    (tmp_path / "empty_folder").mkdir()
    name = name.format(tmp=tmp_path)
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as error:
        load_pipeline(ModelSpec(name))
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert name in message
    for option in (DEFAULT_MODEL, "model_index.json", ".safetensors", ".ckpt", "'tiny'", "HF_HUB_OFFLINE=1"):
        assert option in message
    assert no_network == []


def test_model_spec_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="float16"):
        ModelSpec("tiny", dtype="float8")


def test_half_precision_vae_overflow_is_decoded_again_in_float32(tiny_pipe):
    from diffstyler.models import decode_latents

    pipe = tiny_pipe()
    pipe.vae.to(torch.float16)
    huge = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * 3e4  # overflows fp16
    with pytest.warns(UserWarning, match="non-finite values in half precision"):
        pixels = decode_latents(pipe, huge)
    assert pixels.dtype == torch.float32 and torch.isfinite(pixels).all()
    assert pipe.vae.dtype == torch.float16  # the VAE goes back to the precision it had
