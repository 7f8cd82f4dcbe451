"""Memory per style at a family's real sizes, with random weights, on the CPU (no GPU, no download).

    .venv/bin/python benchmarks/bench_style_memory.py --model sd15-random   # 512 px
    .venv/bin/python benchmarks/bench_style_memory.py --model sd21-random   # 512 px
    .venv/bin/python benchmarks/bench_style_memory.py --model sdxl-random   # 1024 px (about 14 GB of RAM)
    .venv/bin/python benchmarks/bench_style_memory.py --model sd35-medium-random --resolution 512
        # SD 3.5 Medium's transformer (2.2 G parameters); its text encoders at real widths, T5 shallower

What it measures (float32, the model's native resolution unless --resolution is given):
1. parameter bytes of the UNet and of one style's LoRA (rank 16 on the attention's Q/K/V: what
   each loaded style adds, whatever the image size);
2. one denoising step of `stylize.denoise_jobs` exactly as `diffstyler predict` runs it (one UNet
   or transformer call: the reference row, then per style an unconditional and a conditional row
   (FLUX.1: the conditional one only); features and attention injected in the paper's layers, or
   the family's rules over its blocks), for 1 and then 2 styles: the peak resident set size
   during that call above the resident set size before the first call (Linux VmHWM, reset before
   each call). The difference between 2 and 1 styles is the activation memory of one more style
   (its two rows) in one call; a GPU's peak differs by its allocator, not by the rows' sizes.
The text encoders are freed after encoding the prompts (their bytes are not part of the UNet call).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from diffstyler.backbones import backbone_for
from diffstyler.injection import InjectionConfig
from diffstyler.lora import StyleLoRAConfig, add_style_adapter, set_adapter_scales
from diffstyler.models import ModelSpec, encode_prompts, load_pipeline
from diffstyler.stylize import DenoiseJob, SamplingConfig, StyleRows, denoise_jobs

MIB = 2**20


def resident_bytes(field: str) -> int:
    """A Linux /proc/self/status size (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak_rss() -> None:
    """Linux: the peak resident set size (VmHWM) starts again from the current size."""
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd21-random", help="sd15-random, sd21-random, sdxl-random, sd35-medium-random, "
                                                               "flux-random (or a tiny model)")
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's native resolution")
    args = parser.parse_args()

    started = time.perf_counter()
    pipe = load_pipeline(ModelSpec(name=args.model))
    backbone = backbone_for(pipe)
    resolution = args.resolution or backbone.native_resolution
    unet = backbone.denoiser.requires_grad_(False)
    unet_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    for k in range(2):
        add_style_adapter(unet, StyleLoRAConfig(rank=16), f"s{k}")
    unet.requires_grad_(False)
    style_bytes = sum(p.numel() * p.element_size() for name, p in unet.named_parameters() if ".s0." in name)
    prompts = backbone.size_conditioning(encode_prompts(pipe, ["", "painting of sss", "ugly"]), (resolution, resolution))
    channels, side = backbone.latent_channels, resolution // backbone.latent_factor  # read before the VAE goes
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):  # the denoiser's call needs none of them
        if hasattr(pipe, component):
            setattr(pipe, component, None)
    gc.collect()

    trajectory = torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(0))
    schedule = backbone.schedule(1, backbone.image_tokens(side, side))
    injection = InjectionConfig(feature_steps=1, attention_steps=1)  # the paper's layers, injected in this step
    print(f"model={args.model} resolution={resolution} px (latent {side}x{side}) float32 cpu, threads {torch.get_num_threads()}, "
          f"built in {time.perf_counter() - started:.0f} s")
    print(f"{type(unet).__name__} parameters {unet_bytes / MIB:.0f} MiB; one style's rank-16 Q/K/V LoRA {style_bytes / MIB:.1f} MiB")

    before = resident_bytes("VmRSS")
    peaks = {}
    for styles in (1, 2):
        names = [f"s{k}" for k in range(styles)]
        set_adapter_scales(unet, {name: 1.0 for name in names})
        rows = [StyleRows(name, prompts[1:2], prompts[2:3]) for name in names]
        job = DenoiseJob(trajectory, prompts[:1], rows)
        reset_peak_rss()
        started = time.perf_counter()
        with torch.no_grad():
            denoise_jobs(backbone, [job], schedule, injection, SamplingConfig(steps=1), progress=False)
        peaks[styles] = resident_bytes("VmHWM") - before
        row_count = 1 + (2 if backbone.negative_rows(SamplingConfig().guidance_scale) else 1) * styles
        print(f"styles={styles} ({row_count} rows): peak RSS above the loaded model {peaks[styles] / MIB:.0f} MiB "
              f"({time.perf_counter() - started:.0f} s)")
    per_style = peaks[2] - peaks[1]
    print(f"one more style: activations {per_style / MIB:.0f} MiB + its LoRA {style_bytes / MIB:.1f} MiB "
          f"= {(per_style + style_bytes) / MIB:.0f} MiB")


if __name__ == "__main__":
    main()
