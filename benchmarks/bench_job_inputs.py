"""What the reliability checks cost: the per-job input check before the model loads, and the locked
atomic write of every output.

    .venv/bin/python benchmarks/bench_job_inputs.py                  # 200 photos of 512 x 512 and 20 of 4000 x 3000
    .venv/bin/python benchmarks/bench_job_inputs.py --small 1000 --large 50

1. `data.inputs.job_input_failures` over a folder of photos (one style, no mask): seconds per photo
   with every photo decoded in full (the default budget covers them) against the baseline of the same
   call reading headers only (`full_decode_pixels=0`), in the same process; PNGs of 512 x 512 and
   JPEGs of 4000 x 3000 (12 MP).
2. `outputs.atomic_write` of a 30 KB file (a 512 px result PNG's size) against the baseline of a plain
   temporary file renamed into place (open, write, close, rename: what it did before it locked its
   temporary file), 500 files each, in the same folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffstyler.data.inputs import job_input_failures  # noqa: E402
from diffstyler.data.jobs import StyleEntry, StylizeDataModule  # noqa: E402
from diffstyler.outputs import atomic_write  # noqa: E402
from tests.helpers import write_random_lora  # noqa: E402


def photos(folder: Path, count: int, size: tuple[int, int], suffix: str) -> Path:
    """`count` noisy photos (noise does not compress: decoding costs what a photo's does)."""
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    pixels = generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    for k in range(count):
        Image.fromarray(np.roll(pixels, k, axis=1)).save(folder / f"photo{k:05d}{suffix}", quality=90)
    return folder


def seconds_per_photo(jobs, runs: int, **kwargs) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        failures = job_input_failures(jobs, **kwargs)
        times.append(time.perf_counter() - started)
        assert failures == {}
    return statistics.median(times) / len(jobs)


def plain_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "xb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def seconds_per_write(folder: Path, write, count: int) -> float:
    data = os.urandom(30_000)
    started = time.perf_counter()
    for k in range(count):
        write(folder / f"result{k:05d}.png", data)
    return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200, help="photos of 512 x 512 (PNG)")
    parser.add_argument("--large", type=int, default=20, help="photos of 4000 x 3000 (JPEG)")
    parser.add_argument("--runs", type=int, default=3)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        lora = write_random_lora(scratch / "lora", seed=0).parent
        print("1. per-job input check (data.inputs.job_input_failures), median of", arguments.runs, "runs")
        for name, count, size, suffix in (("512 x 512 PNG", arguments.small, (512, 512), ".png"),
                                          ("4000 x 3000 JPEG", arguments.large, (4000, 3000), ".jpg")):
            folder = photos(scratch / name.replace(" ", "_"), count, size, suffix)
            jobs = StylizeDataModule(content=[str(folder)], styles=[StyleEntry(lora=str(lora))]).jobs()
            headers = seconds_per_photo(jobs, arguments.runs, full_decode_pixels=0)
            decoded = seconds_per_photo(jobs, arguments.runs, full_decode_pixels=1 << 40)
            print(f"   {count} photos of {name}: headers {headers * 1e3:.2f} ms/photo (baseline), "
                  f"full decode {decoded * 1e3:.2f} ms/photo = {decoded / headers:.1f}x")
        print("2. writing a 30 KB result, 500 files")
        (scratch / "plain").mkdir()
        (scratch / "locked").mkdir()
        plain = seconds_per_write(scratch / "plain", plain_write, 500)
        locked = seconds_per_write(scratch / "locked", lambda path, data: atomic_write(path, lambda handle: handle.write(data)), 500)
        print(f"   plain temporary file + rename {plain * 1e6:.0f} us/file (baseline), "
              f"atomic_write (locked) {locked * 1e6:.0f} us/file = {locked / plain:.2f}x")


if __name__ == "__main__":
    main()
