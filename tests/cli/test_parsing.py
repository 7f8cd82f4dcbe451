"""Exact parsing (`diffstyler.cli.parsing`, `command_line`, `config_files`): single values where a
list is expected, no abbreviations on any subcommand's parser, errors that need no parser found
before torch is imported. The refusals themselves are rows of tests/test_bad_inputs.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffstyler.cli.command_line import SUBCOMMANDS, find_subcommand, wants_main_help
from diffstyler.cli.config_files import ConfigSource, source_of
from diffstyler.errors import UserError
from tests.helpers import printed_config, run_cli_in_process

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTENT = "data/content_shapes.png"


@pytest.mark.slow
def test_a_single_value_is_a_list_of_one_on_the_command_line_and_in_a_file(tmp_path, monkeypatch, capsys):
    """Catches: a single value refused, a string taken as a list of its characters, the rule only
    on the command line (or only in files), and a single style entry (a mapping) not wrapped."""
    predict = printed_config(["predict", "--config", "configs/smoke/stylize.yaml", "--data.content", CONTENT,
                              "--model.injection.feature_layers", "5", "--data.styles", "{lora: my_lora, scale: 0.5}"],
                             monkeypatch, capsys)
    assert predict["data"]["content"] == [CONTENT]
    assert predict["model"]["injection"]["feature_layers"] == [5]
    assert [(style["lora"], style["scale"]) for style in predict["data"]["styles"]] == [("my_lora", 0.5)]

    single_image = tmp_path / "one_image.yaml"
    single_image.write_text("data:\n  images: data/style_stripes.png\n")
    fit = printed_config(["fit", "--config", "configs/smoke/style.yaml", "--config", str(single_image)], monkeypatch, capsys)
    assert fit["data"]["images"] == ["data/style_stripes.png"]

    test = printed_config(["test", "--config", "configs/smoke/evaluate.yaml", "--data.results", "outputs/a_run"], monkeypatch, capsys)
    assert test["data"]["results"] == ["outputs/a_run"]


def test_lists_null_and_appends_keep_their_meaning(monkeypatch, capsys):
    """Catches a rule that wraps more than single values: a list in a list, null as [null], or a
    `+=` append that replaces the list."""
    config = printed_config(["predict", "--config", "configs/smoke/stylize.yaml", "--data.content", f"[{CONTENT}, other.png]",
                             "--data.styles", "[{lora: a}]", "--data.styles+", "{lora: b}", "--model.sweep.feature_steps", "null"],
                            monkeypatch, capsys)
    assert config["data"]["content"] == [CONTENT, "other.png"]
    assert [style["lora"] for style in config["data"]["styles"]] == ["a", "b"]
    assert config["model"]["sweep"]["feature_steps"] is None


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_every_subcommand_refuses_an_abbreviated_option(subcommand, monkeypatch, capsys):
    """LightningCLI builds one parser per subcommand. Catches abbreviations left allowed on a
    subcommand's parser (jsonargparse 4 allows them by default; a subcommand's parser takes the
    main parser's setting, so `allow_abbrev=False` given for a subcommand alone is overridden):
    `--trainer.max_step 3` would silently be `--trainer.max_steps 3`."""
    status, output = run_cli_in_process([subcommand, "--trainer.max_step", "3"], monkeypatch, capsys)
    assert status == 2
    assert output.strip().splitlines()[-1] == (f"diffstyler {subcommand}: error: unknown option (--trainer.max_step): "
                                               "did you mean --trainer.max_steps?")


def test_the_subcommand_is_the_first_argument_that_is_no_option():
    """Catches a subcommand looked for anywhere on the command line (a value that happens to be a
    subcommand's name would be taken for it) and a `--config` value taken for the subcommand."""
    assert find_subcommand(["--config", "p.yaml", "predict", "--data.content", "fit"]) == "predict"
    assert find_subcommand(["-c", "test", "fit"]) == "fit"
    assert wants_main_help(["--help"]) and wants_main_help(["--verbose", "-h"]) and not wants_main_help(["predict", "--help"])
    with pytest.raises(UserError, match="unknown subcommand 'tset': did you mean test"):
        find_subcommand(["tset", "--config", "fit.yaml"])
    with pytest.raises(UserError, match="no subcommand"):
        find_subcommand(["--config", "p.yaml"])


def test_an_unknown_key_is_named_in_the_last_file_that_sets_it():
    """The value of the last config counts, so its file is the one to fix."""
    sources = [ConfigSource("a.yaml", {"model": {"sampling": {"stepz": 1}}}),
               ConfigSource("b.yaml", {"model": {"sampling": {"stepz": 2}}}),
               ConfigSource("c.yaml", {"model": {"lora": {"rank": 4}}})]
    assert source_of("model.sampling.stepz", sources) == "b.yaml"
    assert source_of("model.sampling.steps", sources) is None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["predcit"], "diffstyler: error: unknown subcommand 'predcit': did you mean predict? choose one of fit, predict, test, export, demo, compare"),
        (["fit", "--config", "nope.yaml"], "diffstyler fit: error: config file not found (nope.yaml): no such file"),
        (["fit", "--config", "{broken.yaml}"], "diffstyler fit: error: config file is not valid YAML ({broken.yaml}:2): "
                                              "expected <block end>, but found '-'"),
    ],
    ids=["unknown_subcommand", "missing_config_file", "config_file_not_yaml"],
)
def test_errors_that_need_no_parser_come_before_torch_is_imported(args, line, tmp_path):
    """Catches an import of the CLI's heavy parts (torch, lightning, diffusers: seconds) before the
    checks that need none of them, e.g. `from diffstyler.cli.app import ...` at the top of
    `diffstyler/cli/__init__.py`. `python -m diffstyler.cli` runs the command (`cli/__main__.py`)."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: 1\n- data\n")
    args = [arg.replace("{broken.yaml}", str(broken)) for arg in args]
    line = line.replace("{broken.yaml}", str(broken))
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    console = subprocess.run([sys.executable, "-m", "diffstyler.cli", *args], cwd=REPO_ROOT, env=environment,
                             capture_output=True, text=True, timeout=120)
    assert (console.returncode, console.stderr.strip()) == (2, line)

    script = ("import sys\nfrom diffstyler.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "print(sorted(name for name in ('torch', 'lightning', 'diffusers', 'ultralytics', 'peft') if name in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO_ROOT, env=environment,
                              capture_output=True, text=True, timeout=120)
    assert imported.stdout.strip() == "[]", imported.stdout + imported.stderr
