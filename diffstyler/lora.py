"""Style LoRAs as named PEFT adapters on ONE UNet, stored in the standard diffusers format.

- `StyleLoRAConfig`: the paper's defaults (rank 16 on the attention's Q/K/V projections).
- `add_style_adapter`: a fresh trainable adapter for `fit`.
- `save_lora` / `load_style_adapter`: `pytorch_lora_weights.safetensors` that the family's
  pipeline (`StableDiffusionPipeline` / `StableDiffusionXLPipeline`) reads with `load_lora_weights`,
  and community LoRAs read by diffusers' own converters (kohya, A1111, ...).
- `route_adapters`: per-row adapter choice inside one batch (PEFT's mixed-adapter forward), so that
  the reference row runs the base model while the style rows run their own LoRA, in one UNet call.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.lora_base import set_adapters_for_text_encoder
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from safetensors import safe_open
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from diffstyler.errors import MissingFileError, UserError, config_error, first_line
from diffstyler.conditioning import Conditioning
from diffstyler.families import describe_width, family_for_width, reads_time_ids
from diffstyler.models import AnyPipeline, encode_prompts
from diffstyler.outputs import atomic_write

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LORA_INFO_NAME = "diffstyler_lora.json"  # written by `diffstyler fit` next to the weights: prompt, style images, ...
BASE_ROW = "__base__"  # PEFT's name for "no adapter" in a mixed batch
# Key fragments of LoRA weights in the formats diffusers reads (diffusers/PEFT, kohya/A1111, ...).
LORA_KEY_MARKERS = ("lora_down", "lora_up", "lora.down", "lora.up", "lora_A", "lora_B", "lora_unet_", "lora_te")


@dataclass
class StyleLoRAConfig:
    """LoRA hyper-parameters; defaults from the paper (section IV)."""

    rank: int = 16
    alpha: Optional[float] = None  # None: alpha = rank, i.e. scaling 1
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v"])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise config_error("model.lora.rank", f"must be >= 1, got {self.rank}")
        if not self.target_modules:
            raise config_error("model.lora.target_modules", "must name at least one module, e.g. ['to_q', 'to_k', 'to_v']")

    def to_peft(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
            init_lora_weights="gaussian",
        )


def add_style_adapter(unet: UNet2DConditionModel, config: StyleLoRAConfig, name: str = "style") -> list[torch.nn.Parameter]:
    """Freeze the UNet, add a trainable float32 adapter, and return its parameters."""
    unet.requires_grad_(False)
    unet.add_adapter(config.to_peft(), adapter_name=name)
    params = [p for n, p in unet.named_parameters() if f".{name}." in n and "lora_" in n]
    for p in params:
        # Mixed precision trains fp32 master weights; the frozen base may be half precision.
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def adapter_state_dict(unet: UNet2DConditionModel, name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers' key names (`unet.`-less), every module spelled
    `<module>.lora.down.weight` / `.lora.up.weight`.

    diffusers' `convert_state_dict_to_diffusers` renames PEFT's `lora_A` / `lora_B` only for the
    attention projections (to_q, to_k, to_v, to_out.0) and leaves the rest (feed-forward, proj_in,
    resnet convolutions, ...) as they are: one spelling for every module keeps a file what tools
    expect of one format; diffusers' loader reads `lora.down` / `lora.up` for any module."""
    peft_state = get_peft_model_state_dict(unet, adapter_name=name)
    return {diffusers_lora_key(key): tensor for key, tensor in convert_state_dict_to_diffusers(peft_state).items()}


PEFT_TO_DIFFUSERS_SUFFIXES = {".lora_A.weight": ".lora.down.weight", ".lora_B.weight": ".lora.up.weight"}


def diffusers_lora_key(key: str) -> str:
    """`<module>.lora_A.weight` -> `<module>.lora.down.weight` (and lora_B -> lora.up); other keys as they are."""
    for peft, diffusers in PEFT_TO_DIFFUSERS_SUFFIXES.items():
        if key.endswith(peft):
            return key.removesuffix(peft) + diffusers
    return key


