"""The smoke configs keep their pixels: `diffstyler predict` with configs/smoke/{stylize,localized,batch}.yaml
gives exactly the PNGs stored in tests/reference/smoke (made before the pipeline refactor, with the LoRA
stored beside them), so moving code cannot change a result unnoticed.

The stored LoRA is used instead of a fresh smoke fit: CPU training with several threads is not bit
for bit reproducible (two fits differ by about 1e-6), while stylization on one machine is. Exact on
the machine recorded in tests/reference/smoke/machine.json (torch's CPU capability and thread
count); on another, whose kernels may order their float sums differently, a pixel may move by one 8-bit
level (1/255) and no more. Each run gets its own inversion cache, so no run reuses another's trajectory.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffstyler.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = REPO_ROOT / "tests" / "reference" / "smoke"
CONFIGS = {"stylized": "stylize.yaml", "localized": "localized.yaml", "batch": "batch.yaml"}


def reference_machine() -> dict:
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def allowed_levels() -> int:
    """0 on the machine the references were made on, else 1 (see the module's docstring)."""
    recorded = json.loads((REFERENCE / "machine.json").read_text())
    return 0 if recorded == reference_machine() else 1


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working folder where the smoke configs' relative paths resolve: data/ from the repository and
    the reference LoRA at outputs/smoke/lora, where `diffstyler fit --config configs/smoke/style.yaml` puts it."""
    folder = tmp_path_factory.mktemp("smoke")
    (folder / "data").symlink_to(REPO_ROOT / "data")
    shutil.copytree(REFERENCE / "lora", folder / "outputs" / "smoke" / "lora")
    return folder


def reference_files(run: str) -> list[Path]:
    return sorted(path.relative_to(REFERENCE / run) for path in (REFERENCE / run).rglob("*.png"))


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(CONFIGS))
def test_smoke_config_gives_the_reference_pixels(run, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    try:
        main(["predict", "--config", str(REPO_ROOT / "configs" / "smoke" / CONFIGS[run]), "--trainer.enable_progress_bar", "false",
              "--model.inversion_cache", f"outputs/cache_{run}"])
    except SystemExit as exit_info:
        assert exit_info.code in (0, None)
    produced = workdir / "outputs" / "smoke" / run
    expected = reference_files(run)
    assert expected and sorted(p.relative_to(produced) for p in produced.rglob("*.png")) == expected
    for name in expected:
        ours = np.asarray(Image.open(produced / name).convert("RGB"), dtype=int)
        stored = np.asarray(Image.open(REFERENCE / run / name).convert("RGB"), dtype=int)
        assert ours.shape == stored.shape, name
        assert np.abs(ours - stored).max() <= allowed_levels(), name
