"""Low VRAM on the tiny model (`diffstyler.memory`): VAE slicing and CPU offload give the same pixels,
VAE tiling gives each tile's untiled decoding blended over the overlaps, and only tiling, where it
applies, reaches the settings and the inversion cache key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import cpu_offload
from PIL import Image

from diffstyler import DiffStylerPipeline, InjectionConfig
from diffstyler.data.jobs import StyleEntry, StylizeDataModule
from diffstyler.errors import UserError
from diffstyler.memory import enable_offload, execution_device, group_onload_device
from diffstyler.models import ModelSpec, decode_latents, encode_images
from diffstyler.predictor import StylizePredictor
from diffstyler.stylize import SamplingConfig
from diffstyler.injection import InjectionConfig
from tests.helpers import CONTENT, MASK, inversion_requests, write_random_lora, write_transformer_lora

FAST = dict(num_inference_steps=4, injection=InjectionConfig(feature_steps=3, attention_steps=2), inversion_substeps=1, resolution=64)
FAST_FLUX = dict(num_inference_steps=4, inversion_substeps=1, resolution=64)


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    return write_random_lora(tmp_path_factory.mktemp("memory_lora") / "ink", seed=1).parent


def styled(pipeline: DiffStylerPipeline) -> np.ndarray:
    return np.asarray(pipeline(CONTENT, masks=[MASK], **FAST).composite)


def offload_sequentially_on_cpu(pipe) -> None:
    """What `enable_sequential_cpu_offload` does, executed on the CPU: diffusers names the device
    "cpu:0", which accelerate 1.15's hooks trip on, so the hooks are attached here as it attaches them."""
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            cpu_offload(component, "cpu", offload_buffers=len(component._parameters) > 0)


@pytest.fixture(scope="module")
def without_offload(lora) -> np.ndarray:
    plain = DiffStylerPipeline.from_pretrained("tiny", progress=False)
    plain.load_style(lora)
    return styled(plain)


@pytest.mark.slow
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_gives_the_same_pixels(lora, without_offload, offload):
    """The offload hooks move the weights while our loop calls the UNet, the VAE's encode / decode and
    the text encoders itself. Caught: inputs placed on the module's `.device` (the CPU, or `meta`
    under sequential offload) instead of the hooks' execution device."""
    offloaded = DiffStylerPipeline.from_pretrained("tiny", progress=False)
    offloaded.load_style(lora)  # before the hooks: diffusers re-enables offload after a LoRA load on its own device
    if offload == "model":
        enable_offload(offloaded.pipe, "model", "cpu")
    else:
        offload_sequentially_on_cpu(offloaded.pipe)
        assert offloaded.denoiser.conv_in.weight.device.type == "meta"  # the hooks hold the weights
    assert np.array_equal(styled(offloaded), without_offload)


def test_vae_slicing_gives_the_same_pixels():
    """Two 128x96 images encoded and decoded in one batch (the predictor inverts a chunk's contents
    together), at a size the tiny VAE would tile; the same pixels up to float error. Caught: the flags crossed (`vae_slicing` turning
    tiling on changes the pixels)."""
    sliced = DiffStylerPipeline.from_pretrained("tiny", vae_slicing=True, progress=False).pipe
    plain = DiffStylerPipeline.from_pretrained("tiny", progress=False).pipe
    assert sliced.vae.use_slicing and not plain.vae.use_slicing
    pixels = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = encode_images(plain, pixels)
    assert torch.allclose(encode_images(sliced, pixels), latents, atol=1e-5)
    # float32 sums differ with the batch size (tests/test_predictor_batches.py): equal within 1e-5
    assert torch.allclose(decode_latents(sliced, latents), decode_latents(plain, latents), atol=1e-5)


