"""SD 3.5 and FLUX.1: a multimodal diffusion transformer (MMDiT), sampled by flow matching.

Both read the latent as tokens of 2x2 latent cells and attend jointly over text and image tokens:
- SD 3.5 (`SD3Transformer2DModel`): joint blocks (image and text streams, one joint attention);
  SD 3.5 Medium adds a second self-attention over the image tokens (`attn2`) in its first blocks.
  Text: CLIP-L and CLIP-G (hidden states and pooled embeddings) and T5; classifier-free guidance
  with negative rows.
- FLUX.1 (`FluxTransformer2DModel`): 19 double-stream blocks (as SD 3.5's joint blocks), then 38
  single-stream blocks over the concatenated [text; image] tokens. Text: CLIP-L's pooled embedding
  and T5. Guidance-distilled: dev reads the guidance scale as an embedding, schnell reads none;
  neither runs negative rows.
Latents stay on the latent grid [B, 16, h, w] everywhere in the method (trajectories, masks,
fusion); `predict` packs them into tokens for FLUX.1 and back.

Sampling is flow matching: x_sigma = (1 - sigma) x_0 + sigma noise, the model predicts the velocity
noise - x_0, a step is Euler (`sampling.FlowSchedule`) and the inversion integrates the same ODE
backwards (Euler, or a second-order step: `sampling.INVERSION_SOLVERS`). The sigmas are the family's
own pipeline's: SD 3.5's scheduler shift, FLUX.1's sigmas shifted by the image's token count.

The layer map is every transformer block in execution order (FLUX.1: the double-stream blocks,
then the single-stream ones). The method's rules over it (docs: model families), reasoned from the
UNet's and from published work on these models:
- `paper` (feature default): the last third of the blocks, where the paper's decoder layers 4-11
  sit in the UNet's depth, and where RF-Solver-Edit and FireFlow share the content's attention
  values (FLUX.1's single-stream blocks 20-37);
- `all` (attention default): the blocks of the second half before those, the transformer's
  "decoder" half as the paper injects attention in the UNet's decoder only. Not the feature
  blocks: a block whose residual branch is injected discards what its own attention did to the
  image tokens, so attention injected there would have no effect;
- `pnp`: the first block of `paper`; `from_pnp`: the blocks after it (the paper's code: features
  in one layer, attention from there on).
Hook sites: a block's feature site is its image tokens (site "output": the block's image-token
output; "residual": the block's change of them, its residual branch); its attention sites are the
query and key projections of the image tokens (`to_q`, `to_k` of the joint attention, and of SD 3.5
Medium's `attn2`); in a single-stream block the projections read [text; image] tokens, and only
the image tokens are rewritten. Text tokens are never injected.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any, Optional, Sequence

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffstyler.backbones.base import AttentionKind, Backbone, BackboneKind, FeatureSiteName, Layer, LayerMap, ModelFamily, Site
from diffstyler.backbones.text import build_tiny_t5_tokenizer, build_tiny_tokenizer
from diffstyler.backbones.unet import decode_with_float32_retry
from diffstyler.conditioning import Conditioning
from diffstyler.memory import execution_device
from diffstyler.sampling import INVERSION_SOLVERS, FlowSchedule

SD35, FLUX = "SD 3.5", "FLUX.1"
PATCH = 2  # both read 2x2 latent cells as one token
# Where a single file's transformer weights are told apart (original key layouts): FLUX.1's
# double-stream blocks, SD 3's joint blocks.
FLUX_SINGLE_FILE_MARK, SD3_SINGLE_FILE_MARK = "double_blocks.", "joint_blocks."
SINGLE_FILE_CONFIGS = {
    "FLUX.1-dev": "black-forest-labs/FLUX.1-dev",
    "FLUX.1-schnell": "black-forest-labs/FLUX.1-schnell",
    "SD 3.5 Large": "stabilityai/stable-diffusion-3.5-large",
    "SD 3.5 Medium": "stabilityai/stable-diffusion-3.5-medium",
}
# The inner width of each family's attention (what its LoRA files' image-stream projections read).
FAMILY_BY_WIDTH = {3072: "FLUX.1", 2432: "SD 3.5 Large", 1536: "SD 3.5 Medium"}


def is_flux(transformer: torch.nn.Module) -> bool:
    return isinstance(transformer, FluxTransformer2DModel)


def inner_width(transformer: torch.nn.Module) -> int:
    config = transformer.config
    return int(config.num_attention_heads * config.attention_head_dim)


class MMDiTBackbone(Backbone):
    """An SD 3.5 or FLUX.1 pipeline: `pipe.transformer`, sampled by flow matching."""

    kind = "mmdit"
    sampler_name = "Euler"  # A1111-Forge's name for the flow-matching Euler step (and ComfyUI's "euler")
    schedule_type = "Simple"  # Forge's (and ComfyUI's "simple") schedule: the model's shifted sigmas, evenly spaced
    inversion_solvers = INVERSION_SOLVERS
    default_inversion_solver = "fireflow"  # second order at Euler's cost (docs: model families, inversion)
    token_cells = PATCH

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def flux(self) -> bool:
        return is_flux(self.pipe.transformer)

    @property
    def guidance_embedded(self) -> bool:
        """FLUX.1-dev reads the guidance scale as an embedding (schnell and SD 3.5 do not)."""
        return bool(self.pipe.transformer.config.get("guidance_embeds", False))

    @property
    def family(self) -> ModelFamily:
        return ModelFamily(FLUX if self.flux else SD35, "flow", int(self.pipe.transformer.config.joint_attention_dim))

    @property
    def variant(self) -> str:
        """FLUX.1-dev / FLUX.1-schnell / SD 3.5 Large / SD 3.5 Medium (by its layout, not its name)."""
        if self.flux:
            return "FLUX.1-dev" if self.guidance_embedded else "FLUX.1-schnell"
        return "SD 3.5 Medium" if self.pipe.transformer.config.get("dual_attention_layers") else "SD 3.5 Large"

    @property
    def lora_width(self) -> int:
        return inner_width(self.pipe.transformer)

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.vae.config.latent_channels)

    @property
    def native_resolution(self) -> int:
        if self.flux:
            return int(self.pipe.default_sample_size) * self.latent_factor
        return int(self.pipe.transformer.config.sample_size) * self.latent_factor

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens of a prompt: the family pipeline's default (FLUX.1-dev 512, schnell and SD 3.5
        256), at most the tokenizer's own length."""
        tokenizer = self.pipe.tokenizer_2 if self.flux else self.pipe.tokenizer_3
        default = 512 if self.flux and self.guidance_embedded else 256
        return min(default, int(tokenizer.model_max_length))

    @property
    def default_steps(self) -> int:
        return {"FLUX.1-dev": 28, "FLUX.1-schnell": 4, "SD 3.5 Large": 28, "SD 3.5 Medium": 40}[self.variant]

    @property
    def default_guidance_scale(self) -> float:
        return {"FLUX.1-dev": 3.5, "FLUX.1-schnell": 0.0, "SD 3.5 Large": 3.5, "SD 3.5 Medium": 4.5}[self.variant]

    def negative_rows(self, guidance_scale: float) -> bool:
        return not self.flux and guidance_scale != 1.0

    def a1111_sampling_fields(self, guidance_scale: float) -> dict[str, Any]:
        """As A1111-Forge writes FLUX.1 and SD 3.5 results: "Sampler: Euler, Schedule type: Simple";
        SD 3.5's guidance scale is the CFG scale; FLUX.1 runs no negative rows ("CFG scale: 1"),
        and dev's embedded guidance is Forge's "Distilled CFG Scale" (schnell reads none)."""
        fields: dict[str, Any] = {"Sampler": self.sampler_name, "Schedule type": self.schedule_type}
        if not self.flux:
            return {**fields, "CFG scale": guidance_scale}
        fields["CFG scale"] = 1.0
        if self.guidance_embedded:
            fields["Distilled CFG Scale"] = guidance_scale
        return fields

    @property
    def latent_dtype(self) -> torch.dtype:
        """float32 whatever the transformer's dtype: a bfloat16 trajectory loses bits at every step
        of the inversion and of the sampling (both integrate one ODE), so the latents stay float32
        and only the transformer's input is cast (`predict`); its output comes back float32."""
        return torch.float32

    # -- images and text ---------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        posterior = vae.encode(pixels.to(device=execution_device(vae), dtype=vae.dtype)).latent_dist
        return (posterior.mean - vae.config.shift_factor) * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return decode_with_float32_retry(vae, latents / vae.config.scaling_factor + vae.config.shift_factor)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The family pipeline's own `encode_prompt`: FLUX.1 T5's hidden states [n, L, 4096] and
        CLIP-L's pooled embedding [n, 768]; SD 3.5 CLIP-L and CLIP-G's penultimate hidden states
        (padded to T5's width) followed by T5's [n, 77 + L, 4096], and both CLIPs' pooled [n, 2048]."""
        device = execution_device(self.pipe.text_encoder)
        if self.flux:
            hidden, pooled, _ = self.pipe.encode_prompt(prompts, prompt_2=None, device=device,
                                                        max_sequence_length=self.max_sequence_length)
        else:
            hidden, _, pooled, _ = self.pipe.encode_prompt(prompts, prompt_2=None, prompt_3=None, device=device,
                                                           do_classifier_free_guidance=False,
                                                           max_sequence_length=self.max_sequence_length)
        return Conditioning(hidden, pooled)

    # -- one call ----------------------------------------------------------------------------------

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning,
                guidance: Optional[float] = None) -> torch.Tensor:
        transformer = self.pipe.transformer
        rows = latents.shape[0]
        latents = latents.to(self.dtype)  # float32 between the calls (`latent_dtype`)
        timesteps = timestep.to(latents.device, torch.float32).reshape(-1).expand(rows)  # one for all rows, or one each
        if not self.flux:
            return transformer(hidden_states=latents, timestep=timesteps, encoder_hidden_states=conditioning.hidden,
                               pooled_projections=conditioning.pooled, return_dict=False)[0].float()
        height, width = latents.shape[-2:]
        tokens = FluxPipeline._pack_latents(latents, rows, latents.shape[1], height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(rows, height // PATCH, width // PATCH, latents.device, latents.dtype)
        text_ids = torch.zeros(conditioning.hidden.shape[1], 3, device=latents.device, dtype=latents.dtype)
        embedded_guidance = None
        if self.guidance_embedded:
            embedded_guidance = torch.full((rows,), 3.5 if guidance is None else float(guidance), device=latents.device, dtype=torch.float32)
        output = transformer(hidden_states=tokens, timestep=timesteps / 1000, guidance=embedded_guidance,
                             pooled_projections=conditioning.pooled, encoder_hidden_states=conditioning.hidden,
                             txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(output, height * self.latent_factor, width * self.latent_factor, self.latent_factor).float()

    # -- sampling ------------------------------------------------------------------------------------

    def schedule(self, steps: int, image_tokens: Optional[int] = None, solver: Optional[str] = None) -> FlowSchedule:
        """The sigmas the family's own pipeline samples at: FLUX.1 linspace(1, 1/N, N) shifted by
        the image's token count (dynamic shifting), SD 3.5 its scheduler's (static shift 3)."""
        self.check_sampling(steps, solver)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        kwargs: dict[str, Any] = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = self.shift_mu(image_tokens or 4096)
        if self.flux:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), **kwargs)
        else:
            scheduler.set_timesteps(steps, **kwargs)
        return FlowSchedule(scheduler.timesteps.float(), scheduler.sigmas.to(torch.float64), self.solver(solver))

    def shift_mu(self, image_tokens: int) -> float:
        config = self.pipe.scheduler.config
        return calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                               config.get("base_shift", 0.5), config.get("max_shift", 1.15))

    # -- where the method hooks in ---------------------------------------------------------------

    @cached_property
    def blocks(self) -> list[torch.nn.Module]:
        transformer = self.pipe.transformer
        return list(transformer.transformer_blocks) + list(getattr(transformer, "single_transformer_blocks", None) or [])

    @cached_property
    def _layers(self) -> LayerMap:
        transformer = self.pipe.transformer
        double = len(transformer.transformer_blocks)
        names = [f"transformer_blocks.{i}" for i in range(double)]
        names += [f"single_transformer_blocks.{i}" for i in range(len(self.blocks) - double)]
        return transformer_layer_map(names)

    def layer_map(self) -> LayerMap:
        return self._layers

    def feature_site(self, layer: int, where: FeatureSiteName) -> Site:
        return Site(f"feature.{layer}", "feature", self.blocks[layer], "image" if where == "output" else "image_delta")

    def attention_kinds(self) -> tuple[str, ...]:
        return ("self",)

    def attention_sites(self, layer: int, kind: AttentionKind, projections: tuple[str, ...] = ("to_q", "to_k")) -> list[Site]:
        block = self.blocks[layer]
        single = layer >= len(self.pipe.transformer.transformer_blocks)
        attentions = [block.attn] + ([block.attn2] if getattr(block, "use_dual_attention", False) else [])
        return [Site(f"{kind}.{layer}.{index}.{projection}", "attention", getattr(attention, projection), "tail" if single else "tensor")
                for index, attention in enumerate(attentions) for projection in projections]

    # -- training ------------------------------------------------------------------------------------

    def draw_training_timesteps(self, count: int, generator: torch.Generator, latent_shape: Sequence[int]) -> torch.Tensor:
        """sigma = shift(sigmoid(n)), n ~ N(0, 1): the logit-normal density SD 3 was trained with
        (and diffusers' and the families' LoRA scripts use), shifted as the family samples (SD 3.5's
        static shift, FLUX.1's shift for the image's token count); as timesteps 1000 sigma."""
        u = torch.sigmoid(torch.randn(count, generator=generator, dtype=torch.float64))
        config = self.pipe.scheduler.config
        if config.get("use_dynamic_shifting", False):
            mu = self.shift_mu(self.image_tokens(*latent_shape[-2:]))
            sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        else:
            shift = float(config.get("shift", 1.0))
            sigma = shift * u / (1 + (shift - 1) * u)
        return (sigma * 1000).float()

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = (timesteps.to(latents.device, torch.float32) / 1000).view(-1, *[1] * (latents.dim() - 1))
        return (1 - sigma) * latents + sigma * noise

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity noise - x_0."""
        return noise - latents


def transformer_layer_map(names: list[str]) -> LayerMap:
    """The blocks in execution order and the rules over them (see the module's docstring)."""
    count = len(names)
    decoder_half = math.ceil(count / 2)
    last_third = math.ceil(2 * count / 3)
    layers = [Layer(name, attention=True, replaces_state=False, attention_first=True) for name in names]
    rules = {
        # A block whose residual is injected discards what its own attention did to the image
        # tokens: attention goes into the blocks of the decoder half before the feature blocks.
        "all": list(range(decoder_half, last_third)),
        "paper": list(range(last_third, count)),
        "pnp": [last_third],
        "from_pnp": list(range(last_third + 1, count)),
        # StyleID's: the last 5/12 of the blocks, as its 7-11 are the last 5 of SD's 12 decoder layers
        "styleid": list(range(count - math.floor(5 * count / 12 + 0.5), count)),
    }
    return LayerMap(layers, rules, noun="block", model="transformer")


# --- random models: the tiny stand-ins, and real sizes for benchmarks ----------------------------

def _clip(width: int, layers: int, heads: int, tokenizer, projection: Optional[int] = None):
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **({"projection_dim": projection} if projection else {}))
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(width: int, layers: int, heads: int, ffn: int, tokenizer) -> T5EncoderModel:
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=width // heads, d_ff=ffn, num_layers=layers, num_heads=heads,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval()  # as from_pretrained loads it


