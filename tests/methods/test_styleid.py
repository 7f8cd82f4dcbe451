"""StyleID (training-free, from a style image) on the tiny model: the implementation against a
reference loop written from the paper's equations, every setting changing the result, and image
styles through the Python API (alone, and beside a LoRA style in two masks)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image, ImageOps

from diffstyler import DiffStylerPipeline
from diffstyler.backbones.unet import decoder_layers
from diffstyler.images import load_image, resize_to_multiple
from diffstyler.methods import StyleIDConfig, adain
from diffstyler.stylize import SamplingConfig
from tests.helpers import CONTENT, REPO_ROOT, inversion_requests, write_random_lora

STYLE = REPO_ROOT / "data" / "styles" / "waves.png"
STEPS = 6
CALL = dict(num_inference_steps=STEPS, resolution=64, output_type="latent")


@pytest.fixture(scope="module")
def pipe() -> DiffStylerPipeline:
    return DiffStylerPipeline.from_pretrained("tiny", progress=False)


def trajectories(pipe: DiffStylerPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """The content's and the style image's trajectories, as the call inverted them (same store)."""
    content = resize_to_multiple(load_image(CONTENT), 64)
    style = ImageOps.fit(load_image(STYLE), content.size, Image.Resampling.BICUBIC)
    sampling = SamplingConfig(steps=STEPS, guidance_scale=pipe.backbone.default_guidance_scale)
    reference = pipe.backbone.encode_prompts([""])
    return tuple(pipe.trajectories(inversion_requests(pipe, [content, style], sampling), reference, sampling))


class ReferenceSelfAttention:
    """softmax(tau * q_hat k_s^T / sqrt(d)) v_s written out, with q_hat = gamma q_c + (1 - gamma) q_cs:
    StyleID's eq. (query preservation, temperature, the style's keys and values)."""

    def __init__(self, q_c: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor, gamma: float, tau: float):
        self.q_c, self.k_s, self.v_s, self.gamma, self.tau = q_c, k_s, v_s, gamma, tau

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        q_hat = self.tau * (self.gamma * self.q_c + (1 - self.gamma) * attn.to_q(hidden_states))
        heads = attn.heads
        split = lambda x: x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q_hat), split(self.k_s), split(self.v_s)
        probabilities = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out = (probabilities @ v).transpose(1, 2).reshape(hidden_states.shape[0], hidden_states.shape[1], -1)
        return attn.to_out[1](attn.to_out[0](out))


@torch.no_grad()
def reference_styleid(pipe: DiffStylerPipeline, content: torch.Tensor, style: torch.Tensor, config: StyleIDConfig) -> torch.Tensor:
    """StyleID from its equations, on stored trajectories: z_T = AdaIN(z_T^c, z_T^s); at each step t,
    Q_c from the content and K_s, V_s from the style, both at the latent the DDIM inversion evaluated
    t at (the level below), injected into the self-attention of `config.layers`; no text, no
    guidance; diffusers' DDIM step."""
    unet = pipe.unet if hasattr(pipe, "unet") else pipe.pipe.unet
    layers = decoder_layers(unet)
    attentions = {layer: layers.attentions(unet, layer, "self")[0] for layer in config.layers}
    scheduler = DDIMScheduler.from_config(pipe.pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    text = pipe.backbone.encode_prompts([""]).hidden
    latent = adain(content[0:1], style[0:1]) if config.adain else content[0:1].clone()
    for i, t in enumerate(scheduler.timesteps):
        recorded: dict[tuple[int, str], torch.Tensor] = {}
        handles = [getattr(attention, name).register_forward_hook(
            lambda module, args, output, key=(layer, name): recorded.__setitem__(key, output))
            for layer, attention in attentions.items() for name in ("to_q", "to_k", "to_v")]
        unet(content[i + 1 : i + 2], t, encoder_hidden_states=text)
        q_c = {layer: recorded[(layer, "to_q")] for layer in attentions}
        unet(style[i + 1 : i + 2], t, encoder_hidden_states=text)
        kv_s = {layer: (recorded[(layer, "to_k")], recorded[(layer, "to_v")]) for layer in attentions}
        for handle in handles:
            handle.remove()
        processors = {layer: attention.processor for layer, attention in attentions.items()}
        for layer, attention in attentions.items():
            attention.set_processor(ReferenceSelfAttention(q_c[layer], *kv_s[layer], config.gamma, config.tau))
        try:
            noise = unet(latent, t, encoder_hidden_states=text).sample
        finally:
            for layer, attention in attentions.items():
                attention.set_processor(processors[layer])
        latent = scheduler.step(noise, t, latent).prev_sample
    return latent


@pytest.mark.parametrize("config", [StyleIDConfig(), StyleIDConfig(gamma=0.3, tau=1.0, adain=False, layers=[5, 9])])
def test_styleid_equals_a_loop_written_from_its_equations(pipe, config):
    """Caught (each tried): V left the stylized row's own (K alone the style's), the query blend
    reversed (gamma on the stylized query), no temperature, the content and style rows read at z_t
    instead of the level the inversion evaluated t at, no AdaIN. (AdaIN's std, biased or not, is a
    common factor of both latents' stds: not a mistake the result can show.)"""
    ours = pipe(CONTENT, styles=[STYLE], styleid=config, **CALL).images[0]
    content, style = trajectories(pipe)
    resolved = replace(config, layers=decoder_layers(pipe.pipe.unet).attention_layer_numbers(config.layers))
    theirs = reference_styleid(pipe, content, style, resolved)
    assert (ours - theirs).abs().max().item() < 1e-4 * max(1.0, theirs.abs().max().item())


def test_the_authors_layers_and_their_place_on_every_map(pipe):
    """SD's decoder layers 7-11 (the authors'); SDXL's 1-5; the last 5/12 of a transformer's blocks."""
    from diffstyler.backbones.mmdit import transformer_layer_map
    from diffstyler.models import build_tiny_pipeline

    assert decoder_layers(pipe.pipe.unet).rule("styleid") == [7, 8, 9, 10, 11]
    assert decoder_layers(build_tiny_pipeline(name="tiny-sdxl").unet).rule("styleid") == [1, 2, 3, 4, 5]
    assert transformer_layer_map(["b"] * 57).rule("styleid") == list(range(33, 57))
    assert transformer_layer_map(["b"] * 24).rule("styleid") == list(range(14, 24))


@pytest.fixture(scope="module")
def default_latent(pipe) -> torch.Tensor:
    return pipe(CONTENT, styles=[STYLE], **CALL).images[0]


@pytest.mark.slow
@pytest.mark.parametrize("change", [dict(gamma=0.5), dict(tau=1.0), dict(adain=False)] + [
    dict(layers=[layer for layer in range(7, 12) if layer != dropped]) for dropped in range(7, 12)])
def test_every_setting_and_every_layer_changes_the_result(pipe, default_latent, change):
    """Caught: a setting read nowhere, or a layer whose injection has no effect."""
    changed = pipe(CONTENT, styles=[STYLE], styleid=StyleIDConfig(**change), **CALL).images[0]
    assert (changed - default_latent).abs().max().item() > 1e-4


def test_the_style_image_alone_stylizes_and_the_settings_say_how(pipe):
    """A style image, no LoRA, no training. Caught: an image style run through DiffStyler (a
    negative row, the LoRA path), or the method missing from the settings."""
    seen = []
    handle = pipe.pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        result = pipe(CONTENT, styles=[str(STYLE)], num_inference_steps=STEPS, resolution=64)
    finally:
        handle.remove()
    assert seen[-STEPS:] == [3] * STEPS  # content row, style row, stylized row: no negative row
    style = result.settings["Styles"][0]
    assert (style["method"], style["lora"], style["name"]) == ("styleid", None, "waves")
    assert result.settings["StyleID"] == {"gamma": 0.75, "tau": 1.5, "adain": True, "layers": [7, 8, 9, 10, 11]}
    assert "image_sha256" in style and "Lora hashes" not in result.settings
    assert result.images[0].size == resize_to_multiple(load_image(CONTENT), 64).size


def test_a_pil_image_is_a_style_too(pipe):
    by_path = pipe(CONTENT, styles=[STYLE], **CALL).images[0]
    by_image = pipe(CONTENT, styles=[Image.open(STYLE)], **CALL).images[0]
    assert torch.equal(by_path, by_image)


@pytest.mark.slow
def test_a_lora_style_and_an_image_style_in_two_masks(pipe, tmp_path):
    """DiffStyler in one mask, StyleID in another, one call: the photo's pixels outside both masks,
    and each style's latent equal to its one-style call. Caught: rows of one method read by the
    other's hooks (a LoRA row given the style's keys, an image row the reference's features), or
    the composite taking the intersection of the masks."""
    lora = write_random_lora(tmp_path / "ink", seed=1).parent
    pipe.load_style(lora, name="ink")
    left, right = np.zeros((48, 64), bool), np.zeros((48, 64), bool)
    left[:, :24], right[:, 40:] = True, True
    styles = ["ink", str(STYLE)]
    common = dict(num_inference_steps=STEPS, resolution=64)
    result = pipe(CONTENT, styles=styles, masks=[left, right], **common)
    original = np.asarray(resize_to_multiple(load_image(CONTENT), 64))
    outside = ~(left | right)
    assert np.array_equal(np.asarray(result.composite)[outside], original[outside])
    assert not np.array_equal(np.asarray(result.composite)[right], original[right])
    together = pipe(CONTENT, styles=styles, masks=[left, right], output_type="latent", **common).images
    for latent, style, mask in zip(together, styles, (left, right)):
        alone = pipe(CONTENT, styles=[style], masks=[mask], output_type="latent", **common).images[0]
        assert (latent - alone).abs().max().item() <= 1e-5 * max(1.0, alone.abs().max().item()), style
    assert [style["method"] for style in result.settings["Styles"]] == ["diffstyler", "styleid"]


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
@pytest.mark.slow
def test_styleid_runs_on_the_transformers(name):
    """Caught: StyleID's sites or levels assuming a UNet (the transformer's joint attention, the flow
    inversion's own level)."""
    transformer = DiffStylerPipeline.from_pretrained(name, progress=False)
    result = transformer(CONTENT, styles=[STYLE], num_inference_steps=STEPS, resolution=64)
    assert result.images[0].size == (64, 48) and result.settings["Styles"][0]["method"] == "styleid"
    other = transformer(CONTENT, styles=[STYLE], styleid=StyleIDConfig(gamma=0.2), num_inference_steps=STEPS, resolution=64)
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(other.images[0]))


def test_bad_styleid_settings_are_one_line():
    with pytest.raises(ValueError, match=r"model.styleid.gamma.*must be in 0..1, got 1.5"):
        StyleIDConfig(gamma=1.5)
    with pytest.raises(ValueError, match=r"model.styleid.tau.*finite number, got nan"):
        StyleIDConfig(tau=float("nan"))
    with pytest.raises(ValueError, match=r"model.styleid.layers.*unknown layer rule 'paper'"):
        StyleIDConfig(layers="paper")
