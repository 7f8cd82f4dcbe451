"""A quiet console: the smoke fit and predict, run as the `diffstyler` console script, print only
their progress bars and our own lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffstyler.console import verbose_requested

# Every line a default smoke fit and predict may print. Progress-bar frames (tqdm, split at "\r")
# end with their "[elapsed<remaining, ...]" part, so that a message glued after a frame fails too.
ALLOWED_LINES = (
    r"(Steps|Jobs): +(\d+%)?\|[^|]*\| *\d+/(\d+|\?) \[[^\]]*\] *",  # one bar each: no "Training", no "Predicting"
    r"diffstyler fit: LoRA written to \S+ \(4 steps, \d+\.\d s\)",
    r"diffstyler predict: 1 job: 1 done, 0 already done \(skipped\), 0 failed; results in \S+results\.jsonl",
    r"",
)


def run(args: list[str], repo_root: Path) -> str:
    environment = {key: value for key, value in os.environ.items() if key != "DIFFSTYLER_VERBOSE"}
    result = subprocess.run([str(Path(sys.executable).parent / "diffstyler"), *args], cwd=repo_root, capture_output=True, text=True,
                            env={**environment, "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def unexpected_lines(output: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]", output) if not any(re.fullmatch(allowed, line) for allowed in ALLOWED_LINES)]


@pytest.mark.slow
def test_a_smoke_fit_and_predict_print_only_their_bars_and_our_lines(tmp_path, repo_root):
    """Mistake caught: one of `diffstyler.console`'s silencers removed (Lightning's environment lines
    and tips, diffusers' "No LoRA keys" note, torch's LeafSpec deprecation), Lightning's `Epoch 3/-2`
    bar back, or the fit's closing line missing."""
    fit = run(["fit", "--config", "configs/smoke/style.yaml", "--model.output_dir", str(tmp_path / "lora"),
               "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")], repo_root)
    predict = run(["predict", "--config", "configs/smoke/stylize.yaml", "--data.styles", json.dumps([{"lora": str(tmp_path / "lora")}]),
                   "--model.output.folder", str(tmp_path / "stylized"), "--model.inversion_cache", "null",
                   "--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                   "init_args": {"save_dir": str(tmp_path / "logs"), "name": "predict"}})],
                  repo_root)
    assert unexpected_lines(fit) == [] and unexpected_lines(predict) == []
    assert f"diffstyler fit: LoRA written to {tmp_path / 'lora'} (4 steps, " in fit
    assert re.search(r"Steps: 100%\|[^|]*\| 4/4 ", fit)


def test_verbose_is_our_flag_and_reaches_the_other_ranks_through_the_environment(monkeypatch):
    """Mistake caught: `--verbose` passed on to LightningCLI (an unknown option), or DDP's ranks,
    started without it, quiet while rank zero is verbose."""
    monkeypatch.delenv("DIFFSTYLER_VERBOSE", raising=False)
    assert verbose_requested(["predict", "--verbose", "--config", "a.yaml"]) == (True, ["predict", "--config", "a.yaml"])
    assert verbose_requested(["predict"]) == (False, ["predict"])
    monkeypatch.setenv("DIFFSTYLER_VERBOSE", "1")
    assert verbose_requested(["predict"]) == (True, ["predict"])