def _vae(channels: tuple[int, ...], scaling: float, shift: float, sample_size: int) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels, latent_channels=16,
                         layers_per_block=1, norm_num_groups=8, sample_size=sample_size, scaling_factor=scaling,
                         shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)


def build_flux(seed: int, guidance: bool = True, double: int = 2, single: int = 4, heads: int = 2, head_dim: int = 16,
               text: int = 32, sample_size: int = 8) -> FluxPipeline:
    """FLUX.1's topology shrunk: `double` double-stream and `single` single-stream blocks, its 16-channel
    VAE (8x), CLIP-L (pooled) and T5, dev's guidance embedding (or schnell's none) and scheduler."""
    tokenizer, t5_tokenizer = build_tiny_tokenizer(), build_tiny_t5_tokenizer()
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16 * PATCH * PATCH, num_layers=double, num_single_layers=single,
                                             attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text,
                                             pooled_projection_dim=text, guidance_embeds=guidance,
                                             axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8))
        vae = _vae((8, 16, 32, 32), 0.3611, 0.1159, 8 * sample_size)
        text_encoder = _clip(text, 2, 2, tokenizer)
        text_encoder_2 = _t5(text, 2, 2, 2 * text, t5_tokenizer)
    finally:
        torch.random.set_rng_state(state)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=guidance, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    if not guidance:  # schnell: no shift
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=t5_tokenizer, transformer=transformer)
    pipe.default_sample_size = sample_size  # FLUX.1's pipeline hard-codes 128 latent cells (1024 px)
    return pipe


