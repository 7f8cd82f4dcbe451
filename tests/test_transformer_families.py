"""SD 3.5 and FLUX.1 from Python, end to end on `tiny-sd3` and `tiny-flux` (the CLI's paths are
tests/cli/test_family_configs.py): a trained style loads in the family's own diffusers pipeline, two
styles in two masks keep the photo outside them and each equals its one-style call, and the default
preset works at any number of steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffstyler import DiffStylerPipeline, train_style
from diffstyler.backbones import backbone_for
from diffstyler.images import load_image, resize_to_multiple
from diffstyler.lora import StyleLoRAConfig
from diffstyler.models import ModelSpec, load_pipeline
from tests.helpers import CONTENT, REPO_ROOT, write_random_lora

FAMILIES = ["tiny-sd3", "tiny-flux"]
STEPS = 6


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(model name, a LoRA trained for 3 steps by `train_style`, a random LoRA, the pipeline with both loaded)."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    trained = train_style(REPO_ROOT / "data" / "style_stripes.png", folder / "trained", steps=3, model=name,
                          prompt="painting of <sss>", lora=StyleLoRAConfig(rank=4), resolution=64, accelerator="cpu", progress=False)
    other = write_random_lora(folder / "random", seed=2, model=name).parent
    pipe = DiffStylerPipeline.from_pretrained(name, progress=False)
    pipe.load_style(trained, name="trained")
    pipe.load_style(other, name="random")
    return name, trained, pipe


def transformer_probe(pipe) -> torch.Tensor:
    backbone = backbone_for(pipe)
    latents = torch.randn(1, 16, 8, 6, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return backbone.predict(latents, torch.tensor(600.0), backbone.encode_prompts(["painting of <sss>"]), 3.5)


@pytest.mark.slow
def test_a_trained_style_loads_in_the_familys_own_pipeline_and_changes_it(family):
    """Caught: a LoRA file the family's `load_lora_weights` reads only in part (one spelling of keys
    per file), or a fit that trained nothing."""
    name, trained, _ = family
    theirs = load_pipeline(ModelSpec(name))
    assert type(theirs).__name__ == {"tiny-sd3": "StableDiffusion3Pipeline", "tiny-flux": "FluxPipeline"}[name]
    before = transformer_probe(theirs)
    theirs.load_lora_weights(str(trained), weight_name="pytorch_lora_weights.safetensors", adapter_name="trained")
    assert len(theirs.transformer.peft_config["trained"].target_modules) >= 6  # the joint attention's Q/K/V, both streams
    assert (transformer_probe(theirs) - before).abs().max().item() > 1e-6


def photo() -> Image.Image:
    return resize_to_multiple(load_image(CONTENT), 64, 16)


@pytest.mark.slow
def test_two_styles_in_two_masks_keep_the_photo_outside_and_each_equals_its_one_style_call(family):
    """Caught: compositing or eq. 6 skipped on the transformer (pixels outside the masks change), a
    mask not on the token grid, or rows of one style read by the other (injection, guidance, packing)."""
    _, _, pipe = family
    left, right = np.zeros((48, 64), bool), np.zeros((48, 64), bool)
    left[:, :24], right[:, 40:] = True, True
    common = dict(num_inference_steps=STEPS, resolution=64)
    result = pipe(CONTENT, styles=["trained", "random"], masks=[left, right], **common)
    original = np.asarray(photo())
    outside = ~(left | right)
    for image in (result.composite, *result.images):
        pixels = np.asarray(image)
        assert pixels.shape == original.shape
        assert np.array_equal(pixels[outside], original[outside])
    assert not np.array_equal(np.asarray(result.composite)[left], original[left])
    together = pipe(CONTENT, styles=["trained", "random"], masks=[left, right], output_type="latent", **common).images
    for latent, name, mask in zip(together, ("trained", "random"), (left, right)):
        alone = pipe(CONTENT, styles=[name], masks=[mask], output_type="latent", **common).images[0]
        assert (latent - alone).abs().max().item() <= 1e-5 * max(1.0, alone.abs().max().item()), name


@pytest.mark.slow
def test_the_default_preset_runs_at_20_steps_and_at_the_familys_own_count(family):
    """The issue's first try: `pipe(photo, num_inference_steps=20)` with the default preset. Caught:
    absolute windows (30 of 20 refused), or a family's default step count not used."""
    name, _, pipe = family
    twenty = pipe(CONTENT, styles=["trained"], num_inference_steps=20, resolution=64)
    assert (twenty.settings["Injection"]["feature_steps"], twenty.settings["Injection"]["attention_steps"]) == (12, 10)
    native = pipe(CONTENT, styles=["trained"], resolution=64)
    steps = {"tiny-sd3": 40, "tiny-flux": 28}[name]  # SD 3.5 Medium's and FLUX.1-dev's own
    assert native.settings["Steps"] == steps and native.settings["Injection"]["feature_steps"] == round(0.6 * steps)
    assert native.images[0].size == photo().size
