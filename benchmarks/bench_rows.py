"""Rows per image, and seconds, of one stylization against the family's own diffusers txt2img.

For each model: one `DiffStylerPipeline` call (one style, the default preset, inversion included,
no cached trajectory) against the family's own pipeline (`StableDiffusionPipeline`,
`StableDiffusionXLPipeline`, `StableDiffusion3Pipeline`, `FluxPipeline`) generating an image of the
same size in the same number of steps, on the same components, in the same process. Rows are
counted by a hook on the denoiser: every row of every call (a row is one latent through the
denoiser). The floor for the method is: inversion (one row per evaluation), then per step one
reference row while an injection window is open plus the style's rows (2 with classifier-free
guidance rows, 1 on FLUX.1); txt2img needs the style's rows alone.

    python benchmarks/bench_rows.py                                  # every tiny model, 28 steps, 64 px
    python benchmarks/bench_rows.py --models sd21-random --steps 10 --resolution 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from diffstyler import DiffStylerPipeline
from diffstyler.injection import InjectionConfig, window_steps

CONTENT = Path(__file__).resolve().parents[1] / "data" / "content_shapes.png"


def counting_rows(denoiser: torch.nn.Module) -> tuple[list[int], object]:
    rows: list[int] = []

    def count(module, args, kwargs):
        latents = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        rows.append(latents.shape[0])

    return rows, denoiser.register_forward_pre_hook(count, with_kwargs=True)


def floor_rows(steps: int, negative_rows: bool, inversion_evaluations: int) -> int:
    injection = InjectionConfig()
    window = max(window_steps(injection.feature_steps, steps), window_steps(injection.attention_steps, steps))
    style_rows = 2 if negative_rows else 1
    return inversion_evaluations + window * (1 + style_rows) + (steps - window) * style_rows


@torch.no_grad()
def measure(name: str, steps: int, resolution: int) -> str:
    from tests.helpers import write_random_lora  # a random LoRA of the family, as `diffstyler fit` writes one

    with tempfile.TemporaryDirectory() as folder:
        lora = write_random_lora(Path(folder) / "style", seed=1, model=name).parent
        pipe = DiffStylerPipeline.from_pretrained(name, progress=False)
        pipe.load_style(lora, name="style")
        backbone = pipe.backbone
        guidance = backbone.default_guidance_scale
        rows, handle = counting_rows(backbone.denoiser)
        pipe(CONTENT, num_inference_steps=steps, resolution=resolution)  # warm-up
        pipe.store.memory.clear()
        rows.clear()
        started = time.perf_counter()
        result = pipe(CONTENT, num_inference_steps=steps, resolution=resolution)
        ours, our_rows = time.perf_counter() - started, sum(rows)
        width, height = result.images[0].size
        family = pipe.pipe
        family_kwargs = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance, output_type="pil")
        if backbone.kind == "mmdit":
            family_kwargs["max_sequence_length"] = backbone.max_sequence_length
        # the style's LoRA stays active: a styled txt2img, the same weights in every call
        family("painting of sss", **family_kwargs)  # warm-up
        rows.clear()
        started = time.perf_counter()
        family("painting of sss", **family_kwargs)
        theirs, their_rows = time.perf_counter() - started, sum(rows)
        handle.remove()
        inversion = steps  # one evaluation per level, plus FireFlow's first
        if backbone.solver(None) == "fireflow":
            inversion += 1
        floor = floor_rows(steps, backbone.negative_rows(guidance), inversion)
        return (f"| {name} | {steps} | {width}x{height} | {our_rows} (floor {floor}) | {their_rows} | "
                f"{our_rows / their_rows:.2f}x | {ours:.2f} s | {theirs:.2f} s | {ours / theirs:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux-schnell"])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}; one style, default preset, inversion included")
    print("| model | steps | size | rows, ours | rows, txt2img | rows ratio | seconds, ours | seconds, txt2img | time ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        print(measure(name, args.steps, args.resolution), flush=True)


if __name__ == "__main__":
    main()
