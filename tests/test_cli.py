"""The `diffstyler` command end to end on the smoke config (tiny model, CPU, seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffstyler.cli import main
from diffstyler.lora import LORA_WEIGHTS_NAME
from diffstyler.training import METADATA_NAME

SMOKE_STEPS = 4  # trainer.max_steps in configs/smoke/style.yaml


def tmp_output_args(tmp_path: Path) -> list[str]:
    """Send every output of the smoke config (logs, checkpoints, config copy, LoRA) into tmp_path."""
    return [
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--model.output_dir", str(tmp_path / "lora"),
    ]


def assert_exported(output_dir: Path) -> None:
    assert (output_dir / LORA_WEIGHTS_NAME).stat().st_size > 0
    metadata = json.loads((output_dir / METADATA_NAME).read_text())
    assert metadata["steps"] == SMOKE_STEPS and metadata["base_model"]["name"] == "tiny"


def test_fit_smoke_config_end_to_end(tmp_path, repo_root):
    command = [str(Path(sys.executable).parent / "diffstyler"), "fit", "--config", "configs/smoke/style.yaml",
               *tmp_output_args(tmp_path)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=repo_root, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    assert_exported(tmp_path / "lora")
    run_dir = tmp_path / "logs" / "style" / "version_0"
    assert (run_dir / "config.yaml").is_file()  # the resolved config, next to the logs
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["step=2.ckpt", "step=4.ckpt"]
    assert any(path.name.startswith("events.out.tfevents") for path in run_dir.iterdir())


def print_config(args: list[str], capsys) -> str:
    capsys.readouterr()  # drop earlier output
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--print_config"])
    assert exit_info.value.code in (None, 0)
    return capsys.readouterr().out


def test_printed_config_is_stable_and_runs(tmp_path, repo_root, capsys, monkeypatch):
    monkeypatch.chdir(repo_root)  # the smoke config names data/style_stripes.png relative to the repo
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    printed = print_config(["fit", "--config", "configs/smoke/style.yaml", "--model.lora.rank", "8",
                            *tmp_output_args(tmp_path)], capsys)
    config_file = tmp_path / "printed.yaml"
    config_file.write_text(printed)
    assert "rank: 8" in printed

    assert print_config(["fit", "--config", str(config_file)], capsys) == printed
    main(["fit", "--config", str(config_file)])
    assert_exported(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / METADATA_NAME).read_text())["rank"] == 8
