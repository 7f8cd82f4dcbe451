"""Style LoRAs as named PEFT adapters on ONE UNet, stored in the standard diffusers format.

- `StyleLoRAConfig`: the paper's defaults (rank 16 on the attention's Q/K/V projections).
- `add_style_adapter`: a fresh trainable adapter for `fit`, on a UNet or a transformer.
- `save_lora` / `load_style_adapter`: `pytorch_lora_weights.safetensors` that the family's
  pipeline (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`, ...: its backbone kind's)
  reads with `load_lora_weights`, and community LoRAs read by diffusers' own converters (kohya,
  A1111, ...).
- `route_adapters`: per-row adapter choice inside one batch (PEFT's mixed-adapter forward), so that
  the reference row runs the base model while the style rows run their own LoRA, in one call.
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
from diffusers.loaders.lora_base import set_adapters_for_text_encoder
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from safetensors import safe_open
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from diffstyler.backbones import backbone_for, kind_of_denoiser
from diffstyler.conditioning import Conditioning
from diffstyler.errors import MissingFileError, UserError, config_error, first_line
from diffstyler.models import AnyPipeline, encode_prompts
from diffstyler.outputs import atomic_write

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LORA_INFO_NAME = "diffstyler_lora.json"  # written by `diffstyler fit` next to the weights: prompt, style images, ...
BASE_ROW = "__base__"  # PEFT's name for "no adapter" in a mixed batch
# Key fragments of LoRA weights in the formats diffusers reads (diffusers/PEFT, kohya/A1111, ...).
LORA_KEY_MARKERS = ("lora_down", "lora_up", "lora.down", "lora.up", "lora_A", "lora_B", "lora_unet_", "lora_te")


@dataclass
class StyleLoRAConfig:
    """LoRA hyper-parameters; defaults from the paper (section IV).

    Args:
        rank: the LoRA rank (the paper: 16).
        alpha: the LoRA alpha; None: alpha = rank, i.e. scaling 1.
        target_modules: the modules the LoRA trains; None: the family's attention Q/K/V (a UNet's
            to_q, to_k, to_v; a transformer's also its text stream's add_q_proj, add_k_proj,
            add_v_proj).
        dropout: LoRA dropout while training.
    """

    rank: int = 16
    alpha: Optional[float] = None
    target_modules: Optional[list[str]] = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise config_error("model.lora.rank", f"must be >= 1, got {self.rank}")
        if self.target_modules is not None and not self.target_modules:
            raise config_error("model.lora.target_modules", "must name at least one module, e.g. ['to_q', 'to_k', 'to_v'], "
                                                            "or be null (the family's Q/K/V)")

    def targets(self, default: Sequence[str]) -> list[str]:
        return list(self.target_modules) if self.target_modules is not None else list(default)

    def to_peft(self, default_targets: Sequence[str] = ("to_q", "to_k", "to_v")) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            target_modules=self.targets(default_targets),
            lora_dropout=self.dropout,
            init_lora_weights="gaussian",
        )


def add_style_adapter(denoiser: torch.nn.Module, config: StyleLoRAConfig, name: str = "style") -> list[torch.nn.Parameter]:
    """Freeze the denoiser (a UNet or a transformer), add a trainable float32 adapter on the
    family's default targets (or the config's), and return its parameters."""
    denoiser.requires_grad_(False)
    denoiser.add_adapter(config.to_peft(kind_of_denoiser(denoiser).default_lora_targets), adapter_name=name)
    params = [p for n, p in denoiser.named_parameters() if f".{name}." in n and "lora_" in n]
    for p in params:
        # Mixed precision trains fp32 master weights; the frozen base may be half precision.
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def adapter_state_dict(denoiser: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights with the key names the family's loader reads (prefix-less): a UNet's in
    diffusers' `lora.down/up` style, a transformer's in PEFT's `lora_A/B` (diffusers' transformer
    loaders read a file as PEFT's as soon as one key is: one spelling per file).

    diffusers' `convert_state_dict_to_diffusers` renames PEFT's `lora_A` / `lora_B` only for the
    attention projections (to_q, to_k, to_v, to_out.0) and leaves the rest (feed-forward, proj_in,
    resnet convolutions, ...) as they are: one spelling for every module keeps a file what tools
    expect of one format; diffusers' loader reads `lora.down` / `lora.up` for any module."""
    peft_state = get_peft_model_state_dict(denoiser, adapter_name=name)
    if kind_of_denoiser(denoiser).denoiser_subfolder == "transformer":
        return peft_state
    return {diffusers_lora_key(key): tensor for key, tensor in convert_state_dict_to_diffusers(peft_state).items()}


