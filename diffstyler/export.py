"""Our LoRAs in the layouts other tools load: kohya's (A1111, A1111-Forge, ComfyUI, kohya's
sd-scripts) for every family, and ComfyUI's own for SD 3.5 and FLUX.1.

`diffstyler fit` writes the diffusers/PEFT layout: `unet.<module>.lora.down.weight` (or `lora_A`)
and `.lora.up.weight` (`lora_B`), with PEFT's `LoraConfig` in the file's metadata so that alpha
survives. kohya's sd-scripts write, and A1111 and ComfyUI read, another layout:

    lora_unet_<module path, "." -> "_">.lora_down.weight   the same tensor as lora.down / lora_A
    lora_unet_<module path, "." -> "_">.lora_up.weight     the same tensor as lora.up / lora_B
    lora_unet_<module path, "." -> "_">.alpha              a scalar: the update is scaled by alpha / rank

plus `ss_*` training metadata and two hashes (`sshs_model_hash`, `sshs_legacy_hash`), all strings.

Module paths: SD 1.x / 2.x LoRAs name diffusers' modules (kohya trains those models on a UNet with
diffusers' names): `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`. SDXL
LoRAs name the modules of the original (SGM) UNet, on which kohya trains SDXL:
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` for `down_blocks.1.attentions.0...`.
diffusers reads both back (`_maybe_map_sgm_blocks_to_diffusers` and
`_convert_non_diffusers_lora_to_diffusers` in `diffusers/loaders/lora_conversion_utils.py`); the
tests load our files through it and compare the UNet's outputs.

SD 3.5 and FLUX.1 LoRAs name the modules of the original models, whose Q/K/V projections are
fused: `export_mmdit` fuses the LoRAs and names them, in kohya's spelling (`lora_unet_double_blocks_0_img_attn_qkv`)
or ComfyUI's (`diffusion_model.double_blocks.0.img_attn.qkv`).

Only the denoiser's LoRA layers (what `diffstyler fit` makes) are converted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from diffstyler import export_mmdit
from diffstyler.errors import MissingFileError, UserError, first_line
from diffstyler.lora import LORA_WEIGHTS_NAME, read_lora_info
from diffstyler.outputs import a1111_lora_hash, atomic_write

# kohya: every family; comfyui: ComfyUI's own layout, for SD 3.5 and FLUX.1 (ComfyUI loads UNet LoRAs in kohya's).
FORMATS = ("kohya", "comfyui")
PEFT_METADATA_KEY = "lora_adapter_metadata"  # where diffusers stores the LoraConfig in the file
KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_NETWORK_MODULE = "networks.lora"  # sd-scripts' module for plain LoRA
SDXL_LAYERS_PER_BLOCK = 2

# Our key endings (diffusers / PEFT spelling) and kohya's, for the two LoRA matrices.
_DOWN_SUFFIXES = (".lora.down.weight", ".lora_A.weight")
_UP_SUFFIXES = (".lora.up.weight", ".lora_B.weight")
KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"

# sd-scripts' `ss_base_model_version` by the width of the text embeddings cross-attention reads
# (`model_util.get_model_version_str_for_sd1_sd2`, `sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0`).
BASE_MODEL_VERSION_BY_WIDTH = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}
SDXL_WIDTH = 2048

# Inside a resnet, the SGM UNet names the convolutions by their place in a Sequential.
_SGM_RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                     "conv_shortcut": "skip_connection"}
_SGM_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "conv_out": "out.2",
                  "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


# --- module names ---------------------------------------------------------------------------------

def sgm_module_name(module: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK) -> str:
    """The SGM (original SDXL) path of a diffusers UNet module, e.g. `down_blocks.1.attentions.0.proj_in`
    -> `input_blocks.4.1.proj_in`.

    SGM numbers the layers of the whole encoder (decoder) in one sequence: `input_blocks.0` is
    conv_in, then each down block has `layers_per_block` layers (resnet [+ transformer]) and a
    downsampler; each up block has `layers_per_block + 1` layers, the upsampler inside the last one
    after its transformer (index 2: SDXL's up blocks that upsample all have attention, and
    diffusers' reader assumes so). Inside a transformer the names are the same as diffusers'.
    Raises ValueError for a module no LoRA can target (a norm, a container).
    """
    if module in _SGM_TOP_LEVEL:
        return _SGM_TOP_LEVEL[module]
    per_block = layers_per_block + 1
    match module.split("."):
        case ["down_blocks", block, "resnets", layer, *rest]:
            return f"input_blocks.{1 + int(block) * per_block + int(layer)}.0.{_sgm_resnet_part(rest, module)}"
        case ["down_blocks", block, "attentions", layer, *rest] if rest:
            return ".".join([f"input_blocks.{1 + int(block) * per_block + int(layer)}.1", *rest])
        case ["down_blocks", block, "downsamplers", "0", "conv"]:
            return f"input_blocks.{(int(block) + 1) * per_block}.0.op"
        case ["mid_block", "resnets", layer, *rest]:
            return f"middle_block.{2 * int(layer)}.{_sgm_resnet_part(rest, module)}"
        case ["mid_block", "attentions", "0", *rest] if rest:
            return ".".join(["middle_block.1", *rest])
        case ["up_blocks", block, "resnets", layer, *rest]:
            return f"output_blocks.{int(block) * per_block + int(layer)}.0.{_sgm_resnet_part(rest, module)}"
        case ["up_blocks", block, "attentions", layer, *rest] if rest:
            return ".".join([f"output_blocks.{int(block) * per_block + int(layer)}.1", *rest])
        case ["up_blocks", block, "upsamplers", "0", "conv"]:
            return f"output_blocks.{int(block) * per_block + layers_per_block}.2.conv"
    raise ValueError(f"no SGM name for the UNet module {module!r}")


def _sgm_resnet_part(rest: list[str], module: str) -> str:
    part = ".".join(rest)
    if part not in _SGM_RESNET_PARTS:
        raise ValueError(f"no SGM name for the UNet module {module!r}")
    return _SGM_RESNET_PARTS[part]


def kohya_module_name(module: str, sdxl: bool = False, layers_per_block: int = SDXL_LAYERS_PER_BLOCK) -> str:
    """kohya's name of a diffusers UNet module: `lora_unet_` + its path (SGM's for SDXL), "." -> "_"."""
    path = sgm_module_name(module, layers_per_block) if sdxl else module
    return KOHYA_UNET_PREFIX + path.replace(".", "_")


# --- state dicts ----------------------------------------------------------------------------------

def lora_modules(state_dict: Mapping[str, torch.Tensor], denoiser: str = "unet") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (down, up)} of a diffusers/PEFT LoRA state dict of a `denoiser` ("unet" or
    "transformer"; keys with or without that prefix).

    Raises ValueError for a key that is not a LoRA matrix of the denoiser (text-encoder layers,
    DoRA magnitudes, ...) and for a matrix without its partner.
    """
    downs, ups = {}, {}
    for key, tensor in state_dict.items():
        if key.startswith("text_encoder"):
            raise ValueError(f"{key!r} is a text-encoder layer; only the UNet's or transformer's LoRA layers are converted")
        module_key = key.removeprefix(f"{denoiser}.")
        down = next((s for s in _DOWN_SUFFIXES if module_key.endswith(s)), None)
        up = next((s for s in _UP_SUFFIXES if module_key.endswith(s)), None)
        if down:
            downs[module_key.removesuffix(down)] = tensor
        elif up:
            ups[module_key.removesuffix(up)] = tensor
        else:
            raise ValueError(f"{key!r} is not a LoRA matrix (lora.down / lora.up / lora_A / lora_B)")
    if set(downs) != set(ups):
        raise ValueError(f"LoRA matrices without their partner: {sorted(set(downs) ^ set(ups))[:3]}")
    return {module: (downs[module], ups[module]) for module in sorted(downs)}


