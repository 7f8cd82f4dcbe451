"""Low VRAM: the diffusers / accelerate mechanisms that trade speed for GPU memory.

- VAE slicing (`vae.enable_slicing`): a batch is encoded and decoded one image at a time. The
  same pixels; only helps when several images are decoded at once.
- VAE tiling (`vae.enable_tiling`): an image larger than the VAE's sample size (512 px for SD 1.x
  and 2.x, 1024 px for SDXL) is encoded and decoded in overlapping tiles, blended where they
  overlap. It changes pixels (each tile is normalised on its own), so the outputs' settings record
  it, and only where it applies (`vae_tiling_setting`); at or below the sample size it does nothing.
- CPU offload: the weights wait in CPU memory and go to the GPU when used. "model"
  (`enable_model_cpu_offload`) moves one whole model (text encoder, UNet, VAE) at a time;
  "sequential" (`enable_sequential_cpu_offload`) moves each layer just before it runs: the least
  memory, and much slower. "group" (diffusers' group offloading, `enable_group_offload`) moves one
  block of a model at a time (a transformer block, a UNet block), and on CUDA the next block is
  copied on a side stream while the current one computes: nearly sequential's memory at nearly
  model offload's speed, what a 12 B FLUX.1 transformer needs on a 24 GB GPU; "group_leaf" does the
  same per layer (less memory, more copies). The VAE is not group-offloaded: it stays on the device
  (it is small, and its tiling does not mix with the side stream). The same pixels. Every mode
  needs a CUDA device (`check_offload_device`).

Our loop calls the UNet, the VAE and the text encoders itself, not through the diffusers pipeline's
`__call__`: the accelerate hooks (and diffusers' group-offloading hooks) still move the weights
(they wrap each module's `forward`, and diffusers' `apply_forward_hook` the VAE's `encode` /
`decode`), but inputs must be placed on the hooks' execution device (`execution_device`), not on
the module's `.device`, which is the CPU (or `meta`, under sequential offload) while a model waits.
"""

from __future__ import annotations

from typing import Optional

import torch

from diffstyler.errors import config_error

OFFLOAD_MODES = ("none", "model", "sequential", "group", "group_leaf")
GROUP_OFFLOAD_TYPES = {"group": "block_level", "group_leaf": "leaf_level"}


def check_offload(offload: str, where: str) -> str:
    if offload not in OFFLOAD_MODES:
        raise config_error(where, f"must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    return offload


def check_offload_device(offload: str, device: torch.device | str, where: str) -> None:
    """CPU offload moves weights between CPU and GPU memory: on any other device it means nothing."""
    if offload != "none" and torch.device(device).type != "cuda":
        raise config_error(where, f"offload {offload!r} needs a CUDA device, the run is on {torch.device(device).type}; "
                                  "use none (weights stay where the run is)")


def set_vae_options(vae: torch.nn.Module, tiling: bool, slicing: bool) -> None:
    """Switch the VAE's tiling and slicing on or off, as asked."""
    vae.enable_tiling() if tiling else vae.disable_tiling()
    vae.enable_slicing() if slicing else vae.disable_slicing()


def enable_offload(pipe, offload: str, device: torch.device | str) -> None:
    """Offload the diffusers pipeline's models to the CPU, executed on `device` (`OFFLOAD_MODES`).
    The device is not checked here (`check_offload_device` is the user's check): on the CPU the
    hooks run as they would on a GPU, which is how the tests see them work."""
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif offload in GROUP_OFFLOAD_TYPES:
        enable_group_offload(pipe, GROUP_OFFLOAD_TYPES[offload], torch.device(device))


def enable_group_offload(pipe, offload_type: str, device: torch.device) -> None:
    """diffusers' group offloading of every model but the VAE (which goes to `device`): one block per
    group ("block_level") or one layer ("leaf_level"); on CUDA the next group is prefetched on a
    side stream while the current one computes (`use_stream`)."""
    cuda = device.type == "cuda"
    pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type=offload_type,
                              num_blocks_per_group=1 if offload_type == "block_level" else None,
                              use_stream=cuda, non_blocking=cuda, exclude_modules=["vae"])


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: the device of its accelerate offload hooks when it has some, else
    the device of its weights."""
    for submodule in module.modules():
        hook_device = getattr(getattr(submodule, "_hf_hook", None), "execution_device", None)
        if hook_device is not None:
            return torch.device(hook_device)
    group_device = group_onload_device(module)
    if group_device is not None:
        return group_device
    return next(module.parameters()).device


def group_onload_device(module: torch.nn.Module) -> Optional[torch.device]:
    """The device diffusers' group offloading runs `module` on, None without it (the same look-up
    as `DiffusionPipeline._execution_device`)."""
    from diffusers.hooks.group_offloading import _get_group_onload_device

    try:
        return torch.device(_get_group_onload_device(module))
    except ValueError:  # no group offloading on this module
        return None


def vae_tiling_setting(vae: torch.nn.Module, height: int, width: int) -> Optional[str]:
    """How tiling changes an image of this size: its tile size and overlap when the VAE tiles it,
    None when it does not (tiling off, or the image fits in one tile)."""
    tile = getattr(vae, "tile_sample_min_size", None)
    if not getattr(vae, "use_tiling", False) or max(height, width) <= tile:
        return None
    return f"{tile} px tiles, {vae.tile_overlap_factor} overlap"