PEFT_TO_DIFFUSERS_SUFFIXES = {".lora_A.weight": ".lora.down.weight", ".lora_B.weight": ".lora.up.weight"}


def diffusers_lora_key(key: str) -> str:
    """`<module>.lora_A.weight` -> `<module>.lora.down.weight` (and lora_B -> lora.up); other keys as they are."""
    for peft, diffusers in PEFT_TO_DIFFUSERS_SUFFIXES.items():
        if key.endswith(peft):
            return key.removesuffix(peft) + diffusers
    return key


def save_lora(denoiser: torch.nn.Module, name: str, output_dir: str | os.PathLike) -> Path:
    """Write `<output_dir>/pytorch_lora_weights.safetensors` atomically, with the adapter metadata.

    diffusers' own `save_lora_weights` of the denoiser's family (`StableDiffusionXLPipeline`'s for
    an SDXL UNet, ...: its backbone kind's) writes the file (its key names and metadata layout are
    what `load_lora_weights` reads back); it writes into a scratch folder, and the bytes then go
    into place through `atomic_write`. Without the metadata (`<denoiser>_lora_adapter_metadata`) a
    reload guesses alpha = rank and gets the scaling wrong, so it is always written.
    """
    kind = kind_of_denoiser(denoiser)
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter_state_dict(denoiser, name).items()}
    metadata = denoiser.peft_config[name].to_dict()
    prefix = kind.denoiser_subfolder
    with tempfile.TemporaryDirectory(prefix="diffstyler-lora-") as staging:
        kind.lora_pipeline_class(denoiser).save_lora_weights(
            staging, safe_serialization=True,
            **{f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": metadata},
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


# Key fragments that tell which denoiser a LoRA file is for. UNet files are looked for first: a
# UNet's attention modules also sit in `transformer_blocks`.
UNET_KEY_MARKERS = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")
TRANSFORMER_KEY_MARKERS = ("transformer_blocks", "double_blocks", "single_blocks", "joint_blocks")
# The projection whose input width tells the family: a UNet's cross-attention key (it reads the
# text), a transformer's image-stream key (it reads the transformer's width); diffusers, PEFT,
# kohya and the original layouts (fused qkv).
WIDTH_KEYS = {
    "unet": ("attn2.to_k", "attn2_to_k"),
    "transformer": (".attn.to_k.", "_attn_to_k.", "img_attn.qkv", "img_attn_qkv", "x_block.attn.qkv", "x_block_attn_qkv"),
}
DOWN_MARKERS = ("lora.down", "lora_down", "lora_A")


def lora_target(path: Path) -> tuple[Optional[str], Optional[int]]:
    """(the denoiser a LoRA file is for, "unet" or "transformer"; the width it reads: a UNet's
    cross-attention text width, a transformer's attention width); None for what the file does not
    tell (a text-encoder LoRA)."""
    with safe_open(str(path), framework="pt") as file:
        keys = list(file.keys())
        denoiser = next((name for name, markers in (("unet", UNET_KEY_MARKERS), ("transformer", TRANSFORMER_KEY_MARKERS))
                         if any(marker in key for key in keys for marker in markers)), None)
        if denoiser is None:
            return None, None
        for key in keys:
            if any(part in key for part in WIDTH_KEYS[denoiser]) and any(part in key for part in DOWN_MARKERS):
                return denoiser, int(file.get_slice(key).get_shape()[-1])
    return denoiser, None


def lora_cross_attention_width(path: Path) -> Optional[int]:
    """The text-embedding width a UNet LoRA was trained for (None for another file)."""
    denoiser, width = lora_target(path)
    return width if denoiser == "unet" else None


def check_lora_fits(pipe: AnyPipeline, file: Path) -> None:
    """A LoRA made for another model family (SD 1.x on SD 2.x, FLUX.1 on SDXL, ...) says so,
    instead of a shape error."""
    backbone = backbone_for(pipe)
    check_lora_width(file, backbone.lora_width, kind_of_denoiser(backbone.denoiser).denoiser_subfolder)


def check_lora_width(file: Path, model_width: int, model_denoiser: str = "unet") -> None:
    """The LoRA is for this kind of denoiser and reads `model_width` (a LoRA without such layers
    passes); also run before the model loads (`StylizePredictor.check_run`)."""
    denoiser, width = lora_target(file)
    if denoiser is None or (denoiser == model_denoiser and width in (None, model_width)):
        return
    family = family_for(denoiser, width)
    made_for = f"{family or 'another model'} ({WIDTH_NAMES[denoiser]} {width})" if width else DENOISER_NAMES[denoiser]
    model_family = family_for(model_denoiser, model_width)
    this_model = f"{model_family}, width {model_width}" if model_family else f"width {model_width}"
    raise UserError("LoRA does not fit the model", str(file), f"it seems made for {made_for}, not for this model ({this_model})")


WIDTH_NAMES = {"unet": "cross-attention width", "transformer": "transformer width"}
DENOISER_NAMES = {"unet": "a UNet model (SD 1.x, SD 2.x, SDXL)", "transformer": "a transformer model (SD 3.5, FLUX.1)"}


def family_for(denoiser: str, width: Optional[int]) -> Optional[str]:
    """The family whose LoRA files are for this denoiser and width (`BackboneKind.family_for_width`)."""
    from diffstyler.backbones import KINDS

    kind = next(kind for kind in KINDS if kind.denoiser_subfolder == denoiser)
    return kind.family_for_width(width) if width is not None else None


def load_style_adapter(pipe: AnyPipeline, path: str | os.PathLike, name: str) -> None:
    """Load a LoRA file as the named adapter `name` on the pipeline's denoiser (no copy of it).

    Goes through `load_lora_weights`, so diffusers' converters accept community formats too.
    """
    file = resolve_lora_file(path)
    check_lora_fits(pipe, file)
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    except (ValueError, KeyError, RuntimeError) as error:
        raise UserError("LoRA does not fit the model", str(file), first_line(error)) from error
    if name not in getattr(backbone_for(pipe).denoiser, "peft_config", {}):
        raise UserError("LoRA does not fit the model", str(file), "it holds no layers of this model's denoiser")


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


def set_adapter_scales(unet: torch.nn.Module, scales: dict[str, float]) -> None:
    """Activate exactly these adapters with these LoRA scales (0 = base model)."""
    unet.set_adapters(list(scales), list(scales.values()))


def set_text_encoder_scales(text_encoder: torch.nn.Module, scales: dict[str, float]) -> None:
    """The same scales for the text-encoder parts of those LoRAs that have one (community LoRAs)."""
    loaded = set(getattr(text_encoder, "peft_config", None) or {})
    present = {name: scale for name, scale in scales.items() if name in loaded}
    if present:
        set_adapters_for_text_encoder(list(present), text_encoder, list(present.values()))


def text_encoders(pipe: AnyPipeline) -> list[torch.nn.Module]:
    """The pipeline's text encoders: one, SDXL's and FLUX.1's two, SD 3.5's three."""
    return backbone_for(pipe).text_encoders


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