def diffusers_to_kohya(
    state_dict: Mapping[str, torch.Tensor],
    alpha: Optional[float],
    sdxl: bool = False,
    layers_per_block: int = SDXL_LAYERS_PER_BLOCK,
) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT UNet LoRA state dict in kohya's layout.

    `alpha`: PEFT's `lora_alpha` (the update is scaled by alpha / rank, in both layouts); None, for
    a file without its LoraConfig, gives each module alpha = its rank, which is how diffusers reads
    such a file. Every module gets its `.alpha` tensor: without it kohya's readers take alpha =
    rank too, and the outputs are off by rank / alpha.
    """
    converted = {}
    for module, (down, up) in lora_modules(state_dict).items():
        name = kohya_module_name(module, sdxl, layers_per_block)
        rank = down.shape[0]
        converted[name + KOHYA_DOWN] = down
        converted[name + KOHYA_UP] = up
        converted[name + KOHYA_ALPHA] = torch.tensor(float(alpha if alpha is not None else rank), dtype=torch.float32)
    return converted


def kohya_to_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    module_names: Iterable[str],
    sdxl: bool = False,
    layers_per_block: int = SDXL_LAYERS_PER_BLOCK,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The reverse of `diffusers_to_kohya`: (our state dict with `unet.<module>.lora.down/up.weight`
    keys, {module: alpha}).

    kohya's names lose the dots, and diffusers' module names hold underscores, so the names are
    matched against the modules of the UNet they are for (`module_names`, e.g. from
    `unet.named_modules()`). A module missing its alpha gets alpha = rank (kohya's own default).
    """
    by_kohya_name = {}
    for module in module_names:
        try:
            by_kohya_name[kohya_module_name(module, sdxl, layers_per_block)] = module
        except ValueError:
            continue  # a norm or a container: no LoRA targets it
    converted, alphas = {}, {}
    for key in state_dict:
        if not key.endswith(KOHYA_DOWN):
            continue
        name = key.removesuffix(KOHYA_DOWN)
        if name not in by_kohya_name:
            raise ValueError(f"{name!r} names no module of this UNet")
        module = by_kohya_name[name]
        down, up = state_dict[key], state_dict[name + KOHYA_UP]
        converted[f"unet.{module}.lora.down.weight"] = down
        converted[f"unet.{module}.lora.up.weight"] = up
        alpha = state_dict.get(name + KOHYA_ALPHA)
        alphas[module] = float(alpha) if alpha is not None else float(down.shape[0])
    return converted, alphas


