"""`diffstyler demo` on the command line: its errors before any page is served."""

from __future__ import annotations

import sys

import pytest

from diffstyler.cli import main
from tests.helpers import REPO_ROOT


def run(args, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_without_gradio_the_demo_names_the_extra_to_install(monkeypatch, capsys):
    """Caught: gradio imported before the check (an ImportError traceback), or a message that
    does not say how to install it."""
    monkeypatch.setitem(sys.modules, "gradio", None)  # what `import gradio` sees where it is not installed
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    status, err = run(["demo", "--config", "configs/smoke/demo.yaml"], monkeypatch, capsys)
    assert (status, err.strip()) == (2, 'diffstyler demo: error: gradio is not installed (the demo extra): install it: pip install -e ".[demo]"')


def test_a_bad_demo_config_is_one_line(tmp_path, monkeypatch, capsys):
    config = tmp_path / "demo.yaml"
    config.write_text("model: tiny\nhots: 0.0.0.0\n")
    status, err = run(["demo", "--config", str(config)], monkeypatch, capsys)
    assert status == 2 and err.strip().startswith(f"diffstyler demo: error: unknown key 'hots' ({config}): known keys:")
    assert len(err.strip().splitlines()) == 1