def test_vae_tiling_blends_the_untiled_decodings_of_overlapping_tiles():
    """The documented bound: a tiled image equals, away from the tile borders, the untiled decoding of
    its tile, and across a border the linear blend of the two tiles over the overlap (within float
    error). The whole-image difference to untiled decoding is not bounded usefully on random weights:
    each tile's group norms see only that tile. The tiny VAE's tile is its sample size, 64 px (8
    latents), overlapping by 0.25: tiles start every 6 latents, blend over 16 px, keep 48 px.
    Caught: a tile seam (the overlap not blended), and tiling not switched on."""
    vae = DiffStylerPipeline.from_pretrained("tiny", vae_tiling=True, progress=False).pipe.vae
    latents = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(0))  # 128x96 px: 2x3 tiles
    with torch.no_grad():
        tiled = vae.decode(latents).sample
        vae.disable_tiling()
        first, second = vae.decode(latents[..., 0:8, 0:8]).sample, vae.decode(latents[..., 0:8, 6:14]).sample
    assert torch.allclose(tiled[..., :48, :48], first[..., :48, :48], atol=1e-5)
    ramp = torch.arange(16) / 16
    blended = first[..., :48, 48:64] * (1 - ramp) + second[..., :48, 0:16] * ramp
    assert torch.allclose(tiled[..., :48, 48:64], blended, atol=1e-5)


def test_vae_tiling_is_recorded_only_where_it_changes_pixels(lora):
    """A 128 px content is tiled (64 px tiles), a 64 px one is not. Caught: a tiled run reusing an
    untiled run's inversion trajectory or outputs (tiling missing from the cache key, the settings
    hash), and every output of a run with tiling on recorded as tiled."""
    tiled = DiffStylerPipeline.from_pretrained("tiny", vae_tiling=True, progress=False)
    plain = DiffStylerPipeline.from_pretrained("tiny", progress=False)
    small, large = Image.new("RGB", (64, 48)), Image.new("RGB", (128, 96))
    sampling = SamplingConfig(steps=4)

    def settings(pipeline, image):
        return pipeline.pixel_settings(job_at(max(image.size), lora).styles, sampling, InjectionConfig(), 0, max(image.size), True)

    assert settings(tiled, large).recorded(large.size)["VAE tiling"] == "64 px tiles, 0.25 overlap"
    assert "VAE tiling" not in settings(tiled, small).recorded(small.size)
    assert "VAE tiling" not in settings(plain, large).recorded(large.size)
    assert settings(tiled, large).inversion_key(large).digest() != settings(plain, large).inversion_key(large).digest()
    assert settings(tiled, small).inversion_key(small).digest() == settings(plain, small).inversion_key(small).digest()

    hashes = {}
    for tiling in (False, True):
        predictor = StylizePredictor(model=ModelSpec("tiny"), vae_tiling=tiling, inversion_cache=None)
        predictor.configure_model()
        hashes[tiling] = [predictor.settings_hash(job_at(resolution, lora)) for resolution in (64, 128)]
    assert hashes[True][0] == hashes[False][0]
    assert hashes[True][1] != hashes[False][1]


def job_at(resolution: int, lora: Path):
    return StylizeDataModule(content=[str(CONTENT)], styles=[StyleEntry(lora=str(lora))], resolution=resolution).jobs()[0]


def test_a_bad_offload_names_the_key_and_offload_needs_cuda():
    """Caught: a misspelt mode taken for "none" (silently no offload), and offload "enabled" on the
    CPU, where it means nothing."""
    with pytest.raises(UserError, match=r"model\.offload.*none, model, sequential.*'gpu'"):
        StylizePredictor(offload="gpu")
    with pytest.raises(UserError, match=r"offload.*needs a CUDA device, the run is on cpu"):
        DiffStylerPipeline.from_pretrained("tiny", offload="model", device="cpu")
    with pytest.raises(UserError, match=r"offload 'group' needs a CUDA device, the run is on cpu"):
        DiffStylerPipeline.from_pretrained("tiny-flux", offload="group", device="cpu")


