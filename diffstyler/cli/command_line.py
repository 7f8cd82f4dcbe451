"""What `main` reads from the command line itself, before any parser exists: the subcommand and
the `--debug` flag. Nothing here imports torch or lightning."""

from __future__ import annotations

import difflib
import os
from typing import Optional

from diffstyler.errors import UserError

SUBCOMMANDS = ("fit", "predict", "test")  # the keys of `app.MODES`, known before its imports
TOOL_COMMANDS = ("export", "demo")  # the keys of `tools.TOOLS`: argparse commands, no Lightning
DEFAULT_SUBCOMMAND = "fit"
DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "DIFFSTYLER_DEBUG"
HELP_FLAGS = ("-h", "--help")
# The options of LightningCLI's main parser (before the subcommand) that take a separate value.
MAIN_OPTIONS_WITH_VALUE = ("--config", "-c")


def split_debug_flag(args: list[str]) -> tuple[bool, list[str]]:
    """(debug?, args without --debug): the flag is ours, LightningCLI must not see it."""
    debug = DEBUG_FLAG in args or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    return debug, [arg for arg in args if arg != DEBUG_FLAG]


def find_subcommand(args: list[str]) -> str:
    """The subcommand: the first argument that is neither an option nor the value of `--config`, as
    LightningCLI's main parser reads it; `fit` for a plain `--help` (its help lists the subcommands).
    UserError when it is missing or unknown, so that the error needs no parser (and no torch)."""
    given = first_positional(args)
    if given in SUBCOMMANDS + TOOL_COMMANDS:
        return given
    choices = ", ".join(SUBCOMMANDS + TOOL_COMMANDS)
    if given is None:
        if any(arg in HELP_FLAGS for arg in args):
            return DEFAULT_SUBCOMMAND
        raise UserError("no subcommand", None, f"choose one of {choices} (e.g. diffstyler fit --config configs/style.yaml)")
    nearest = difflib.get_close_matches(given, SUBCOMMANDS + TOOL_COMMANDS, n=1)
    hint = f"did you mean {nearest[0]}? " if nearest else ""
    raise UserError(f"unknown subcommand {given!r}", None, f"{hint}choose one of {choices}")


def first_positional(args: list[str]) -> Optional[str]:
    index = 0
    while index < len(args):
        if args[index] in MAIN_OPTIONS_WITH_VALUE:
            index += 2
        elif args[index].startswith("-"):
            index += 1
        else:
            return args[index]
    return None