def build_sd3(seed: int, layers: int = 6, dual: tuple[int, ...] = (0, 1, 2, 3), heads: int = 2, head_dim: int = 16,
              text: int = 32, sample_size: int = 8) -> StableDiffusion3Pipeline:
    """SD 3.5 Medium's topology shrunk: `layers` joint blocks, the first ones (`dual`) with the extra
    self-attention over image tokens, qk RMS norm, CLIP-L + CLIP-G + T5, the 16-channel VAE and the
    scheduler's static shift 3."""
    tokenizer, t5_tokenizer = build_tiny_tokenizer(), build_tiny_t5_tokenizer()
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(sample_size=sample_size, patch_size=PATCH, in_channels=16, num_layers=layers,
                                            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=2 * text,
                                            caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * text, out_channels=16,
                                            pos_embed_max_size=4 * sample_size, dual_attention_layers=dual, qk_norm="rms_norm")
        vae = _vae((8, 16, 32, 32), 1.5305, 0.0609, 8 * sample_size)
        clip_l = _clip(text, 2, 2, tokenizer, projection=text)
        clip_g = _clip(text, 2, 2, tokenizer, projection=text)
        t5 = _t5(2 * text, 2, 2, 4 * text, t5_tokenizer)
    finally:
        torch.random.set_rng_state(state)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=build_tiny_tokenizer(),
                                    text_encoder_3=t5, tokenizer_3=t5_tokenizer)