# --- SD 3.5 and FLUX.1: group offloading, bfloat16 ------------------------------------------------------

@pytest.fixture(scope="module")
def flux_lora(tmp_path_factory) -> Path:
    return write_transformer_lora(tmp_path_factory.mktemp("memory_flux_lora"), "tiny-flux")


@pytest.mark.slow
@pytest.mark.parametrize("offload", ["group", "group_leaf"])
def test_group_offload_gives_the_same_pixels(flux_lora, offload):
    """diffusers' group offloading on tiny-flux, executed on the CPU (its hooks run as on a GPU, without
    the CUDA stream), the LoRA loaded after the hooks as a predict run loads it. Caught: the hooks
    replacing the blocks' forward so that our injection hooks no longer fire, the adapters loaded
    after offloading left out of the groups, and the VAE group-offloaded (it stays on the device)."""
    results = []
    for mode in ("none", offload):
        pipeline = DiffStylerPipeline.from_pretrained("tiny-flux", progress=False)
        if mode != "none":
            enable_offload(pipeline.pipe, mode, "cpu")
            assert group_onload_device(pipeline.denoiser) == torch.device("cpu") and group_onload_device(pipeline.pipe.vae) is None
        pipeline.load_style(flux_lora, name="style")
        results.append(np.asarray(pipeline(CONTENT, masks=[MASK], **FAST_FLUX).composite))
    assert np.array_equal(results[0], results[1])


def test_inputs_go_to_the_group_offloads_device():
    """Group offloading keeps the weights on the CPU between calls; inputs must go where the hooks
    compute (here the device `cpu:0`, which no weight names). Caught: `execution_device` reading the weights'
    device (the CPU), so that on a GPU every input would be on the wrong device."""
    pipe = DiffStylerPipeline.from_pretrained("tiny-flux", progress=False).pipe
    enable_offload(pipe, "group", torch.device("cpu", 0))
    assert pipe.transformer.x_embedder.weight.device == torch.device("cpu")
    assert execution_device(pipe.transformer) == torch.device("cpu", 0) == execution_device(pipe.text_encoder_2)


@pytest.mark.slow
def test_a_bfloat16_transformer_integrates_in_float32():
    """A bfloat16 tiny-sd3 (its VAE float32, so that both start from one latent): the inversion
    trajectory is float32, and the reconstruction (inversion, then sampling without a style, SD 3.5
    Large's 28 steps) is within 1.2% of the float32 model's (measured 0.83%; with the latents kept in
    bfloat16 between the steps, as the family's own pipeline keeps them: 1.62%). Caught: the latents
    cast to the transformer's dtype between steps, losing bits at each of the 2 x 28 steps."""
    from diffstyler.models import ModelSpec, load_pipeline
    from diffstyler.sampling import sample

    image = Image.open(CONTENT).convert("RGB").resize((64, 64))
    reconstructions = {}
    for dtype in ("float32", "bfloat16"):
        pipeline = DiffStylerPipeline(load_pipeline(ModelSpec("tiny-sd3", dtype=dtype)), progress=False)
        pipeline.pipe.vae.to(torch.float32)  # the same content latent for both: only the transformer differs
        backbone = pipeline.backbone
        sampling = SamplingConfig(steps=28, inversion_substeps=1, inversion_prompt="")
        reference = backbone.encode_prompts([""]).to(dtype=backbone.dtype)
        trajectory = pipeline.trajectories(inversion_requests(pipeline, [image], sampling), reference, sampling)[0]
        assert trajectory.dtype == torch.float32
        schedule = pipeline.schedule(image, sampling)
        reconstructions[dtype] = sample(lambda x, t: backbone.predict(x, t, reference), trajectory[0:1], schedule)
    assert reconstructions["bfloat16"].dtype == torch.float32
    difference = (reconstructions["bfloat16"] - reconstructions["float32"]).norm() / reconstructions["float32"].norm()
    assert difference < 0.012
