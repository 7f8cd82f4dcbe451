"""SD 3.5 and FLUX.1 LoRAs named as the original models name their modules, which ComfyUI,
A1111-Forge and kohya's sd-scripts load.

Our files (`diffstyler fit`) name diffusers' modules (`transformer.transformer_blocks.0.attn.to_q`).
The original models (Black Forest Labs' FLUX.1, Stability's MMDiT) fuse projections that
diffusers keeps apart, their rows stacked in this order:

    FLUX.1   double_blocks.N.img_attn.qkv           to_q, to_k, to_v            of transformer_blocks.N.attn
             double_blocks.N.txt_attn.qkv           add_q_proj, add_k_proj, add_v_proj
             single_blocks.N.linear1                to_q, to_k, to_v, proj_mlp  of single_transformer_blocks.N
    SD 3.5   joint_blocks.N.x_block.attn.qkv        to_q, to_k, to_v            of transformer_blocks.N.attn
             joint_blocks.N.context_block.attn.qkv  add_q_proj, add_k_proj, add_v_proj
             joint_blocks.N.x_block.attn2.qkv       to_q, to_k, to_v of attn2 (SD 3.5 Medium's second attention)

(the row orders diffusers' single-file converters split, and ComfyUI's `flux_to_diffusers` /
`mmdit_to_diffusers` offsets). The other layers are renamed only (`attn.to_out.0` is
`img_attn.proj` / `x_block.attn.proj`, `ff.net.0.proj` is `img_mlp.0` / `x_block.mlp.fc1`, ...).

LoRAs of the parts are one LoRA of the fused projection, exactly: its down matrix stacks the
parts' downs (its rank is the sum of theirs), its up matrix is block-diagonal (each part's up in
its own rows and its own rank's columns; a part without a LoRA, such as linear1's MLP rows, gets
zero rows), and its alpha keeps alpha / rank, so that each part's update alpha / rank * up @ down
is unchanged. Parts trained with different scales (ranks) get the ratio folded into their up.

The layouts (the suffixes are kohya's: `.lora_down.weight`, `.lora_up.weight`, `.alpha`):
    kohya    lora_unet_<original path, "." -> "_">  as sd-scripts' FLUX.1 and SD3 LoRAs; ComfyUI,
             A1111-Forge and diffusers' FluxPipeline read it
    comfyui  diffusion_model.<original path>        as ComfyUI's own LoRA nodes write it; diffusers'
             FluxPipeline reads it too
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from diffstyler.backbones.mmdit import FAMILY_BY_WIDTH, FLUX, SD35

KOHYA_PREFIX, COMFYUI_PREFIX = "lora_unet_", "diffusion_model."
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
# sd-scripts' network module of each family's LoRAs (`ss_network_module`)
NETWORK_MODULES = {FLUX: "networks.lora_flux", SD35: "networks.lora_sd3"}
# sd-scripts' `ss_base_model_version` of a LoRA of a released model's width (`FAMILY_BY_WIDTH`);
# SD 3.5's is not written (not guessed).
BASE_MODEL_VERSIONS = {FLUX: "flux1"}

QKV = (1, 1, 1)
QKV_MLP = (1, 1, 1, 4)  # FLUX.1's linear1: q, k, v (the attention width each), the MLP's input (4x)
PART_INDEX = {"q": 0, "k": 1, "v": 2, "mlp": 3}


@dataclass(frozen=True)
class Rule:
    """A diffusers module (`pattern`, its block number first) and its original module (`original`,
    formatted with the block number). Fused: `widths` are the fused parts' row counts in units of
    the attention width, and the pattern's second group names the part (q, k, v, mlp)."""

    pattern: str
    original: str
    widths: tuple[int, ...] = ()


