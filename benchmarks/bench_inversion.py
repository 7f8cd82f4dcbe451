"""Inversion then sampling without a style: how close the content comes back, per inversion option.

The method denoises the style rows from the content's inverted latent z_T, and the reference rows
run on the inverted trajectory, so an inversion that the sampler does not undo moves the result
away from the content. For each model and each inversion option this inverts a seeded image with
the base model (the empty prompt, as `inversion_prompt` defaults), samples it back with the
method's own sampler (DDIM, or flow-matching Euler), and reports the error of the clean latent
(mean squared error relative to the latent's variance), the PSNR of the decoded image against the
VAE's own reconstruction (what a perfect inversion would give), and the denoiser evaluations spent
on the inversion. Sampling from fresh noise is the baseline.

    python benchmarks/bench_inversion.py                          # tiny models, 28 steps
    python benchmarks/bench_inversion.py --models tiny-flux --steps 4 10 28 50
"""

from __future__ import annotations

import argparse

import torch

from diffstyler.backbones import backbone_for
from diffstyler.models import ModelSpec, load_pipeline
from diffstyler.sampling import INVERSION_SOLVERS, invert, sample

OPTIONS = {  # label: (solver, substeps)
    "euler": ("euler", 1),
    "euler, 4 sub-steps": ("euler", 4),
    "midpoint (RF-Solver)": ("midpoint", 1),
    "fireflow": ("fireflow", 1),
}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))


@torch.no_grad()
def measure(name: str, steps: int, resolution: int) -> list[str]:
    pipe = load_pipeline(ModelSpec(name))
    backbone = backbone_for(pipe)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, resolution, resolution * 3 // 4, generator=generator) * 2 - 1
    z0 = backbone.encode_images(pixels)
    decoded = backbone.decode_latents(z0)
    conditioning = backbone.size_conditioning(backbone.encode_prompts([""]), tuple(pixels.shape[-2:]))
    calls = []

    def model(x, t):
        calls.append(1)
        return backbone.predict(x, t, conditioning, backbone.default_guidance_scale)

    tokens = backbone.image_tokens(*z0.shape[-2:])
    rows = []
    baseline = sample(model, torch.randn(z0.shape, generator=generator), backbone.schedule(steps, tokens))
    rows.append(f"| {name} | {steps} | fresh noise (baseline) | - | {float((baseline - z0).pow(2).mean() / z0.var()):.2e} | "
                f"{psnr(backbone.decode_latents(baseline), decoded):.1f} |")
    for label, (solver, substeps) in OPTIONS.items():
        if solver not in backbone.inversion_solvers:
            continue
        schedule = backbone.schedule(steps, tokens, solver)
        calls.clear()
        (trajectory,) = invert(model, z0, schedule, substeps, progress=False)
        evaluations = len(calls)
        back = sample(model, trajectory[:1], schedule)
        rows.append(f"| {name} | {steps} | {label} | {evaluations} | {float((back - z0).pow(2).mean() / z0.var()):.2e} | "
                    f"{psnr(backbone.decode_latents(back), decoded):.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny-sd3", "tiny-flux", "tiny-flux-schnell"])
    parser.add_argument("--steps", nargs="+", type=int, default=[28])
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    print(f"inversion solvers: {', '.join(INVERSION_SOLVERS)}; threads {torch.get_num_threads()}")
    print("| model | steps | inversion | evaluations | latent error (MSE / var) | PSNR vs VAE (dB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        for steps in args.steps:
            for row in measure(name, steps, args.resolution):
                print(row, flush=True)


if __name__ == "__main__":
    main()
