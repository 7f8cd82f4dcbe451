"""`diffstyler fit` over a folder (one LoRA per style image) against separate fits, in one process.

    .venv/bin/python benchmarks/bench_fit_folder.py                  # tiny model, CPU, 4 images, 10 steps
    .venv/bin/python benchmarks/bench_fit_folder.py --images 8 --steps 20

Measures
1. seconds for a fit over a folder of N style images against N fits of one image each, run
   the same way (`diffstyler.cli.main` in this process, the smoke config, no checkpoints or
   previews): the ratio says what the per-image loop costs or saves;
2. a rerun over the finished folder (every LoRA found and skipped) against one fit of one image;
3. UNets alive (found by the garbage collector) after the folder fit of N images and the
   resident set size then: one UNet and a flat RSS mean that no image's model outlives its fit.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from PIL import Image  # noqa: E402

from diffstyler.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_styles(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"style{index}.png"
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def fit(images: list[str], output_dir: Path, logs: Path, steps: int, *extra: str) -> float:
    args = ["fit", "--config", str(REPO / "configs/smoke/style.yaml"), "--data.images", json.dumps(images),
            "--model.output_dir", str(output_dir), "--trainer.max_steps", str(steps), "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(logs), *extra]
    start = time.perf_counter()
    try:
        main(args)
    except SystemExit as exit_info:
        if exit_info.code:
            raise
    return time.perf_counter() - start


def live_unets() -> int:
    gc.collect()
    return sum(isinstance(thing, UNet2DConditionModel) for thing in gc.get_objects())


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    options = parser.parse_args()
    os.chdir(REPO)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        styles = write_styles(root / "styles", options.images)
        fit([str(styles[0])], root / "warm", root / "logs", 1)  # imports and first-call costs out of the way

        per_image = ["--data.one_lora_per_image", "true"]
        fit([str(styles[0])], root / "one", root / "logs", options.steps, *per_image)
        after_one = live_unets(), resident_mib()
        folder_seconds = fit([str(root / "styles")], root / "folder", root / "logs", options.steps, *per_image)
        after_all = live_unets(), resident_mib()
        separate_seconds = sum(fit([str(path)], root / "separate" / path.stem, root / "logs", options.steps) for path in styles)
        rerun_seconds = fit([str(root / "styles")], root / "folder", root / "logs", options.steps, *per_image)
        single_seconds = separate_seconds / len(styles)

    print(f"{options.images} images, {options.steps} steps each, tiny model, CPU ({os.cpu_count()} cores)")
    print(f"folder fit: {folder_seconds:.2f} s; {options.images} separate fits: {separate_seconds:.2f} s "
          f"(folder / separate = {folder_seconds / separate_seconds:.2f})")
    print(f"rerun over the finished folder: {rerun_seconds:.2f} s = {rerun_seconds / single_seconds:.2f} x one fit of one image")
    print(f"after 1 image: {after_one[0]} UNet(s) alive, RSS {after_one[1]:.0f} MiB; "
          f"after {options.images} images: {after_all[0]} UNet(s) alive, RSS {after_all[1]:.0f} MiB")


if __name__ == "__main__":
    main_benchmark()
    sys.exit(0)
