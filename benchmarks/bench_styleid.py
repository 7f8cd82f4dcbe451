"""From a new style image to the first result: StyleID against fit-then-predict, and the per-image
cost of both against the family's own txt2img on the same components; StyleID's rows per step.

    .venv/bin/python benchmarks/bench_styleid.py                                # tiny, 64 px, 20 steps, 200-step fit
    .venv/bin/python benchmarks/bench_styleid.py --model sd21-random --resolution 64 --steps 10

One process, one `DiffStylerPipeline` (the family's components), every call warmed up first on
other images, trajectories never reused unless said:
1. first result, StyleID: `pipe(content, styles=[style image])`: the content and the style image
   inverted (one call per sampler step, both rows together), then stylized;
2. first result, fit then predict: `train_style` of the same image on the loaded model
   (`--fit-steps`, the paper's 200, rank 16, at the same resolution), then `pipe(content, styles=[LoRA])`
   (the content inverted, then DiffStyler at the paper's injection);
3. per image once the style is ready, inversions included: StyleID (content and style image
   inverted: a content of another size needs the style inverted at that size), StyleID with the
   style's trajectory kept (another content of the same size), DiffStyler, and the family's
   txt2img pipeline generating an image of the same size in the same steps (the fitted LoRA active).
Rows are counted by a forward pre-hook on the denoiser: every row of every call (a row is one
latent through the denoiser); StyleID's rows per denoising step for 1 and 2 image styles.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import ImageOps

from bench_rows import counting_rows  # this folder: each denoiser call's rows, by a forward pre-hook
from diffstyler import DiffStylerPipeline, train_style
from diffstyler.images import load_image, resize_to_multiple
from diffstyler.lora import StyleLoRAConfig

DATA = Path(__file__).resolve().parents[1] / "data"
CONTENT, OTHER_CONTENT = DATA / "content_shapes.png", DATA / "batch" / "content" / "shapes.png"
STYLE, SECOND_STYLE, WARM_UP_STYLE = DATA / "styles" / "waves.png", DATA / "styles" / "checks.png", DATA / "style_stripes.png"


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    value = call()
    return time.perf_counter() - started, value


@torch.no_grad()
def stylize(pipe: DiffStylerPipeline, content, styles, steps: int, resolution: int, keep: bool = False):
    if not keep:
        pipe.store.memory.clear()  # nothing inverted before
    return pipe(content, styles=styles, num_inference_steps=steps, resolution=resolution, output_type="latent")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--fit-steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = DiffStylerPipeline.from_pretrained(args.model, progress=False)
    steps, resolution = args.steps, args.resolution
    size = resize_to_multiple(load_image(CONTENT), resolution, pipe.backbone.pixel_multiple).size
    other_content = ImageOps.fit(load_image(OTHER_CONTENT), size)  # a new content of the same size
    rows, handle = counting_rows(pipe.denoiser)
    with tempfile.TemporaryDirectory() as folder:
        # warm-up: every kind of call once, on images not measured
        warm_lora = train_style(WARM_UP_STYLE, Path(folder) / "warm", steps=2, model=args.model, resolution=resolution,
                                pipe=pipe.pipe, progress=False)
        pipe.load_style(warm_lora, name="warm")
        stylize(pipe, other_content, ["warm"], steps, resolution)
        stylize(pipe, other_content, [str(WARM_UP_STYLE)], steps, resolution)

        # 1. StyleID, from a new style image to its first result
        rows.clear()
        styleid_first, _ = timed(lambda: stylize(pipe, CONTENT, [str(STYLE)], steps, resolution))
        styleid_calls = list(rows)
        # 2. fit, then predict
        fit_seconds, lora = timed(lambda: train_style(STYLE, Path(folder) / "fitted", steps=args.fit_steps, model=args.model,
                                                      lora=StyleLoRAConfig(rank=16), resolution=resolution, pipe=pipe.pipe,
                                                      progress=False))
        pipe.load_style(lora, name="fitted")
        rows.clear()
        diffstyler_first, _ = timed(lambda: stylize(pipe, CONTENT, ["fitted"], steps, resolution))
        diffstyler_rows = sum(rows)

        # 3. per image, the style ready
        styleid_image, _ = timed(lambda: stylize(pipe, CONTENT, [str(STYLE)], steps, resolution))
        stylize(pipe, CONTENT, [str(STYLE)], steps, resolution)  # the style's trajectory at this size stored
        rows.clear()
        styleid_kept, _ = timed(lambda: stylize(pipe, other_content, [str(STYLE)], steps, resolution, keep=True))
        kept_rows = sum(rows)
        diffstyler_image, _ = timed(lambda: stylize(pipe, CONTENT, ["fitted"], steps, resolution))
        guidance = pipe.backbone.default_guidance_scale
        family = dict(height=size[1], width=size[0], num_inference_steps=steps, guidance_scale=guidance, output_type="latent")
        pipe.pipe("painting of <sss>", **family)  # warm-up
        rows.clear()
        txt2img, _ = timed(lambda: pipe.pipe("painting of <sss>", **family))
        txt2img_rows = sum(rows)
        rows.clear()
        stylize(pipe, CONTENT, [str(STYLE), str(SECOND_STYLE)], steps, resolution)
        two_styles = list(rows)
    handle.remove()

    inversion_calls = styleid_calls[:-steps]
    print(f"model {args.model}, {size[0]}x{size[1]} px, {steps} steps, {torch.get_num_threads()} threads, "
          f"fit {args.fit_steps} steps (rank 16)")
    print("| from a new style image to the first result | seconds | ratio |")
    print("| --- | --- | --- |")
    print(f"| StyleID: invert content + style, stylize | {styleid_first:.2f} | 1.00x |")
    print(f"| fit then predict: fit | {fit_seconds:.2f} | |")
    print(f"| fit then predict: predict (invert content, stylize) | {diffstyler_first:.2f} | |")
    total = fit_seconds + diffstyler_first
    print(f"| fit then predict: total | {total:.2f} | {total / styleid_first:.1f}x |")
    print()
    print("| per image, the style ready (inversions included) | seconds | vs txt2img | rows |")
    print("| --- | --- | --- | --- |")
    print(f"| txt2img ({type(pipe.pipe).__name__}, guidance {guidance}) | {txt2img:.2f} | 1.00x | {txt2img_rows} |")
    print(f"| DiffStyler (LoRA) | {diffstyler_image:.2f} | {diffstyler_image / txt2img:.2f}x | {diffstyler_rows} |")
    print(f"| StyleID (content and style inverted) | {styleid_image:.2f} | {styleid_image / txt2img:.2f}x | {sum(styleid_calls)} |")
    print(f"| StyleID (style's trajectory kept: a content of the same size) | {styleid_kept:.2f} | {styleid_kept / txt2img:.2f}x | {kept_rows} |")
    print()
    print(f"StyleID rows per denoiser call: inversion {len(inversion_calls)} calls x {sorted(set(inversion_calls))} rows "
          f"(content + style image); denoising, per step, 1 style: {sorted(set(styleid_calls[-steps:]))} "
          f"(content, style, stylized); 2 styles: {sorted(set(two_styles[-steps:]))}")


if __name__ == "__main__":
    main()
