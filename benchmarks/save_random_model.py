"""Write a model built here with random weights (`sd35-medium-random`, `flux-full-random`, ...) as a
diffusers folder, so that benchmarks load it the way a downloaded model loads (`from_pretrained`,
quantized as it loads) instead of building 12 G random parameters for every option.

    .venv/bin/python benchmarks/save_random_model.py --model flux-full-random --dtype bfloat16 \\
        --folder /tmp/flux-full-random      # 24 GB on disk; then --model /tmp/flux-full-random
"""

from __future__ import annotations

import argparse
import time

from diffstyler.models import ModelSpec, load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a random model's name (e.g. flux-full-random, sd35-medium-random)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--folder", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    pipe = load_pipeline(ModelSpec(name=args.model, dtype=args.dtype))
    built = time.perf_counter() - started
    pipe.save_pretrained(args.folder, safe_serialization=True)
    print(f"{args.model} ({args.dtype}) built in {built:.0f} s, written to {args.folder} in {time.perf_counter() - started - built:.0f} s")


if __name__ == "__main__":
    main()