def save_lora(unet: UNet2DConditionModel, name: str, output_dir: str | os.PathLike) -> Path:
    """Write `<output_dir>/pytorch_lora_weights.safetensors` atomically, with the adapter metadata.

    diffusers' own `save_lora_weights` of the UNet's family (`StableDiffusionXLPipeline`'s for an
    SDXL UNet) writes the file (its key names and metadata layout are what `load_lora_weights`
    reads back); it writes into a scratch folder, and the bytes then go into place through
    `atomic_write`. Without the metadata (`unet_lora_adapter_metadata`) a reload guesses alpha =
    rank and gets the scaling wrong, so it is always written.
    """
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter_state_dict(unet, name).items()}
    metadata = unet.peft_config[name].to_dict()
    pipeline_class = StableDiffusionXLPipeline if reads_time_ids(unet) else StableDiffusionPipeline
    with tempfile.TemporaryDirectory(prefix="diffstyler-lora-") as staging:
        pipeline_class.save_lora_weights(
            staging,
            unet_lora_layers=layers,
            safe_serialization=True,
            unet_lora_adapter_metadata=metadata,
        )
        staged = Path(staging) / LORA_WEIGHTS_NAME
        return atomic_write(Path(output_dir) / LORA_WEIGHTS_NAME, lambda handle: handle.write(staged.read_bytes()))


def resolve_lora_file(path: str | os.PathLike) -> Path:
    """A LoRA named by its file, or by a folder holding `pytorch_lora_weights.safetensors`.

    Reads the file's header (no weights), so a wrong or broken file fails before any model loads.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHTS_NAME
    if not path.is_file():
        raise MissingFileError("LoRA file not found", str(path), f"give a .safetensors file or a folder with {LORA_WEIGHTS_NAME}")
    if path.suffix != ".safetensors":
        raise UserError("LoRA file refused", str(path), "not a .safetensors file; pickled LoRAs are not loaded for safety")
    keys = lora_file_keys(path)
    if not any(marker in key for key in keys for marker in LORA_KEY_MARKERS):
        raise UserError("not a LoRA", str(path), f"none of its {len(keys)} tensors has a LoRA name (e.g. '...lora.down.weight')")
    return path


def lora_file_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as file:
            keys = list(file.keys())
    except Exception as error:  # safetensors raises its own error types for a broken header
        raise UserError("LoRA file unreadable", str(path), f"not a valid safetensors file ({first_line(error)})") from error
    if not keys:
        raise UserError("LoRA file unreadable", str(path), "it holds no tensors")
    return keys


def lora_cross_attention_width(path: Path) -> Optional[int]:
    """The text-embedding width the LoRA was trained for: the input width of a cross-attention
    `to_k` down-projection (diffusers, PEFT or kohya names); None when the file has none."""
    with safe_open(str(path), framework="pt") as file:
        for key in file.keys():
            cross_attention_key = "attn2.to_k" in key or "attn2_to_k" in key
            if cross_attention_key and any(part in key for part in ("lora.down", "lora_down", "lora_A")):
                return int(file.get_slice(key).get_shape()[-1])
    return None


def check_lora_fits(unet: UNet2DConditionModel, file: Path) -> None:
    """A LoRA made for another model family (SD 1.x on SD 2.x, ...) says so, instead of a shape error."""
    check_lora_width(file, unet.config.cross_attention_dim)


def check_lora_width(file: Path, model_width: int) -> None:
    """The LoRA's cross-attention reads text of `model_width` (a LoRA without cross-attention
    layers passes); also run before the model loads (`StylizePredictor.check_run`)."""
    width = lora_cross_attention_width(file)
    if width is not None and width != model_width:
        made_for = family_for_width(width) or "another model"
        raise UserError(
            "LoRA does not fit the model", str(file),
            f"it seems made for {made_for} (cross-attention width {width}), not for this model ({describe_width(model_width)})",
        )


def load_style_adapter(pipe: AnyPipeline, path: str | os.PathLike, name: str) -> None:
    """Load a LoRA file as the named adapter `name` on the pipeline's UNet (no copy of the UNet).

    Goes through `load_lora_weights`, so diffusers' converters accept community formats too.
    """
    file = resolve_lora_file(path)
    check_lora_fits(pipe.unet, file)
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    except (ValueError, KeyError, RuntimeError) as error:
        raise UserError("LoRA does not fit the model", str(file), first_line(error)) from error
    if name not in getattr(pipe.unet, "peft_config", {}):
        raise UserError("LoRA does not fit the model", str(file), "it holds no UNet layers that this model has")


# --- diffstyler_lora.json: what `diffstyler fit` records next to the weights ------------------

def lora_info_path(lora: str | os.PathLike) -> Path:
    """`diffstyler_lora.json` next to a LoRA file, or inside a LoRA folder."""
    path = Path(lora)
    return (path.parent if path.suffix == ".safetensors" else path) / LORA_INFO_NAME


def read_lora_info(lora: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The LoRA's recorded info (prompt, base model, recipe, style images), None when it has no
    info file (a community LoRA); a file that is not a JSON object is a UserError naming it."""
    info = lora_info_path(lora)
    if not info.is_file():
        return None
    try:
        recorded = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError("unreadable LoRA info file", str(info), f"not JSON ({first_line(error)})") from error
    if not isinstance(recorded, dict):
        raise UserError("unreadable LoRA info file", str(info), "not a JSON object")
    return recorded


