"""Model loading: the tiny stand-in has SD 2.1-base topology, and bad names fail fast, offline."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from diffstyler.errors import UserError
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


# --------------------------------------------------------------------------------------------
# Single-file checkpoints: configs from `model.model.config`, prediction type
# --------------------------------------------------------------------------------------------


def original_unet_key(key: str) -> str:
    """A diffusers UNet key in the original Stable Diffusion (LDM) layout, for SD's block layout
    (2 layers per block, so 3 LDM slots per down block)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top_level = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in top_level:
        return top_level[key]
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda i, j: f"input_blocks.{3 * i + j + 1}.0.", True),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda i, j: f"input_blocks.{3 * i + j + 1}.1.", False),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda i: f"input_blocks.{3 * (i + 1)}.0.op.", False),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda i, j: f"output_blocks.{3 * i + j}.0.", True),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda i, j: f"output_blocks.{3 * i + j}.1.", False),
        # up_blocks.0 has no attention, so its upsampler sits one slot earlier.
        (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda i: f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", False),
        (r"mid_block\.resnets\.(\d+)\.", lambda j: f"middle_block.{2 * j}.", True),
        (r"mid_block\.attentions\.0\.", lambda: "middle_block.1.", False),
    ]
    for pattern, place, is_resnet in rules:
        match = re.match(pattern, key)
        if match:
            rest = key[match.end():]
            if is_resnet:
                rest = _original_resnet_part(rest)
            return place(*(int(group) for group in match.groups())) + rest
    raise AssertionError(f"no LDM name for UNet key {key}")


def _original_resnet_part(name: str) -> str:
    renames = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    first, _, rest = name.partition(".")
    return f"{renames[first]}.{rest}"


