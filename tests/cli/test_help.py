"""Help that explains itself: `diffstyler --help` lists every subcommand with our own words, and every
key of ours (`--model.*`, `--data.*`) in a subcommand's help has a description, shown before
Lightning's `--trainer.*` keys."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from diffstyler.backbones import mmdit, unet
from diffstyler.cli.command_line import DESCRIPTION, FAMILY_NAMES, SUBCOMMAND_HELP
from tests.helpers import REPO_ROOT, run_cli_in_process

# `  --key METAVAR[, --key+ METAVAR]  help...` or `    subcommand  help...`; a longer syntax puts the help below
OPTION = re.compile(r"^ {2,4}(\S+(?: \S+)*?)(?: {2,}(.*))?$")
CONTINUATION = " " * 8  # argparse puts a long help below its option, at column 16 to 24


def option_helps(help_text: str) -> dict[str, str]:
    """{option: its description} of an argparse help text: the help without jsonargparse's
    `(type: ..., default: ...)` note, which every typed option gets, described or not."""
    helps: dict[str, list[str]] = {}
    current = None
    for line in help_text.splitlines():
        match = OPTION.match(line)
        if match and not line.startswith(CONTINUATION):
            current = match.group(1).split()[0].rstrip(",")
            helps[current] = [match.group(2) or ""]
        elif current and line.startswith(CONTINUATION):
            helps[current].append(line.strip())
        else:
            current = None
    return {option: " ".join(parts).split("(type:")[0].strip() for option, parts in helps.items()}


MAIN_HELP = """import sys
from diffstyler.cli import main
try:
    main(["--help"])
except SystemExit as exit_info:
    assert exit_info.code in (0, None), exit_info.code
assert "torch" not in sys.modules and "lightning" not in sys.modules, "the main help imported torch or lightning"
"""


@pytest.mark.slow
def test_the_main_help_lists_every_subcommand_in_our_words_without_importing_torch():
    """Caught: demo or export missing from the list, Lightning's descriptions ("Runs the full
    optimization routine.") back, or the main help built by LightningCLI (seconds of imports)."""
    result = subprocess.run([sys.executable, "-c", MAIN_HELP], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    helps = option_helps(result.stdout)
    assert {name: helps.get(name) for name in SUBCOMMAND_HELP} == SUBCOMMAND_HELP, result.stdout
    assert set(SUBCOMMAND_HELP) == {"fit", "predict", "test", "demo", "export", "compare"}
    assert "optimization routine" not in result.stdout and " ".join(DESCRIPTION.split()) in " ".join(result.stdout.split())


def test_the_description_names_every_model_family():
    """Caught: a family the code loads (`diffstyler.backbones`) that the help does not name."""
    loaded = {unet.SD1, unet.SD2, unet.SDXL, mmdit.SD35, mmdit.FLUX}
    assert loaded <= set(FAMILY_NAMES)
    assert all(name in DESCRIPTION for name in FAMILY_NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("subcommand", ["fit", "predict", "test"])
def test_every_key_of_ours_has_a_description_and_comes_before_lightnings(subcommand, monkeypatch, capsys):
    """Caught: a config field of ours with no `Args:` entry in its class's docstring (jsonargparse
    shows only its type), a description in prose that jsonargparse cannot tie to the field, or the
    trainer's 40 keys listed first."""
    status, output = run_cli_in_process([subcommand, "--help"], monkeypatch, capsys)
    assert status == 0, output[-2000:]
    helps = option_helps(output)
    ours = [option for option in helps if option.startswith(("--model.", "--data.")) and not option.endswith(".help")]
    assert len(ours) > 10, output[:3000]
    groups = {option for option in ours if re.search(rf"^  {re.escape(option)} CONFIG\b", output, re.MULTILINE)}
    undescribed = [option for option in ours if option not in groups and not helps[option]]
    assert undescribed == []
    assert output.index("  --model.") < output.index("  --trainer.accelerator")
    assert SUBCOMMAND_HELP[subcommand] in " ".join(output.split())
    assert len(output.split("\noptions:")[0].splitlines()) < 12  # a usage line, not 100 lines of every key