# Real widths with random weights, for benchmarks (speed and memory without a download). The text
# encoders have their real widths, CLIP-L and CLIP-G their real depths, T5-XXL 2 of its 24 layers
# (its 4.7 G parameters would not fit beside a transformer in this machine's 24 GB: it runs once per
# prompt, before the transformer). SD 3.5 Medium: 2.2 G transformer parameters (9 GB in float32).
# FLUX.1-dev's widths: `flux-random` has 5 of its 19 double-stream and 10 of its 38 single-stream
# blocks (3.1 G parameters: 12.5 GB in float32, fits this CPU machine), `flux-full-random` all of
# them (11.9 G: 48 GB in float32, 24 GB in bfloat16: for a GPU machine only).
SD35_MEDIUM = dict(layers=24, heads=24, head_dim=64, dual=tuple(range(13)), joint=4096, caption=1536, pooled=2048, pos_embed=384)
FLUX_DEV = dict(heads=24, head_dim=128, joint=4096, pooled=768, axes=(16, 56, 56))
CLIP_L = dict(width=768, layers=12, heads=12, ffn=3072, activation="quick_gelu")
CLIP_G = dict(width=1280, layers=32, heads=20, ffn=5120, activation="gelu")
T5_XXL_SHALLOW = dict(width=4096, layers=2, heads=64, ffn=10240)
REAL_VAE = dict(channels=(128, 256, 512, 512), layers=2, groups=32, sample_size=1024)