# --- metadata and hashes --------------------------------------------------------------------------

def peft_alpha(file_metadata: Optional[Mapping[str, str]], denoiser: str = "unet") -> Optional[float]:
    """PEFT's `lora_alpha` of the `denoiser` ("unet", "transformer") from a diffusers LoRA file's
    metadata; None when the file has no LoraConfig.

    Raises ValueError for settings the kohya layout cannot express with one alpha per module and
    the plain alpha / rank scale (DoRA, rsLoRA, per-module alpha patterns).
    """
    raw = (file_metadata or {}).get(PEFT_METADATA_KEY)
    if raw is None:
        return None
    config = {key.removeprefix(f"{denoiser}."): value for key, value in json.loads(raw).items() if key.startswith(f"{denoiser}.")}
    if "lora_alpha" not in config:
        return None
    for flag in ("use_dora", "use_rslora"):
        if config.get(flag):
            raise ValueError(f"the LoRA uses {flag}, which the kohya layout cannot express")
    if config.get("alpha_pattern"):
        raise ValueError("the LoRA has per-module alphas (alpha_pattern), which this export does not convert")
    return float(config["lora_alpha"])


def cross_attention_width(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Optional[int]:
    """The width of the text embeddings the LoRA was trained for: the input width of a cross-attention
    key projection's down matrix; None when the LoRA does not touch one."""
    for module, (down, _) in modules.items():
        if module.endswith("attn2.to_k"):
            return int(down.shape[1])
    return None


def kohya_metadata(
    info: Mapping[str, Any],
    output_name: str,
    ranks: set[int],
    alpha: Optional[float],
    width: Optional[int],
) -> dict[str, str]:
    """The `ss_*` fields sd-scripts' `train_network.py` writes, where we know their value.

    `info` is the LoRA's `diffstyler_lora.json` ({} when there is none). Values are strings written
    as sd-scripts writes them (`str(value)`: "True", "8.0", "(512, 512)").
    """
    metadata = {"ss_network_module": KOHYA_NETWORK_MODULE, "ss_output_name": output_name}
    if len(ranks) == 1:
        (rank,) = ranks
        metadata["ss_network_dim"] = str(rank)
        metadata["ss_network_alpha"] = str(float(alpha if alpha is not None else rank))
    if width in BASE_MODEL_VERSION_BY_WIDTH:
        version = BASE_MODEL_VERSION_BY_WIDTH[width]
        if width != SDXL_WIDTH and info.get("prediction_type") == "v_prediction":
            version += "_v"
        metadata["ss_base_model_version"] = version
        metadata["ss_v2"] = str(width == 1024)  # A1111 tells SD 2.x LoRAs by ss_v2 == "True"
    base = info.get("base_model")
    base_name = base.get("name") if isinstance(base, Mapping) else base
    if isinstance(base_name, str):
        # sd-scripts records a local checkpoint by its file name only
        metadata["ss_sd_model_name"] = os.path.basename(base_name) if os.path.exists(base_name) else base_name
    if isinstance(info.get("prompt"), str):
        metadata["ss_training_comment"] = f"DiffStyler style LoRA; style prompt: {info['prompt']}"
    for field, key in (("steps", "ss_steps"), ("seed", "ss_seed"), ("learning_rate", "ss_learning_rate"),
                       ("dropout", "ss_network_dropout")):
        if info.get(field) is not None:
            metadata[key] = str(info[field])
    images = info.get("style_images")
    if isinstance(images, list) and images:
        metadata["ss_num_train_images"] = str(len(images))
        size = _common_training_size(images)
        if size is not None:
            metadata["ss_resolution"] = str(size)  # "(width, height)", as sd-scripts writes it
    return metadata


def _common_training_size(images: list) -> Optional[tuple[int, int]]:
    """The (width, height) every style image was trained at; None when they differ or are unknown
    (sd-scripts' ss_resolution is one size)."""
    sizes = {tuple(image.get("size") or ()) if isinstance(image, Mapping) else () for image in images}
    if len(sizes) != 1:
        return None
    (size,) = sizes
    return (int(size[0]), int(size[1])) if len(size) == 2 else None


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) as sd-scripts' `train_util.precalculate_safetensors_hashes`
    computes them: the file serialised with its `ss_*` metadata only, then the sha256 of everything
    after the header (the "addnet" hash, which A1111 also computes for a LoRA without this field),
    and the first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB (empty for a smaller file).
    """
    serialised = safetensors_bytes(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_length = int.from_bytes(serialised[:8], "little")
    model_hash = hashlib.sha256(serialised[8 + header_length:]).hexdigest()
    legacy_hash = hashlib.sha256(serialised[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


# --- the export -----------------------------------------------------------------------------------

def export_lora(lora: str | os.PathLike, format: str = "kohya", output: str | os.PathLike = "",
                name: Optional[str] = None) -> Path:
    """Write our LoRA (`lora`: its folder or its `.safetensors` file) as `output` in `format`.

    kohya: the file A1111 and A1111-Forge (`models/Lora`), ComfyUI (`models/loras`) and sd-scripts
    load, for every family (SD 3.5 and FLUX.1 in the original models' fused module names).
    comfyui: SD 3.5 and FLUX.1 in ComfyUI's own key layout. `name` (default: `output`'s stem) is
    recorded as `ss_output_name`, which A1111 shows as the LoRA's name. Written atomically;
    returns the output path.
    """
    if format not in FORMATS:
        raise UserError("unknown export format", "--format", f"{format!r}; choose one of {', '.join(FORMATS)}")
    source = _lora_file(lora)
    target = _output_file(output, source)
    tensors, file_metadata = _read_safetensors(source)
    info = read_lora_info(source) or {}  # {} for a LoRA made elsewhere: no ss_* fields from it
    converted, metadata = _file_contents(tensors, file_metadata, info, name or target.stem, source, format)
    return atomic_write(target, lambda handle: handle.write(safetensors_bytes(converted, metadata)))


def exported_lora_hash(lora: str | os.PathLike) -> str:
    """The short hash A1111 shows for the file `export_lora` writes from this LoRA (in `Lora
    hashes`, 12 hex digits), without writing it: A1111 takes the file's `sshs_model_hash`, which
    depends on the tensors only, not on the output's name or the other metadata."""
    source = _lora_file(lora)
    status = source.stat()
    return _exported_lora_hash(str(source.resolve()), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _exported_lora_hash(source: str, size: int, mtime_ns: int) -> str:
    """Once per LoRA file version (path, size, modification time): every result's PNG asks for it."""
    tensors, file_metadata = _read_safetensors(Path(source))
    _, metadata = _file_contents(tensors, file_metadata, read_lora_info(Path(source)) or {}, "", Path(source), "kohya")
    return metadata["sshs_model_hash"][:12]


def kohya_export_path(lora_folder: str | os.PathLike) -> Path:
    """Where `diffstyler fit --model.export_kohya true` writes the kohya file of the LoRA in
    `lora_folder`: `<lora_folder>/<its name>.safetensors`."""
    folder = Path(lora_folder)
    return folder / f"{folder.resolve().name}.safetensors"


def a1111_lora_file(lora: str | os.PathLike) -> Path:
    """The file A1111 loads for this LoRA (`lora`: our `pytorch_lora_weights.safetensors`, or any
    LoRA file): the kohya export `fit` wrote beside it, when there is one and it holds these
    weights (its hash is the one `export_lora` gives them; a stale export of an earlier fit does
    not count); else the file itself. Its hash is what `Lora hashes` records (`outputs.a1111_fields`)."""
    file = Path(lora)
    if file.name != LORA_WEIGHTS_NAME:
        return file
    kohya = kohya_export_path(file.parent)
    if not kohya.is_file():
        return file
    try:
        its_export = a1111_lora_hash(kohya) == exported_lora_hash(file)
    except UserError:  # a LoRA the kohya layout cannot express: the file beside it is not its export
        its_export = False
    return kohya if its_export else file


def _file_contents(tensors, file_metadata, info, output_name, source, format) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        if any(key.startswith("transformer.") for key in tensors):
            converted, metadata = _transformer_file_contents(tensors, file_metadata, info, output_name, format)
        elif format != "kohya":
            raise ValueError(f"--format {format} is for SD 3.5 and FLUX.1 LoRAs; ComfyUI loads SD 1.x / 2.x / SDXL "
                             "LoRAs in the kohya layout (--format kohya)")
        else:
            converted, metadata = _unet_file_contents(tensors, file_metadata, info, output_name)
    except (ValueError, json.JSONDecodeError) as error:
        raise UserError("LoRA cannot be exported", "--lora", f"{source}: {first_line(error)}") from error
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = kohya_hashes(converted, metadata)
    return converted, metadata


def _unet_file_contents(tensors, file_metadata, info, output_name) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    alpha = peft_alpha(file_metadata)
    modules = lora_modules(tensors)
    width = cross_attention_width(modules)
    converted = diffusers_to_kohya(tensors, alpha, sdxl=width == SDXL_WIDTH)
    ranks = {int(down.shape[0]) for down, _ in modules.values()}
    return converted, kohya_metadata(info, output_name, ranks, alpha, width)


def _transformer_file_contents(tensors, file_metadata, info, output_name, format) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An SD 3.5 / FLUX.1 LoRA in the original models' module names (`export_mmdit`); alpha as
    diffusers reads the file (its LoraConfig's, or the rank without one)."""
    alpha = peft_alpha(file_metadata, "transformer")
    modules = {module: export_mmdit.ModuleLoRA(down, up, alpha if alpha is not None else float(down.shape[0]))
               for module, (down, up) in lora_modules(tensors, "transformer").items()}
    width = next((int(lora.down.shape[1]) for module, lora in modules.items()  # the attention's width: what to_q/k/v read
                  if module.endswith((".attn.to_q", ".attn.to_k", ".attn.to_v"))), None)
    family = export_mmdit.transformer_family(modules, width, info)
    loras = export_mmdit.original_loras(modules, family)
    converted = export_mmdit.layout_state_dict(loras, format)
    ranks, alphas = {lora.rank for lora in loras.values()}, {lora.alpha for lora in loras.values()}
    one_setting = len(ranks) == 1 and len(alphas) == 1  # else sd-scripts' ss_network_dim / _alpha say nothing true
    metadata = kohya_metadata(info, output_name, ranks if one_setting else set(), next(iter(alphas)) if one_setting else None, None)
    metadata["ss_network_module"] = export_mmdit.NETWORK_MODULES[family]
    version = export_mmdit.base_model_version(width)
    if version is not None:
        metadata["ss_base_model_version"] = version
    return converted, metadata


def _lora_file(lora: str | os.PathLike) -> Path:
    path = Path(lora)
    if path.is_dir():
        path = path / LORA_WEIGHTS_NAME
    if not path.is_file():
        raise MissingFileError("LoRA not found", "--lora", f"{path} does not exist; give a LoRA folder or its .safetensors file")
    if path.suffix != ".safetensors":
        raise UserError("LoRA refused", "--lora", f"{path} is not a .safetensors file; pickled files are not read for safety")
    return path


def _output_file(output: str | os.PathLike, source: Path) -> Path:
    if not str(output):
        raise UserError("no output file", "--output", "name the .safetensors file to write")
    target = Path(output)
    if target.suffix != ".safetensors":
        raise UserError("output refused", "--output", f"{target} must end in .safetensors (A1111 and ComfyUI look for that)")
    if target.resolve() == source.resolve():
        raise UserError("output refused", "--output", f"{target} is the LoRA being exported")
    folder = target.parent.resolve()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError("output folder not writable", "--output", f"cannot write into {existing}")
    return target


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}, dict(file.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise UserError("LoRA unreadable", "--lora", f"{path} is not a valid safetensors file ({first_line(error)})") from error


