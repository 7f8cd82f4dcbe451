"""Memory of a training in the demo's page against a predict in it, and against a training that
loads its own base model (what the page did before `train_style(pipe=...)`), on the CPU.

    .venv/bin/python benchmarks/bench_demo_training.py                      # tiny (seconds)
    .venv/bin/python benchmarks/bench_demo_training.py --model sd21-random  # SD 2.1's real sizes (about 10 GB of RAM)

One process: the demo's model is loaded as `diffstyler demo` loads it (`page.load_demo`), then,
each from a peak resident set size reset to the current one (Linux VmHWM), the growth of the peak
above the size before it of:
1. a training in the page (`DemoActions.train`: `train_style(pipe=...)` on the loaded model);
2. a predict in the page with the style just trained (`DemoActions.run`);
3. `train_style(model=...)` alone, which builds a second base model (the page's old way).
Small images and one step each (`--resolution`, `--steps`): what differs between 1 and 3 is the
base model, whatever the image size. The base model's parameter bytes are printed for scale.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from diffstyler.demo.actions import Session
from diffstyler.demo.config import DemoConfig
from diffstyler.demo.controls import MAX_STYLES
from diffstyler.demo.page import load_demo
from diffstyler.images import load_image
from diffstyler.lora import StyleLoRAConfig
from diffstyler.masks import SegmenterConfig
from diffstyler.training import train_style

MIB = 2**20
STYLE_IMAGE = Path(__file__).resolve().parents[1] / "data" / "style_stripes.png"


def resident_bytes(field: str) -> int:
    """A Linux /proc/self/status size (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def peak_growth(action) -> tuple[float, float]:
    """(peak resident growth in MiB, seconds) of `action()`."""
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    before, started = resident_bytes("VmRSS"), time.perf_counter()
    action()
    return (resident_bytes("VmHWM") - before) / MIB, time.perf_counter() - started


class NoProgress:
    def __call__(self, *args, **kwargs) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, sd15-random, sd21-random, sdxl-random")
    parser.add_argument("--resolution", type=int, default=64, help="of the training and the predict")
    parser.add_argument("--steps", type=int, default=1, help="training and denoising steps")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-demo-") as folder:
        os.environ["GRADIO_TEMP_DIR"] = str(Path(folder) / "gradio")  # the LoRA's served copy goes there
        config = DemoConfig(model=args.model, device="cpu", resolution=args.resolution, segmenter=SegmenterConfig(weights="tiny"),
                            output_folder=folder, steps=args.steps, feature_steps=args.steps, attention_steps=args.steps,
                            train_steps=args.steps, train_resolution=args.resolution)
        started = time.perf_counter()
        actions = load_demo(config)
        unet_bytes = sum(p.numel() * p.element_size() for p in actions.pipe.unet.parameters())
        base_bytes = unet_bytes + sum(p.numel() * p.element_size() for module in (actions.pipe.pipe.vae, actions.pipe.pipe.text_encoder)
                                      for p in module.parameters())
        print(f"model={args.model} float32 cpu, {args.resolution} px, {args.steps} step(s); loaded in {time.perf_counter() - started:.0f} s, "
              f"resident {resident_bytes('VmRSS') / MIB:.0f} MiB; base model parameters {base_bytes / MIB:.0f} MiB (UNet {unet_bytes / MIB:.0f})")

        session = Session()
        style = load_image(STYLE_IMAGE)
        trained = {}

        def train_in_page() -> None:
            message, trained["session"], *_ = actions.train(session, style, "bench", NoProgress())

        def predict_in_page() -> None:
            content = load_image(STYLE_IMAGE)
            no_other_tabs = ("", "points", [], "", None) * (MAX_STYLES - 1)
            actions.run(trained["session"], content, args.steps, 7.5, args.steps, args.steps, "paper", 0, NoProgress(),
                        "bench", "whole image", [], "", None, *no_other_tabs)

        def train_alone() -> None:
            train_style(str(STYLE_IMAGE), Path(folder) / "alone", steps=args.steps, model=args.model, resolution=args.resolution,
                        lora=StyleLoRAConfig(rank=config.train_rank), accelerator="cpu", progress=False)

        results = {name: peak_growth(action) for name, action in
                   (("training in the page", train_in_page), ("predict in the page", predict_in_page),
                    ("training loading its own model", train_alone))}
    for name, (growth, seconds) in results.items():
        print(f"{name:32s} peak +{growth:7.0f} MiB  ({seconds:.1f} s)")
    page, predict, alone = (results[name][0] for name in results)
    print(f"training in the page / predict: {page / predict:.2f}; training loading its own model / training in the page: "
          f"{alone / page:.2f}")


if __name__ == "__main__":
    main()
