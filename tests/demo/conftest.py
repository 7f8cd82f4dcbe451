"""Fixtures of the demo tests: the smoke LoRA as an offered style, and the smoke demo config
pointing at it and at a temporary output folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported by any test module

import pytest  # noqa: E402
import yaml  # noqa: E402

from tests.helpers import REPO_ROOT  # noqa: E402

SMOKE_LORA = REPO_ROOT / "tests" / "reference" / "smoke" / "lora"
SMOKE_CONFIG = REPO_ROOT / "configs" / "smoke" / "demo.yaml"
CONTENT = REPO_ROOT / "data" / "content_shapes.png"
CONTENT_MASK = REPO_ROOT / "data" / "content_shapes_mask.png"
STYLE_IMAGE = REPO_ROOT / "data" / "style_stripes.png"


def write_demo_config(folder: Path, **overrides) -> Path:
    """configs/smoke/demo.yaml offering the smoke LoRA as the style `smoke`, writing under `folder`."""
    shutil.copytree(SMOKE_LORA, folder / "loras" / "smoke")
    values = yaml.safe_load(SMOKE_CONFIG.read_text())
    values.update(loras=[str(folder / "loras")], output_folder=str(folder / "outputs"), **overrides)
    path = folder / "demo.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def demo_config_file(tmp_path_factory) -> Path:
    return write_demo_config(tmp_path_factory.mktemp("demo"))