def original_vae_key(key: str, n_blocks: int) -> str:
    """A diffusers VAE key in the LDM layout (decoder blocks are numbered the other way round)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top_level = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in top_level:
        return top_level[key]
    rules = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda i, j: f"encoder.down.{i}.block.{j}."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda i: f"encoder.down.{i}.downsample."),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda i, j: f"decoder.up.{n_blocks - 1 - i}.block.{j}."),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda i: f"decoder.up.{n_blocks - 1 - i}.upsample."),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda part, j: f"{part}.mid.block_{int(j) + 1}."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.", lambda part: f"{part}.mid.attn_1."),
    ]
    for pattern, place in rules:
        match = re.match(pattern, key)
        if match:
            groups = [int(g) if g.isdigit() else g for g in match.groups()]
            rest = key[match.end():].replace("conv_shortcut", "nin_shortcut")
            attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
            for diffusers_name, ldm_name in attention.items():
                if rest.startswith(diffusers_name + "."):
                    rest = ldm_name + rest[len(diffusers_name):]
            return place(*groups) + rest
    raise AssertionError(f"no LDM name for VAE key {key}")


def write_original_layout_checkpoint(pipe, path: Path) -> Path:
    """Save `pipe`'s UNet, VAE and text encoder as ONE original-layout `.safetensors` file, the
    format community checkpoints come in (diffusers can read it but has no writer)."""
    from safetensors.torch import save_file

    tensors = {}
    for key, value in pipe.unet.state_dict().items():
        tensors["model.diffusion_model." + original_unet_key(key)] = value
    n_blocks = len(pipe.vae.config.down_block_types)
    for key, value in pipe.vae.state_dict().items():
        ldm_key = original_vae_key(key, n_blocks)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key):
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        tensors["first_stage_model." + ldm_key] = value
    for key, value in pipe.text_encoder.state_dict().items():
        # The CLIP (SD 1.x-style) text-encoder layout: the transformers names under one prefix.
        tensors["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    save_file({key: value.contiguous().clone() for key, value in tensors.items()}, str(path))
    return path


@pytest.fixture(scope="module", params=["tiny", "tiny-sd15"])
def tiny_folder_and_single_file(request, tmp_path_factory):
    """A tiny model as a diffusers folder (its configs) and as one original-layout file (its weights):
    `tiny` (SD 2.1-base's topology) and `tiny-sd15` (SD 1.5's layout: 8 heads, convolutional
    projections, 768-wide text: the layout of most community single files)."""
    base = tmp_path_factory.mktemp("single_file")
    pipe = build_tiny_pipeline(name=request.param)
    pipe.save_pretrained(str(base / "folder"))
    return base / "folder", write_original_layout_checkpoint(pipe, base / f"{request.param}.safetensors")


@pytest.mark.slow
def test_single_file_loads_offline_with_the_configs_of_the_named_folder(
    tiny_folder_and_single_file, no_network, unet_probe
):
    """Caught: a single file loaded with other configs than `model.model.config` names (another
    layout, head count or projection), or weights not converted from the original layout."""
    folder, single_file = tiny_folder_and_single_file
    from_file = load_pipeline(ModelSpec(name=str(single_file), config=str(folder)))
    from_folder = load_pipeline(ModelSpec(name=str(folder)))
    assert type(from_file) is type(from_folder) is StableDiffusionPipeline
    for component in ("unet", "vae", "text_encoder"):
        weights, expected = getattr(from_file, component).state_dict(), getattr(from_folder, component).state_dict()
        assert weights.keys() == expected.keys(), component
        for name, weight in weights.items():
            assert torch.equal(weight, expected[name].to(weight.dtype).reshape(weight.shape)), f"{component}.{name}"
    assert (unet_probe(from_file.unet) - unet_probe(from_folder.unet)).abs().max() < 1e-6
    assert from_file.scheduler.config.prediction_type == "epsilon"
    assert no_network == []


def write_cross_attention_only_file(path: Path, width: int) -> Path:
    """A single file holding one original-layout cross-attention key of this text width (all the
    family detection reads); the name says nothing about the family."""
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(2, width)}, str(path))
    return path


@pytest.mark.parametrize("width, pipeline_class, config", [
    (768, StableDiffusionPipeline, "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    (1024, StableDiffusionPipeline, DEFAULT_MODEL),
    (2048, StableDiffusionXLPipeline, "stabilityai/stable-diffusion-xl-base-1.0"),
])
def test_single_file_without_config_uses_its_familys_configs_read_from_its_tensors(width, pipeline_class, config, tmp_path,
                                                                                  monkeypatch):
    """Caught: the family guessed from the file name, or SD 2's 768-px v-prediction configs (what
    diffusers would guess for any SD 2.x file, from a repository that no longer exists) for SD 2.1-base."""
    calls = []

    def record(cls, path, **kwargs):
        calls.append((cls, kwargs))
        raise OSError("stop after recording the call")

    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        monkeypatch.setattr(cls, "from_single_file", classmethod(record))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = write_cross_attention_only_file(tmp_path / "model.safetensors", width)
    with pytest.raises(ModelLoadError):
        load_pipeline(ModelSpec(name=str(checkpoint)))
    ((cls, kwargs),) = calls
    assert cls is pipeline_class and kwargs["config"] == config
    assert kwargs["local_files_only"] is True


def test_single_file_of_no_known_family_asks_for_its_configs(tmp_path):
    checkpoint = write_cross_attention_only_file(tmp_path / "model.safetensors", 32)
    with pytest.raises(ModelLoadError, match=r"cross-attention width 32.*model\.model\.config") as error:
        load_pipeline(ModelSpec(name=str(checkpoint)))
    assert "\n" not in str(error.value)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot read the checkpoint file"):
        load_pipeline(ModelSpec(name=str(broken)))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_prediction_type_overrides_the_schedulers(prediction_type):
    pipe = load_pipeline(ModelSpec("tiny", prediction_type=prediction_type))
    assert pipe.scheduler.config.prediction_type == prediction_type


def test_prediction_type_none_keeps_the_models_own():
    assert load_pipeline(ModelSpec("tiny")).scheduler.config.prediction_type == "epsilon"


def test_unknown_prediction_type_names_the_key():
    with pytest.raises(UserError, match=r"model\.model\.prediction_type.*v_prediction"):
        ModelSpec("tiny", prediction_type="velocity")