def _real_clip(tokenizer, width: int, layers: int, heads: int, ffn: int, activation: str, projection: bool):
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=77, hidden_act=activation,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **({"projection_dim": width} if projection else {}))
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _real_vae(scaling: float, shift: float) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=REAL_VAE["channels"], latent_channels=16,
                         layers_per_block=REAL_VAE["layers"], norm_num_groups=REAL_VAE["groups"],
                         sample_size=REAL_VAE["sample_size"], scaling_factor=scaling, shift_factor=shift,
                         use_quant_conv=False, use_post_quant_conv=False)


def build_real_size(name: str, seed: int) -> Any:
    """`sd35-medium-random`, `flux-random` or `flux-full-random` (see `REAL_SIZE_RANDOM_MODELS`):
    the family's real widths, seeded random weights, the tiny tokenizers (T5's at the family's prompt
    length: FLUX.1-dev 512 tokens, SD 3.5 256)."""
    flux = name.startswith("flux")
    tokenizer, t5_tokenizer = build_tiny_tokenizer(), build_tiny_t5_tokenizer(512 if flux else 256)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        t5 = _t5(T5_XXL_SHALLOW["width"], T5_XXL_SHALLOW["layers"], T5_XXL_SHALLOW["heads"], T5_XXL_SHALLOW["ffn"], t5_tokenizer)
        if flux:
            double, single = (19, 38) if name == "flux-full-random" else (5, 10)
            transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                                 attention_head_dim=FLUX_DEV["head_dim"], num_attention_heads=FLUX_DEV["heads"],
                                                 joint_attention_dim=FLUX_DEV["joint"], pooled_projection_dim=FLUX_DEV["pooled"],
                                                 guidance_embeds=True, axes_dims_rope=FLUX_DEV["axes"])
            vae, clip = _real_vae(0.3611, 0.1159), _real_clip(tokenizer, **CLIP_L, projection=False)
        else:
            m = SD35_MEDIUM
            transformer = SD3Transformer2DModel(sample_size=128, patch_size=PATCH, in_channels=16, num_layers=m["layers"],
                                                attention_head_dim=m["head_dim"], num_attention_heads=m["heads"],
                                                joint_attention_dim=m["joint"], caption_projection_dim=m["caption"],
                                                pooled_projection_dim=m["pooled"], out_channels=16, pos_embed_max_size=m["pos_embed"],
                                                dual_attention_layers=m["dual"], qk_norm="rms_norm")
            vae = _real_vae(1.5305, 0.0609)
            clip_l, clip_g = _real_clip(tokenizer, **CLIP_L, projection=True), _real_clip(tokenizer, **CLIP_G, projection=True)
    finally:
        torch.random.set_rng_state(state)
    if flux:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
        return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                            tokenizer_2=t5_tokenizer, transformer=transformer)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=build_tiny_tokenizer(),
                                    text_encoder_3=t5, tokenizer_3=t5_tokenizer)


