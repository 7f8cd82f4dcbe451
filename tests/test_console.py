"""A quiet library (`diffstyler.console`): the Python API prints nothing but its progress bars, and
with `progress=False` nothing at all; the libraries' notices are silenced only during our own calls,
and `set_verbosity("info")` shows them. The command's console is tests/cli/test_console.py."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest

from diffstyler.console import (
    _MESSAGE_FILTERS,
    DROPPED_LOG_MESSAGES,
    get_verbosity,
    quiet_libraries,
    quiet_library_calls,
    set_verbosity,
)
from tests.helpers import REPO_ROOT

QUIET_SESSION = """
from diffstyler import DiffStylerPipeline, InjectionConfig, StyleLoRAConfig, train_style
lora = train_style("data/style_stripes.png", "{out}/lora", steps=2, model="tiny", resolution=64,
                   lora=StyleLoRAConfig(rank=4), progress=False)
pipe = DiffStylerPipeline.from_pretrained("tiny", progress=False)
pipe.load_style(lora)
pipe.load_style(lora, name="again", scale=0.5)  # a second adapter on the same UNet
pipe("data/content_shapes.png", masks=["data/content_shapes_mask.png"] * 2, num_inference_steps=3,
     injection=InjectionConfig(feature_steps=2, attention_steps=1), resolution=64)
"""


@pytest.mark.slow
def test_train_style_load_style_and_a_call_print_nothing_in_a_fresh_process(tmp_path):
    """Caught: Lightning's "GPU available" / tip / "`Trainer.fit` stopped" lines, the LeafSpec
    deprecation, diffusers' "No LoRA keys associated to CLIPTextModel" or PEFT's "Already found a
    `peft_config`" reaching the user of the Python API, or a progress bar drawn with progress=False."""
    environment = {key: value for key, value in os.environ.items() if key != "DIFFSTYLER_VERBOSE"}
    environment.update(HF_HUB_OFFLINE="1", YOLO_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", QUIET_SESSION.format(out=tmp_path)], cwd=REPO_ROOT, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout, result.stderr) == ("", "")


def lightning_info_enabled() -> bool:
    return logging.getLogger("lightning.pytorch").isEnabledFor(logging.INFO)


PEFT_NOTE = "Already found a `peft_config` attribute in the model. This will lead to having multiple adapters"


def test_the_notices_are_silenced_only_during_our_calls(monkeypatch):
    """Caught: the quieting left in place after our call (the user's own Lightning, diffusers or
    PEFT code silenced too), or our own warnings silenced with the libraries' notices."""
    monkeypatch.delenv("DIFFSTYLER_VERBOSE", raising=False)
    logging.getLogger("lightning.pytorch").setLevel(logging.INFO)
    diffusers_lora = logging.getLogger(next(iter(DROPPED_LOG_MESSAGES)))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with quiet_library_calls():
            assert not lightning_info_enabled()
            assert _MESSAGE_FILTERS[diffusers_lora.name] in diffusers_lora.filters
            warnings.warn(PEFT_NOTE, UserWarning)
            warnings.warn("injection: decoder layer 11's injected output replaces everything", UserWarning)
        assert lightning_info_enabled()
        assert _MESSAGE_FILTERS[diffusers_lora.name] not in diffusers_lora.filters
        warnings.warn(PEFT_NOTE, UserWarning)
    assert [str(warning.message) for warning in shown] == ["injection: decoder layer 11's injected output replaces everything",
                                                           PEFT_NOTE]


def test_set_verbosity_info_shows_the_notices_and_the_commands_quieting_outlives_our_calls(monkeypatch):
    """Caught: `set_verbosity("info")` (the Python `--verbose`) ignored, or a call of ours inside
    the command removing the quieting the command set for its whole process."""
    monkeypatch.delenv("DIFFSTYLER_VERBOSE", raising=False)
    logger = logging.getLogger("lightning.pytorch")
    monkeypatch.setattr(logger, "level", logging.INFO)
    try:
        set_verbosity("info")
        assert get_verbosity() == logging.INFO
        with quiet_library_calls():
            assert lightning_info_enabled()
    finally:
        set_verbosity(logging.WARNING)
    monkeypatch.setenv("DIFFSTYLER_VERBOSE", "1")
    assert get_verbosity() == logging.INFO
    monkeypatch.delenv("DIFFSTYLER_VERBOSE")
    with pytest.raises(ValueError, match="verbosity must be one of warning, info"):
        set_verbosity("loud")

    diffusers_lora = logging.getLogger(next(iter(DROPPED_LOG_MESSAGES)))
    try:
        with warnings.catch_warnings():
            quiet_libraries()  # what the command does for its process
            with quiet_library_calls():
                pass
            assert not lightning_info_enabled()
            assert _MESSAGE_FILTERS[diffusers_lora.name] in diffusers_lora.filters
    finally:
        diffusers_lora.removeFilter(_MESSAGE_FILTERS[diffusers_lora.name])
