"""Time from starting `diffstyler` with a bad command line to its first line on stderr.

    .venv/bin/python benchmarks/bench_cli_errors.py                    # this checkout, 3 runs per command
    .venv/bin/python benchmarks/bench_cli_errors.py --repo ../old --runs 5   # another checkout of the project

Each command runs as `python -m diffstyler.cli ...` in a fresh process with `PYTHONPATH=<repo>`, from
the repository's root, offline; the clock stops when the error line (`diffstyler ...: error: ...`)
reaches stderr; it is the first line there unless a library printed a warning before it. Reported:
the median and the range over the runs, and the exit status and the error line of the last run.

The commands are errors that need no model: an unknown subcommand, a `--config` file that does not
exist, a config file that is not YAML, an unknown option (needs the parser, hence the imports), and
`trainer.max_steps 0` (the same).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commands(scratch: Path) -> dict[str, list[str]]:
    broken = scratch / "broken.yaml"
    broken.write_text("model:\n  sampling: [3,\n")
    return {
        "unknown subcommand": ["predcit", "--config", "configs/smoke/stylize.yaml"],
        "missing --config file": ["fit", "--config", "configs/smoke/nope.yaml"],
        "config file not YAML": ["predict", "--config", "configs/smoke/stylize.yaml", "--config", str(broken)],
        "unknown option": ["predict", "--config", "configs/smoke/stylize.yaml", "--model.sampling.stepz", "3"],
        "max_steps 0": ["fit", "--config", "configs/smoke/style.yaml", "--trainer.max_steps", "0"],
    }


def time_to_error_line(repo: Path, args: list[str]) -> tuple[float, int, str]:
    """(seconds to the error line on stderr, exit status, that line)."""
    environment = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}
    environment.pop("DIFFSTYLER_DEBUG", None)
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "diffstyler.cli", *args], cwd=repo, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = ""
    for line in process.stderr:
        if line.startswith("diffstyler") and ": error: " in line:
            break
    seconds = time.perf_counter() - start
    process.stderr.read()
    return seconds, process.wait(), line.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose diffstyler runs (default: this one)")
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    repo = options.repo.resolve()
    print(f"{repo}: {options.runs} runs per command, {os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory() as scratch:
        for name, args in commands(Path(scratch)).items():
            runs = [time_to_error_line(repo, args) for _ in range(options.runs)]
            seconds = [run[0] for run in runs]
            _, status, line = runs[-1]
            print(f"{name:24s} {statistics.median(seconds):6.2f} s (range {min(seconds):.2f}-{max(seconds):.2f}), "
                  f"status {status}: {line[:110]}")


if __name__ == "__main__":
    main()
