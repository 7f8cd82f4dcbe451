"""The 24 GB FLUX.1 configs (configs/flux/stylize_24gb.yaml, style_24gb.yaml): they parse with their
memory settings, are refused in one line off CUDA, and run end to end on tiny-flux with only the
model, the device and the quantization overridden (int8: torchao runs on the CPU). In this process,
as tests/cli/test_family_configs.py runs its configs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from diffstyler.cli import main
from diffstyler.results import RESULTS_NAME, read_json_lines
from tests.helpers import write_transformer_lora

REPO_ROOT = Path(__file__).resolve().parents[2]
STYLIZE, STYLE = "configs/flux/stylize_24gb.yaml", "configs/flux/style_24gb.yaml"
# What a CPU run of the configs changes: the tiny model, the CPU, int8 instead of CUDA's nf4, no offload.
ON_THE_CPU = ["--model.model.name", "tiny-flux", "--model.model.quantization", "int8", "--trainer.accelerator", "cpu",
              "--data.resolution", "64"]


def run_main(args: list[str], monkeypatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    main(args)


@pytest.mark.slow
def test_the_24gb_configs_parse_with_their_memory_settings(capsys, monkeypatch):
    """Caught: a key the parser does not know (a typo, or the option missing from ModelSpec / the
    predictor), and a config that lost its quantization, offload or bfloat16."""
    printed = {}
    for command, config in (("fit", STYLE), ("predict", STYLIZE)):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run_main([command, "--config", config, "--print_config"], monkeypatch)
        assert exit_info.value.code in (None, 0)
        printed[command] = yaml.safe_load(capsys.readouterr().out)
    for values in printed.values():
        assert values["model"]["model"]["name"] == "black-forest-labs/FLUX.1-dev"
        assert values["model"]["model"]["quantization"] == "nf4" and values["model"]["model"]["dtype"] == "bfloat16"
        assert values["trainer"]["precision"] == "bf16-mixed" and values["data"]["resolution"] == 1024
    assert printed["fit"]["model"]["gradient_checkpointing"] is True
    assert printed["predict"]["model"]["offload"] == "model"
    assert printed["predict"]["data"]["styles"][0]["lora"] == printed["fit"]["model"]["output_dir"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a machine with CUDA, nf4 runs")
def test_nf4_is_refused_in_one_line_on_a_machine_without_cuda(capsys, monkeypatch, tmp_path):
    """Caught: the run reaching the loader (or the missing-package message, which installing
    bitsandbytes would not fix here)."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(["fit", "--config", STYLE, "--model.model.name", "tiny-flux", "--model.output_dir", str(tmp_path / "lora"),
                  "--trainer.logger", "false"], monkeypatch)
    assert exit_info.value.code == 2
    assert "model.model.quantization): nf4 (bitsandbytes' 4-bit) needs a CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_the_24gb_configs_run_on_tiny_flux_with_int8(tmp_path, monkeypatch):
    """fit (int8 base, bfloat16 autocast, gradient checkpointing) then predict (int8, bfloat16) with
    the configs as written but for the model, the device, int8 and no offload. Caught: a setting of
    the configs that cannot run together (the checks between dtype, precision and quantization, a
    quantized model under Lightning's device moves)."""
    run_main(["fit", "--config", STYLE, *ON_THE_CPU, "--trainer.max_steps", "2", "--model.output_dir", str(tmp_path / "lora"),
              "--trainer.logger", "false", "--trainer.callbacks", "[]"], monkeypatch)
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    run_main(["predict", "--config", STYLIZE, *ON_THE_CPU, "--model.offload", "none", "--model.sampling.steps", "4",
              "--data.styles", json.dumps([{"lora": str(tmp_path / "lora")}]), "--model.output.folder", str(tmp_path / "out"),
              "--model.inversion_cache", "null", "--trainer.logger", "false"], monkeypatch)
    rows = read_json_lines(tmp_path / "out" / RESULTS_NAME)
    assert [row["status"] for row in rows] == ["done"]