REAL_SIZE_RANDOM_MODELS = ("sd35-medium-random", "flux-random", "flux-full-random")
RANDOM_MODELS = {
    "tiny-flux": lambda seed: build_flux(seed),
    "tiny-flux-schnell": lambda seed: build_flux(seed, guidance=False),
    "tiny-sd3": lambda seed: build_sd3(seed),
    **{name: (lambda seed, name=name: build_real_size(name, seed)) for name in REAL_SIZE_RANDOM_MODELS},
}
RANDOM_WIDTHS = {"tiny-flux": 32, "tiny-flux-schnell": 32, "tiny-sd3": 32, "sd35-medium-random": 1536, "flux-random": 3072,
                 "flux-full-random": 3072}


def _pipeline_class_for_index(index: dict) -> Optional[type]:
    transformer = index.get("transformer")
    if not transformer or transformer[-1] is None:
        return None
    return {"FluxTransformer2DModel": FluxPipeline, "SD3Transformer2DModel": StableDiffusion3Pipeline}.get(transformer[-1])


def _single_file(shapes: dict) -> Optional[tuple]:
    keys = list(shapes)
    if any(FLUX_SINGLE_FILE_MARK in key for key in keys):
        variant = "FLUX.1-dev" if any("guidance_in" in key for key in keys) else "FLUX.1-schnell"
        return FLUX, SINGLE_FILE_CONFIGS[variant], FluxPipeline
    if any(SD3_SINGLE_FILE_MARK in key for key in keys):
        variant = "SD 3.5 Medium" if any("x_block.attn2." in key for key in keys) else "SD 3.5 Large"
        return SD35, SINGLE_FILE_CONFIGS[variant], StableDiffusion3Pipeline
    return None


def _single_file_width(shapes: dict) -> Optional[int]:
    for key, shape in shapes.items():
        if key.endswith(("double_blocks.0.img_attn.qkv.weight", "joint_blocks.0.x_block.attn.qkv.weight")):
            return int(shape[-1])
    return None


def _width_from_config(config: dict) -> Optional[int]:
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    return heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else None


def _loading_kwargs(cls: type) -> dict:
    return {}


def _prepare(pipe: Any, prediction_type: Optional[str]) -> None:
    """Flow-matching models keep their own scheduler; a prediction type override means nothing to them."""
    if prediction_type is not None:
        from diffstyler.errors import config_error

        raise config_error("model.model.prediction_type", f"is for SD 1.x / 2.x (epsilon or v); {type(pipe).__name__} "
                                                          "predicts the flow-matching velocity: leave it null")


MMDIT = BackboneKind(
    backbone=MMDiTBackbone,
    families="SD 3.5, FLUX.1",
    denoiser_classes=(SD3Transformer2DModel, FluxTransformer2DModel),
    random_models=tuple(RANDOM_MODELS),
    build_random=lambda name, seed: RANDOM_MODELS[name](seed),
    random_lora_width=lambda name: RANDOM_WIDTHS[name],
    pipeline_class_for_index=_pipeline_class_for_index,
    single_file=_single_file,
    prepare=_prepare,
    loading_kwargs=_loading_kwargs,
    denoiser_subfolder="transformer",
    lora_width_from_config=_width_from_config,
    single_file_lora_width=_single_file_width,
    family_for_width=FAMILY_BY_WIDTH.get,
    default_lora_targets=("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"),
    lora_pipeline_class=lambda transformer: FluxPipeline if is_flux(transformer) else StableDiffusion3Pipeline,
)
