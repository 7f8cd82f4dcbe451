"""Throughput of dataset stylization, as ratios against baselines run in the same process.

    .venv/bin/python benchmarks/bench_throughput.py                          # tiny model, CPU
    .venv/bin/python benchmarks/bench_throughput.py --model tiny-sdxl        # the family's tiny model
    .venv/bin/python benchmarks/bench_throughput.py --model sd21-random --resolution 128 --steps 3 --contents 2
    .venv/bin/python benchmarks/bench_throughput.py --model sd21-random --device cuda --dtype float16 \
        --resolution 512 --steps 50 --contents 8                           # on a GPU (benchmarks/gpu_check.sh)

Measures
1. images per minute for `data.batch_size` 1, 2 and 4 (product jobs: every content x 2 styles,
   run through `StylizePredictor.stylize_jobs` exactly as the predict loop does, inversion
   included, no cache); the ratio is against batch size 1;
2. start-up for a 10,000-row manifest (`StylizeDataModule` built, jobs listed, data loader made)
   against reading the same CSV with the csv module alone;
3. peak memory with 1, 3 and 10 LoRAs loaded on the one UNet, each run in a fresh process that
   loads the model, then the LoRAs, and stylizes one job: peak CUDA memory, or on the CPU the peak
   resident set size from the moment the model is built (Linux VmHWM, reset then), and the UNet's
   parameter bytes. Target: 3 styles within 5% of 1 style.

The family comes with the model: `tiny`, `tiny-sd15`, `tiny-sdxl`, or each family's real sizes with
random weights, `sd15-random`, `sd21-random`, `sdxl-random` (see bench_stylize.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from diffstyler.data.jobs import Job, StyleEntry, StylizeDataModule, chunked
from diffstyler.injection import InjectionConfig
from diffstyler.lora import StyleLoRAConfig, add_style_adapter, save_lora
from diffstyler.models import ModelSpec
from diffstyler.predictor import OutputConfig, StylizePredictor
from diffstyler.stylize import SamplingConfig

CONTENT = Path(__file__).resolve().parents[1] / "data" / "content_shapes.png"


def make_predictor(args, folder: Path) -> StylizePredictor:
    predictor = StylizePredictor(
        model=ModelSpec(name=args.model, dtype=args.dtype),
        injection=InjectionConfig(feature_steps=max(1, args.steps * 3 // 5), attention_steps=max(1, args.steps // 2)),
        sampling=SamplingConfig(steps=args.steps),
        output=OutputConfig(folder=str(folder / "out"), grid=False, overwrite=True),
        inversion_cache=None,
        max_loaded_adapters=16,
    )
    predictor.configure_model()
    return predictor.to(args.device)


def write_loras(predictor: StylizePredictor, folder: Path, count: int) -> list[Path]:
    """`count` random rank-16 LoRAs for the predictor's UNet, saved as `diffstyler fit` saves them."""
    unet = predictor.pipeline.denoiser
    paths = []
    for k in range(count):
        add_style_adapter(unet, StyleLoRAConfig(rank=16), "bench")
        generator = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if "lora_B.bench." in name:
                    param.copy_((torch.randn(param.shape, generator=generator) * 0.05).to(param.dtype))
        save_lora(unet, "bench", folder / f"style{k}")
        (folder / f"style{k}" / "diffstyler_lora.json").write_text(json.dumps({"prompt": f"painting of style {k}"}))
        unet.delete_adapters("bench")
        paths.append(folder / f"style{k}")
    unet.requires_grad_(False)
    return paths


def write_contents(folder: Path, count: int) -> list[str]:
    paths = []
    for k in range(count):
        path = folder / f"content{k}.png"
        Image.open(CONTENT).rotate(10 * k).save(path)
        paths.append(str(path))
    return paths


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def images_per_minute(predictor: StylizePredictor, jobs: list[Job], batch_size: int, device: str) -> float:
    predictor.pipeline.store.memory.clear()  # every run inverts its contents
    _sync(device)
    start = time.perf_counter()
    for chunk in chunked(jobs, batch_size):
        predictor.writer.write(predictor.stylize_jobs(chunk))
    _sync(device)
    return len(jobs) * 60 / (time.perf_counter() - start)


