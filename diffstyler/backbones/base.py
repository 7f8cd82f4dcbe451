"""What a denoiser is to the method: the interface every kind of model implements.

The method (invert, denoise with injection, fuse, decode) is written once, against `Backbone`. A
backbone owns everything that depends on the kind of denoiser:

- its components and family (`family`, `denoiser`: the module the style LoRAs live on);
- images and text: `encode_images`, `decode_latents`, `encode_prompts`, `size_conditioning`;
- one batch of rows: `predict(latents, timestep, conditioning)` on the latent grid, whatever the
  denoiser reads inside (a UNet reads the grid, a transformer packed tokens);
- the sampler: `schedule(steps)` gives a `sampling.Schedule` (DDIM, flow-matching Euler) whose
  `step` denoises and whose inversion climbs back at the same timesteps;
- where the method hooks in: the `LayerMap` (layers in execution order and the rules the
  injection defaults are written in), `feature_site` and `attention_sites` (modules and which part
  of their output holds the image tokens: text tokens are never injected);
- training: timesteps drawn as the model was trained, the noised latents and the loss's target.

How a kind is recognised and loaded, and how its LoRA files are written, is its `BackboneKind`.

A new kind of denoiser is one module that subclasses `Backbone` (`unet.py`, `mmdit.py`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch

from diffstyler.conditioning import Conditioning
from diffstyler.errors import config_error

FeatureSiteName = Literal["output", "residual"]
AttentionKind = Literal["self", "cross"]
LayerSelection = Sequence[Union[int, str]]

# Rule names the injection's layer settings accept instead of numbers, on every backbone.
FEATURE_RULES = ("paper", "pnp")
ATTENTION_RULES = ("all", "from_pnp")
STYLEID_RULES = ("styleid",)  # StyleID's self-attention layers (`methods.styleid`)


@dataclass(frozen=True)
class ModelFamily:
    """The family of a loaded model.

    name: "SD 1.x", "SD 2.x", "SDXL", "SD 3.5", "FLUX.1"; None for a layout of no known family (the
      `tiny` model: SD 2.1-base's blocks with 32-wide text embeddings).
    prediction_type: what the denoiser predicts: "epsilon", "v_prediction", or "flow" (the velocity
      of rectified flow).
    text_width: the width of the text embeddings the denoiser reads (cross-attention or joint attention).
    """

    name: Optional[str]
    prediction_type: str
    text_width: int

    def __str__(self) -> str:
        name = self.name or f"text width {self.text_width}"
        return f"{name}, {self.prediction_type}"


# --- the layer map ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    """One layer the method can inject into.

    module: its path in the denoiser (`up_blocks.1.resnets.1`, `transformer_blocks.3`).
    attention: whether it has attention over image tokens to inject.
    replaces_state: whether an output-site feature injection replaces the whole hidden state the
      style rows carry (a UNet decoder's resnet: yes; a transformer block, whose text tokens carry
      on beside the image tokens: no). Decides which configured sites can have no effect.
    attention_first: whether the layer's attention runs before its feature site (a transformer
      block's attention is inside it; a UNet decoder layer's resnet runs before its transformer).
    """

    module: str
    attention: bool
    replaces_state: bool = True
    attention_first: bool = False


class LayerMap:
    """The layers of one denoiser in execution order, and the injection rules over them.

    `rules` maps each name of `FEATURE_RULES` and `ATTENTION_RULES` to layer numbers; the backbone
    derives them from the loaded model (see each backbone's docs for its reasoning). `noun` names
    a layer in messages ("decoder layer", "block").
    """

    def __init__(self, layers: Sequence[Layer], rules: dict[str, list[int]], noun: str = "layer", model: str = "model"):
        missing = set(FEATURE_RULES + ATTENTION_RULES + STYLEID_RULES) - set(rules)
        if missing:
            raise ValueError(f"layer map without the rules {sorted(missing)}")
        self.layers = tuple(layers)
        self.rules = {name: list(numbers) for name, numbers in rules.items()}
        self.noun, self.model = noun, model

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def attention_layers(self) -> list[int]:
        return [index for index, layer in enumerate(self.layers) if layer.attention]

    def rule(self, name: str) -> list[int]:
        return list(self.rules[name])

    def execution_order(self) -> list[tuple[int, str]]:
        """(layer, "feature" | "attention") in the order the denoiser runs them."""
        order = []
        for index, layer in enumerate(self.layers):
            parts = ["feature", "attention"] if not layer.attention_first else ["attention", "feature"]
            order += [(index, part) for part in parts if part == "feature" or layer.attention]
        return order

    def describe(self) -> str:
        attention = self.attention_layers
        return f"{self.noun}s 0-{len(self.layers) - 1}, with attention: {ranges(attention) if attention else 'none'}"

    def feature_layers(self, selection: LayerSelection, key: str = "model.injection.feature_layers") -> list[int]:
        """Layer numbers, or one rule name (`paper`, `pnp`), checked against this map."""
        layers = self._select(selection)
        for layer in layers:
            if not 0 <= layer < len(self.layers):
                raise config_error(key, f"{self.noun} {layer} does not exist (this {self.model}'s {self.noun}s: 0-{len(self.layers) - 1})")
        return layers

    def attention_layer_numbers(self, selection: LayerSelection, key: str = "model.injection.attention_layers") -> list[int]:
        """Layer numbers, or one rule name (`all`, `from_pnp`), checked: each must have attention."""
        layers = self._select(selection)
        for layer in layers:
            if layer not in self.attention_layers:
                raise config_error(key, f"{self.noun} {layer} has no attention (this {self.model}'s layers with attention: "
                                        f"{ranges(self.attention_layers)})")
        return layers

    def _select(self, selection: LayerSelection) -> list[int]:
        names = [item for item in selection if isinstance(item, str)]
        if names:
            return self.rule(names[0])
        return [int(layer) for layer in selection]


def trim_to_tokens(latents: torch.Tensor, token_cells: int) -> torch.Tensor:
    """Latents [..., h, w] cut to whole tokens of `token_cells` x `token_cells` latent cells."""
    height, width = latents.shape[-2:]
    return latents[..., : height - height % token_cells, : width - width % token_cells]


def check_layer_selection(selection: Optional[LayerSelection], rules: tuple[str, ...], key: str) -> None:
    """What can be checked without a model: layer numbers >= 0, or exactly one known rule name."""
    if selection is None:
        raise config_error(key, f"give layer numbers or one of: {', '.join(rules)}")
    names = [item for item in selection if isinstance(item, str)]
    for name in names:
        if name not in rules:
            raise config_error(key, f"unknown layer rule {name!r}; give layer numbers or one of: {', '.join(rules)}")
    if names and len(selection) != 1:
        raise config_error(key, f"a rule name stands alone; got {list(selection)}")
    for layer in selection:
        if not isinstance(layer, str) and layer < 0:
            raise config_error(key, f"layer {layer} does not exist (layers count from 0)")


def ranges(numbers: Sequence[int]) -> str:
    """[3, 4, 5, 7] as "3-5, 7"."""
    parts, start = [], None
    for index, number in enumerate(numbers):
        if start is None:
            start = number
        if index + 1 == len(numbers) or numbers[index + 1] != number + 1:
            parts.append(str(start) if start == number else f"{start}-{number}")
            start = None
    return ", ".join(parts)


# --- hook sites ----------------------------------------------------------------------------------

# inject(values) -> values with the style rows replaced by (or blended with) their reference rows'.
Inject = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Site:
    """A module whose output the injection rewrites, and where in that output the image tokens are.

    part:
      "tensor"      the output is one tensor, every position of it an image position (a UNet
                    resnet or convolution; a projection that reads image tokens only);
      "tail"        the output is one tensor [rows, tokens, width] whose last `image_tokens`
                    tokens are the image's (a projection over [text; image] tokens);
      "image"       the output is a pair (text tokens, image tokens): the second is rewritten
                    (a transformer block's output);
      "image_delta" the same pair, but what is rewritten is the block's change of the image
                    tokens (its output minus its input `hidden_states`): the residual branch.
    """

    key: str
    kind: Literal["feature", "attention"]
    module: torch.nn.Module
    part: Literal["tensor", "tail", "image", "image_delta"] = "tensor"

    def rewrite(self, args: tuple, kwargs: dict, output: Any, inject: Inject, image_tokens: int) -> Any:
        """The module's output with its image positions passed through `inject`."""
        if self.part == "tensor":
            return inject(output)
        if self.part == "tail":
            rewritten = output.clone()
            rewritten[:, -image_tokens:] = inject(output[:, -image_tokens:])
            return rewritten
        text, image = output
        if self.part == "image":
            return text, inject(image)
        before = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        change = image - before
        new = inject(change)
        # The rows `inject` leaves alone (the reference rows) keep their output bit for bit; the
        # others become their input plus the new change, whatever their own change was.
        untouched = (new == change).flatten(1).all(1).view(-1, *[1] * (image.dim() - 1))
        return text, torch.where(untouched, image, before + new)

    def values(self, args: tuple, kwargs: dict, output: Any, image_tokens: int) -> torch.Tensor:
        """The values `rewrite` would pass to `inject` (what a recording keeps)."""
        seen = []
        self.rewrite(args, kwargs, output, lambda values: seen.append(values) or values, image_tokens)
        return seen[0]


# --- the interface ---------------------------------------------------------------------------------

class Backbone(abc.ABC):
    """A loaded diffusers pipeline as the method sees it. `pipe` stays reachable."""

    kind: str = ""
    sampler_name: str = ""  # the sampler's name in A1111 and A1111-Forge ("DDIM", "Euler"), recorded in outputs' settings

    def __init__(self, pipe: Any):
        self.pipe = pipe

    # -- identity and geometry -------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The module that denoises (a UNet, a transformer); style LoRAs are its adapters."""

    @property
    @abc.abstractmethod
    def family(self) -> ModelFamily:
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the denoiser computes in (diffusers reads it from the first floating-point
        weight: a quantized model's compute dtype, not its storage's)."""
        return self.denoiser.dtype

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype of the latents between denoiser calls: inversion trajectories, sampler steps,
        the fusion with the content. The denoiser's, unless a backbone keeps them in float32."""
        return self.dtype

    @property
    @abc.abstractmethod
    def lora_width(self) -> int:
        """The width a LoRA file is checked by (`lora.lora_target`): a UNet's cross-attention text
        width, a transformer's attention width."""

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [encoder for encoder in (getattr(self.pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3"))
                if encoder is not None]

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell (the VAE's downscaling)."""
        return int(self.pipe.vae_scale_factor)

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this (the latent grid, times a transformer's patch)."""
        return self.latent_factor * self.token_cells

    @property
    @abc.abstractmethod
    def latent_channels(self) -> int:
        ...

    @property
    @abc.abstractmethod
    def native_resolution(self) -> int:
        """The side in pixels the model was trained at."""

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.latent_factor, width // self.latent_factor

    token_cells: int = 1  # latent cells per side of one image token (a transformer's patch)

    def image_tokens(self, latent_height: int, latent_width: int) -> int:
        """How many image tokens a latent of this size is to the denoiser (a UNet: its cells)."""
        return (latent_height // self.token_cells) * (latent_width // self.token_cells)

    def latent_mask(self, mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """A pixel mask [H, W] on the latent grid [h, w] (eq. 6), decided per image token: a token
        is in when any of its pixels is, so that a transformer's token is never half in."""
        from diffstyler.masks import mask_to_latent

        cells = self.token_cells
        tokens = mask_to_latent(mask, (latent_size[0] // cells, latent_size[1] // cells))
        return tokens.repeat_interleave(cells, 0).repeat_interleave(cells, 1) if cells > 1 else tokens

    def trim_to_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents cut to whole tokens (a transformer drops a last odd row or column of cells)."""
        return trim_to_tokens(latents, self.token_cells)

    # -- images and text ---------------------------------------------------------------------------

    @abc.abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents of pixels in [-1, 1] (the VAE posterior's mean, scaled as the denoiser reads it)."""

    @abc.abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1], float32."""

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning, one row each, as the family's own pipeline encodes them."""

    def size_conditioning(self, conditioning: Conditioning, size: tuple[int, int]) -> Conditioning:
        """The conditioning for an image of `size` (height, width in pixels): SDXL adds its size as
        time ids; families without size conditioning return it unchanged."""
        return conditioning

    # -- one call ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning,
                guidance: Optional[float] = None) -> torch.Tensor:
        """The denoiser's output for rows of latents [B, C, h, w] at one timestep (the schedule's
        `timesteps[i]`), on the latent grid. `guidance`: the scale for a guidance-distilled model's
        guidance embedding (ignored by models that guide with negative rows)."""

    @property
    def guidance_embedded(self) -> bool:
        """Whether the denoiser reads the guidance scale as an input (a guidance-distilled model):
        then every pass, the inversion's too, depends on it."""
        return False

    def negative_rows(self, guidance_scale: float) -> bool:
        """Whether classifier-free guidance runs a row for the negative prompt beside each style's
        row (SD, SDXL, SD 3.5 unless the scale is 1; never on a guidance-distilled FLUX.1)."""
        return guidance_scale != 1.0

    def a1111_sampling_fields(self, guidance_scale: float) -> dict[str, Any]:
        """The sampler and the guidance as A1111 and A1111-Forge write them in a PNG's `parameters`
        (and read them back into their UI): "Sampler", then "CFG scale", the classifier-free
        guidance scale of the negative rows."""
        return {"Sampler": self.sampler_name, "CFG scale": guidance_scale}

    @property
    def default_steps(self) -> int:
        return 50

    @property
    def default_guidance_scale(self) -> float:
        return 10.5

    # -- sampling ------------------------------------------------------------------------------------

    inversion_solvers: tuple[str, ...] = ("euler",)  # `sampling.INVERSION_SOLVERS` this sampler has
    default_inversion_solver: str = "euler"

    def solver(self, solver: Optional[str]) -> str:
        """The inversion solver a setting names (None: this model's default)."""
        return self.default_inversion_solver if solver is None else solver

    @abc.abstractmethod
    def schedule(self, steps: int, image_tokens: Optional[int] = None, solver: Optional[str] = None) -> Any:
        """The sampler's schedule for `steps` steps (`sampling.DDIMSchedule`, `sampling.FlowSchedule`);
        `image_tokens`: the image's size to the denoiser, for schedules that shift with it; `solver`:
        how its inversion integrates (one of `inversion_solvers`; None: the default)."""

    def check_sampling(self, steps: int, solver: Optional[str], key_prefix: str = "model.sampling.") -> None:
        """One line for sampling settings this model cannot run (before anything is computed)."""
        if self.solver(solver) not in self.inversion_solvers:
            raise config_error(f"{key_prefix}inversion_solver", f"{solver!r} is not for {self.sampler_name} sampling "
                                                                 f"({self.family.name or 'this model'}): use {', '.join(self.inversion_solvers)}")

    def inversion_level(self, step: int) -> int:
        """The trajectory level whose activations the inversion computed at `timesteps[step]`: DDIM
        evaluates the move up to a level at the level below (the clean end has no timestep), so
        step + 1; flow matching the step's own level."""
        return step

    # -- where the method hooks in ---------------------------------------------------------------

    @abc.abstractmethod
    def layer_map(self) -> LayerMap:
        ...

    @abc.abstractmethod
    def feature_site(self, layer: int, where: FeatureSiteName) -> Site:
        ...

    @abc.abstractmethod
    def attention_sites(self, layer: int, kind: AttentionKind, projections: tuple[str, ...] = ("to_q", "to_k")) -> list[Site]:
        """The projections (default: query and key) of a layer's attention over image tokens, of
        every attention module of that kind in the layer."""

    def attention_kinds(self) -> tuple[str, ...]:
        """The attention kinds the model has: a UNet self- and cross-attention, a transformer one
        joint attention (counted as "self": image queries and keys)."""
        return ("self", "cross")

    # -- training ------------------------------------------------------------------------------------

    @abc.abstractmethod
    def draw_training_timesteps(self, count: int, generator: torch.Generator, latent_shape: Sequence[int]) -> torch.Tensor:
        """`count` training timesteps drawn from `generator` as the model was trained."""

    @abc.abstractmethod
    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The latents noised to `timesteps` (the forward process)."""

    @abc.abstractmethod
    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser learns to predict at the noised latents (epsilon, v, the velocity)."""

    def training_size_conditioning(self, conditioning: Conditioning, original: tuple[int, int],
                                   corners: list[tuple[int, int]], target: tuple[int, int]) -> Conditioning:
        """The conditioning of a training batch of crops (SDXL: each crop's size and corner as time
        ids); families without size conditioning return it unchanged."""
        return conditioning


# --- how a kind of model is recognised and loaded ----------------------------------------------------

@dataclass(frozen=True)
class BackboneKind:
    """What `models.load_pipeline` needs to know of one kind of denoiser; each backbone module
    defines one (`unet.UNET`, `mmdit.MMDIT`).

    backbone: the `Backbone` subclass that wraps a loaded pipeline of this kind.
    families: what the kind covers, for messages ("SD 1.x, SD 2.x, SDXL").
    denoiser_classes: the diffusers model classes of its denoiser.
    random_models: names of the models built here with random weights (`tiny`, `sd21-random`, ...).
    build_random(name, seed): such a model.
    random_lora_width(name): the `Backbone.lora_width` of such a model (LoRA checks before it is built).
    pipeline_class_for_index(index): the pipeline class for a `model_index.json`, None if not this kind.
    single_file(shapes): (family, config hub id, pipeline class) for a single file's tensor shapes,
      (None, why not) when its tensors are of this kind but no family is known, or None when not this kind.
    prepare(pipe, prediction_type): what loading does after the weights (the sampler's scheduler).
    loading_kwargs(cls): extra `from_pretrained` arguments for a pipeline class.
    lora_width_from_config(config): the text width a denoiser's config reads (LoRA checks).
    single_file_lora_width(shapes): the same for a single file's tensor shapes (None: not this kind).
    default_lora_targets: the attention's Q/K/V projections a style LoRA trains by default (the paper's).
    lora_pipeline_class(denoiser): the diffusers pipeline class whose `save_lora_weights` writes and
      `load_lora_weights` reads LoRA files of this denoiser (keys prefixed `denoiser_subfolder`).
    """

    backbone: type
    families: str
    denoiser_classes: tuple[type, ...]
    random_models: tuple[str, ...]
    build_random: Callable[[str, int], Any]
    random_lora_width: Callable[[str], int]
    pipeline_class_for_index: Callable[[dict], Optional[type]]
    single_file: Callable[[dict], Optional[tuple]]
    prepare: Callable[[Any, Optional[str]], None]
    loading_kwargs: Callable[[type], dict]
    denoiser_subfolder: str
    lora_width_from_config: Callable[[dict], Optional[int]]
    single_file_lora_width: Callable[[dict], Optional[int]]
    family_for_width: Callable[[int], Optional[str]]
    default_lora_targets: tuple[str, ...]
    lora_pipeline_class: Callable[[torch.nn.Module], type]