RULES = {
    FLUX: (
        Rule(r"transformer_blocks\.(\d+)\.attn\.to_([qkv])", "double_blocks.{}.img_attn.qkv", QKV),
        Rule(r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj", "double_blocks.{}.txt_attn.qkv", QKV),
        Rule(r"single_transformer_blocks\.(\d+)\.attn\.to_([qkv])", "single_blocks.{}.linear1", QKV_MLP),
        Rule(r"single_transformer_blocks\.(\d+)\.proj_(mlp)", "single_blocks.{}.linear1", QKV_MLP),
        Rule(r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "double_blocks.{}.img_attn.proj"),
        Rule(r"transformer_blocks\.(\d+)\.attn\.to_add_out", "double_blocks.{}.txt_attn.proj"),
        Rule(r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", "double_blocks.{}.img_mlp.0"),
        Rule(r"transformer_blocks\.(\d+)\.ff\.net\.2", "double_blocks.{}.img_mlp.2"),
        Rule(r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", "double_blocks.{}.txt_mlp.0"),
        Rule(r"transformer_blocks\.(\d+)\.ff_context\.net\.2", "double_blocks.{}.txt_mlp.2"),
        Rule(r"single_transformer_blocks\.(\d+)\.proj_out", "single_blocks.{}.linear2"),
    ),
    SD35: (
        Rule(r"transformer_blocks\.(\d+)\.attn\.to_([qkv])", "joint_blocks.{}.x_block.attn.qkv", QKV),
        Rule(r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj", "joint_blocks.{}.context_block.attn.qkv", QKV),
        Rule(r"transformer_blocks\.(\d+)\.attn2\.to_([qkv])", "joint_blocks.{}.x_block.attn2.qkv", QKV),
        Rule(r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "joint_blocks.{}.x_block.attn.proj"),
        Rule(r"transformer_blocks\.(\d+)\.attn\.to_add_out", "joint_blocks.{}.context_block.attn.proj"),
        Rule(r"transformer_blocks\.(\d+)\.attn2\.to_out\.0", "joint_blocks.{}.x_block.attn2.proj"),
        Rule(r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", "joint_blocks.{}.x_block.mlp.fc1"),
        Rule(r"transformer_blocks\.(\d+)\.ff\.net\.2", "joint_blocks.{}.x_block.mlp.fc2"),
        Rule(r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", "joint_blocks.{}.context_block.mlp.fc1"),
        Rule(r"transformer_blocks\.(\d+)\.ff_context\.net\.2", "joint_blocks.{}.context_block.mlp.fc2"),
    ),
}
EXPORTED_LAYERS = "the blocks' attention projections and feed-forward layers"


@dataclass(frozen=True)
class ModuleLoRA:
    """One module's LoRA: the update is alpha / rank * up @ down."""

    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# --- the family ---------------------------------------------------------------------------------

def transformer_family(modules: Mapping[str, Any], width: Optional[int], info: Mapping[str, Any]) -> str:
    """FLUX.1 or SD 3.5, for a LoRA of diffusers transformer modules.

    Told by the modules only one family has (FLUX.1's single-stream blocks, SD 3.5 Medium's
    `attn2`), else by the attention width of the released models, else by what `diffstyler fit`
    recorded (`diffstyler_lora.json`). Raises ValueError when none tells.
    """
    flux = any(module.startswith("single_transformer_blocks.") for module in modules)
    sd35 = any(".attn2." in module for module in modules)
    if flux and sd35:
        raise ValueError("it has both FLUX.1's single-stream blocks and SD 3.5's attn2 layers")
    if flux or sd35:
        return FLUX if flux else SD35
    released = FAMILY_BY_WIDTH.get(width, "") if width is not None else ""
    if released.startswith((FLUX, SD35)):
        return FLUX if released.startswith(FLUX) else SD35
    card = info.get("model_card")
    recorded = card.get("base_model") if isinstance(card, Mapping) else None
    if recorded in (FLUX, SD35):
        return recorded
    raise ValueError(f"cannot tell whether it is for {FLUX} or {SD35}: its layers exist in both, its width "
                     f"({width}) is neither's and it has no diffstyler_lora.json naming its base model")


# --- names and fusion ---------------------------------------------------------------------------

def base_model_version(width: Optional[int]) -> Optional[str]:
    """`ss_base_model_version` of a LoRA whose attention reads `width` (None: not a released model's)."""
    return BASE_MODEL_VERSIONS.get(FAMILY_BY_WIDTH.get(width, "")) if width is not None else None


def original_target(module: str, family: str) -> tuple[str, Optional[int], tuple[int, ...]]:
    """(the original module, the part of it for a fused one or None, the fused parts' widths) of a
    diffusers transformer module. Raises ValueError for a module that has none here."""
    for rule in RULES[family]:
        match = re.fullmatch(rule.pattern, module)
        if match:
            part = PART_INDEX[match.group(2)] if rule.widths else None
            return rule.original.format(int(match.group(1))), part, rule.widths
    raise ValueError(f"{module!r} has no counterpart in {family}'s original layout (exported: {EXPORTED_LAYERS})")


def fuse(parts: Mapping[int, ModuleLoRA], widths: tuple[int, ...], name: str) -> ModuleLoRA:
    """One LoRA of a fused projection from its parts' LoRAs (see the module's docstring)."""
    order = sorted(parts)
    units = {parts[i].up.shape[0] / widths[i] for i in order}
    inputs = {parts[i].down.shape[1] for i in order}
    if len(units) != 1 or len(inputs) != 1 or not float(next(iter(units))).is_integer():
        raise ValueError(f"the parts of {name} do not have the shapes of one fused projection")
    unit = int(next(iter(units)))
    offsets = [sum(widths[:i]) * unit for i in range(len(widths))]
    scale = parts[order[0]].scale
    down = torch.cat([parts[i].down for i in order])
    up = torch.zeros(sum(widths) * unit, down.shape[0], dtype=parts[order[0]].up.dtype)
    column = 0
    for i in order:
        part = parts[i]
        up[offsets[i]:offsets[i] + part.up.shape[0], column:column + part.rank] = part.up * (part.scale / scale)
        column += part.rank
    return ModuleLoRA(down, up, scale * down.shape[0])


def original_loras(modules: Mapping[str, ModuleLoRA], family: str) -> dict[str, ModuleLoRA]:
    """{original module: its LoRA} of a LoRA of diffusers modules, fused where the original fuses."""
    plain, fused, widths = {}, {}, {}
    for module, lora in modules.items():
        original, part, part_widths = original_target(module, family)
        if part is None:
            plain[original] = lora
        else:
            fused.setdefault(original, {})[part] = lora
            widths[original] = part_widths
    return {**plain, **{original: fuse(parts, widths[original], original) for original, parts in fused.items()}}


def layout_state_dict(loras: Mapping[str, ModuleLoRA], layout: str) -> dict[str, torch.Tensor]:
    """The tensors of a file in `layout` ("kohya" or "comfyui")."""
    tensors = {}
    for original in sorted(loras):
        lora = loras[original]
        name = KOHYA_PREFIX + original.replace(".", "_") if layout == "kohya" else COMFYUI_PREFIX + original
        tensors[name + DOWN] = lora.down.contiguous()
        tensors[name + UP] = lora.up.contiguous()
        tensors[name + ALPHA] = torch.tensor(float(lora.alpha), dtype=torch.float32)
    return tensors