def throughput(args) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        predictor = make_predictor(args, folder)
        loras = write_loras(predictor, folder, 2)
        styles = [StyleEntry(lora=str(path)) for path in loras]
        jobs = StylizeDataModule(content=write_contents(folder, args.contents), styles=styles, pairing="product",
                                 resolution=args.resolution).jobs()
        images_per_minute(predictor, jobs[:2], 2, args.device)  # warm-up: adapters, embeddings, kernels
        print(f"throughput: {len(jobs)} product jobs ({args.contents} contents x 2 styles), {args.model}, "
              f"{args.resolution} px, {args.steps} steps, {args.device} {args.dtype}")
        rates = {}
        for batch_size in (1, 2, 4):
            rates[batch_size] = images_per_minute(predictor, jobs, batch_size, args.device)
        for batch_size, rate in rates.items():
            print(f"  batch_size {batch_size}: {rate:8.1f} images/min ({rate / rates[1]:.2f}x batch_size 1)")


def startup(args) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        lora = folder / "style"
        predictor = make_predictor(argparse.Namespace(**{**vars(args), "model": "tiny", "device": "cpu", "dtype": "float32"}), folder)
        write_loras(predictor, folder, 1)[0].rename(lora)
        manifest = folder / "jobs.csv"
        rows = ["content,styles"] + [f"images/{k // 1000:02d}/img{k:05d}.jpg,style" for k in range(args.manifest_rows)]
        manifest.write_text("\n".join(rows) + "\n")
        start = time.perf_counter()
        with open(manifest, newline="") as handle:
            parsed = list(csv.DictReader(handle))
        baseline = time.perf_counter() - start
        start = time.perf_counter()
        data = StylizeDataModule(manifest=str(manifest), styles=[StyleEntry(lora=str(lora), name="style")], batch_size=4)
        loader = data.predict_dataloader()
        built = time.perf_counter() - start
        assert len(parsed) == args.manifest_rows and sum(len(chunk) for chunk in loader.dataset.chunks) == args.manifest_rows
        print(f"start-up, {args.manifest_rows}-row manifest: {built:.2f} s ({built / args.manifest_rows * 1e6:.0f} us per row; "
              f"csv parsing alone {baseline * 1e3:.0f} ms, {built / baseline:.0f}x)")


def reset_peak_rss() -> None:
    """Linux: reset the process's peak resident set size (VmHWM) to its current size."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """Peak resident set size in bytes since `reset_peak_rss` (VmHWM of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(args) -> None:
    """In a fresh process: load the model and `args.memory_child` LoRAs, stylize one job, print JSON."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        predictor = make_predictor(args, folder)
        loras = write_loras(predictor, folder, args.memory_child)
        reset_peak_rss()  # the peak of building the model is not what is measured
        for path in loras:
            predictor.pipeline.adapters.adapter_for(StyleEntry(lora=str(path)).resolved().lora)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        job = StylizeDataModule(content=write_contents(folder, 1), styles=[StyleEntry(lora=str(loras[0]))],
                                resolution=args.resolution).jobs()[0]
        assert predictor.writer.write(predictor.stylize_jobs([job]))[0].status == "done"
        unet_bytes = sum(p.numel() * p.element_size() for p in predictor.pipeline.denoiser.parameters())
        peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else peak_rss()
        print(json.dumps({"styles": args.memory_child, "peak_bytes": peak, "unet_bytes": unet_bytes}))


def memory(args) -> None:
    what = "peak CUDA memory" if args.device.startswith("cuda") else "peak RSS"
    print(f"memory with LoRAs loaded ({args.model}, {args.resolution} px, {args.device} {args.dtype}; {what}, fresh process each):")
    results = []
    for count in (1, 3, 10):
        command = [sys.executable, __file__, "--memory-child", str(count), "--model", args.model, "--device", args.device,
                   "--dtype", args.dtype, "--resolution", str(args.resolution), "--steps", str(args.steps)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    for result in results:
        print(f"  {result['styles']:2d} styles: {what} {result['peak_bytes'] / 2**20:9.1f} MiB "
              f"({result['peak_bytes'] / results[0]['peak_bytes']:.3f}x 1 style), UNet + adapters "
              f"{result['unet_bytes'] / 2**20:8.1f} MiB ({result['unet_bytes'] / results[0]['unet_bytes']:.3f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="the family's model: tiny, tiny-sd15, tiny-sdxl, sd15-random, sd21-random or sdxl-random")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--contents", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--manifest-rows", type=int, default=10_000)
    parser.add_argument("--only", choices=("throughput", "startup", "memory"), default=None)
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args)
        return
    for name, measure in (("throughput", throughput), ("startup", startup), ("memory", memory)):
        if args.only in (None, name):
            measure(args)


if __name__ == "__main__":
    main()
