"""`DemoConfig` and its YAML files."""

from __future__ import annotations

import pytest

from diffstyler.demo.config import DemoConfig, read_demo_config
from diffstyler.errors import UserError
from diffstyler.stylize import SamplingConfig
from tests.demo.conftest import SMOKE_CONFIG, SMOKE_LORA
from tests.helpers import REPO_ROOT


def test_the_defaults_and_configs_demo_yaml_are_the_papers_settings_on_this_machine_only():
    """Caught: a page starting with other settings than the paper's (50 steps, guidance 10.5,
    features for 30 and attention for 25 steps, the paper preset), or bound to every interface."""
    paper = (SamplingConfig.steps, SamplingConfig.guidance_scale, 30, 25, "paper")
    for config in (DemoConfig(), read_demo_config(str(REPO_ROOT / "configs" / "demo.yaml"))):
        assert (config.steps, config.guidance_scale, config.feature_steps, config.attention_steps, config.preset) == paper
        assert config.host == "127.0.0.1"


def test_the_smoke_config_runs_the_tiny_model_on_the_cpu():
    config = read_demo_config(str(SMOKE_CONFIG), loras=[str(SMOKE_LORA)])
    assert (config.model, config.device, config.resolution, config.segmenter.weights) == ("tiny", "cpu", 64, "tiny")


@pytest.mark.parametrize(("text", "line"), [
    ("stepz: 5\n", "unknown key 'stepz' ({file}): known keys: model, device,"),
    ("segmenter: {imgsize: 64}\n", "unknown key 'segmenter.imgsize' ({file}): known keys: segmenter.weights,"),
    ("port: web\n", "wrong type for port ({file}): expected int, got 'web'"),
    ("loras: outputs/lora\n", "wrong type for loras ({file}): expected list[str], got 'outputs/lora'"),
    ("resolution: 100\n", "invalid config value (resolution): must be a positive multiple of 8, got 100"),
    ("preset: papr\n", "invalid config value (preset): must be one of paper, paper_code, got 'papr'"),
    ("loras: [nowhere]\n", "LoRA not found (loras[0]): nowhere does not exist"),
    ("seed: 100000000000000000000\n", "invalid config value (seed): must be a whole number from 0 to 4294967295, got 100000000000000000000 (the page's Seed)"),
    ("steps: 101\n", "invalid config value (steps): must be a whole number from 1 to 100, got 101 (the page's Denoising steps)"),
    ("guidance_scale: .nan\n", "invalid config value (guidance_scale): must be a number from 1 to 20, got nan (the page's Guidance scale)"),
    ("feature_steps: 60\n", "invalid config value (feature_steps): must be at most steps (50), got 60"),
    ("max_queue: 0\n", "invalid config value (max_queue): must be >= 1, got 0"),
    ("- steps\n", "config file does not hold a mapping of keys ({file}): it holds a list"),
])
def test_a_bad_config_is_one_line_naming_the_key(text, line, tmp_path, monkeypatch):
    """Caught: unknown keys ignored (a typo silently keeps the default), a wrong type failing later
    with a traceback, a missing LoRA folder found only when the page is up, a page starting with a
    value its own checks refuse (every run then fails), no bound on the queue."""
    monkeypatch.chdir(tmp_path)
    file = tmp_path / "demo.yaml"
    file.write_text(text)
    with pytest.raises(UserError) as error:
        read_demo_config(str(file))
    assert error.value.line().startswith(line.format(file=file))
