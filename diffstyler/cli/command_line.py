"""What `main` reads from the command line itself, before any parser exists: the subcommand and
the `--debug` flag. Nothing here imports torch or lightning."""

from __future__ import annotations

import os

SUBCOMMANDS = ("fit", "predict", "test")  # the keys of `app.MODES`, known before its imports
DEFAULT_SUBCOMMAND = "fit"
DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "DIFFSTYLER_DEBUG"


def split_debug_flag(args: list[str]) -> tuple[bool, list[str]]:
    """(debug?, args without --debug): the flag is ours, LightningCLI must not see it."""
    debug = DEBUG_FLAG in args or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    return debug, [arg for arg in args if arg != DEBUG_FLAG]


def find_subcommand(args: list[str]) -> str:
    """The first argument naming a subcommand; `fit` when there is none (e.g. plain `--help`)."""
    return next((arg for arg in args if arg in SUBCOMMANDS), DEFAULT_SUBCOMMAND)