def write_lora_info(folder: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Write `<folder>/diffstyler_lora.json` atomically (readers never see half a file)."""
    text = json.dumps(info, indent=2, default=str) + "\n"
    return atomic_write(Path(folder) / LORA_INFO_NAME, lambda handle: handle.write(text.encode("utf-8")))


def recorded_prompt(lora: str | os.PathLike) -> str:
    """The style prompt recorded by `diffstyler fit` for this LoRA (`diffstyler_lora.json`)."""
    info = read_lora_info(lora)
    if info is None:
        raise UserError("style has no prompt", str(lora), f"give the style entry a prompt: there is no {lora_info_path(lora)} to take it from")
    prompt = info.get("prompt")
    if not isinstance(prompt, str):
        raise UserError("LoRA info file has no prompt", str(lora_info_path(lora)), "give the style entry a prompt (data.styles[k].prompt)")
    return prompt


def set_adapter_scales(unet: UNet2DConditionModel, scales: dict[str, float]) -> None:
    """Activate exactly these adapters with these LoRA scales (0 = base model)."""
    unet.set_adapters(list(scales), list(scales.values()))


def set_text_encoder_scales(text_encoder: torch.nn.Module, scales: dict[str, float]) -> None:
    """The same scales for the text-encoder parts of those LoRAs that have one (community LoRAs)."""
    loaded = set(getattr(text_encoder, "peft_config", None) or {})
    present = {name: scale for name, scale in scales.items() if name in loaded}
    if present:
        set_adapters_for_text_encoder(list(present), text_encoder, list(present.values()))


def text_encoders(pipe: AnyPipeline) -> list[torch.nn.Module]:
    """The pipeline's text encoders: one, or SDXL's two."""
    return [encoder for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if encoder is not None]


def encode_prompts_per_adapter(pipe: AnyPipeline, prompts: list[str], adapters: list[str]) -> Conditioning:
    """Text embeddings where prompt i goes through the text-encoder LoRA of `adapters[i]` (on
    both of SDXL's text encoders).

    Only community LoRAs carry text-encoder layers; `BASE_ROW` (and any adapter without such
    layers) gives the base text encoder, so the reference and inversion prompts stay the base
    model's whatever LoRAs are loaded.
    """
    with contextlib.ExitStack() as routes:
        for encoder in text_encoders(pipe):
            routes.enter_context(route_adapters(encoder, adapters))
        return encode_prompts(pipe, prompts)


_LORA_LAYERS = "_diffstyler_lora_layers"  # (adapter names, layers), kept in the module's __dict__


def lora_layers(module: torch.nn.Module) -> list[LoraLayer]:
    """The module's LoRA layers, found once per set of loaded adapters.

    Walking every submodule (1,668 in the tiny UNet) costs about 5% of a tiny UNet call, and
    `route_adapters` needs the layers on every call. Loading or deleting an adapter changes
    `peft_config`, and with it the key, so the layers are then found again.
    """
    adapters = tuple(sorted(getattr(module, "peft_config", None) or {}))
    cached = module.__dict__.get(_LORA_LAYERS)
    if cached is None or cached[0] != adapters:
        cached = (adapters, [m for m in module.modules() if isinstance(m, LoraLayer)])
        module.__dict__[_LORA_LAYERS] = cached
    return cached[1]


@contextlib.contextmanager
def route_adapters(model: torch.nn.Module, row_adapters: Sequence[str]) -> Iterator[None]:
    """Within the block, batch row i of every call of `model` uses adapter `row_adapters[i]`.

    `BASE_ROW` means no adapter. diffusers does not forward PEFT's `adapter_names` argument, so a
    forward pre-hook adds it to every LoRA layer's call; the hooks are removed on exit.
    """
    names = list(row_adapters)

    def add_adapter_names(module, args, kwargs):
        return args, {**kwargs, "adapter_names": names}

    handles = [layer.register_forward_pre_hook(add_adapter_names, with_kwargs=True) for layer in lora_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

