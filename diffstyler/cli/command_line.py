"""What `main` reads from the command line itself, before any parser exists: the subcommand and
the `--debug` flag, and the main help (`diffstyler --help`), with the words that describe the
command and each subcommand. Nothing here imports torch or lightning."""

from __future__ import annotations

import argparse
import difflib
import os
from typing import Optional

from diffstyler.errors import UserError

SUBCOMMANDS = ("fit", "predict", "test")  # the keys of `app.MODES`, known before its imports
TOOL_COMMANDS = ("export", "demo", "compare")  # the keys of `tools.TOOLS`: argparse commands, no Lightning
DEFAULT_SUBCOMMAND = "fit"
DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "DIFFSTYLER_DEBUG"
HELP_FLAGS = ("-h", "--help")
# The model families the command runs on, as the backbones name them (`diffstyler.backbones`; not
# imported here: the help prints without torch): a new family is added here and the help names it
# (tests/cli/test_help.py checks it against the backbones').
FAMILY_NAMES = ("SD 1.x", "SD 2.x", "SDXL", "SD 3.5", "FLUX.1")
DESCRIPTION = ("DiffStyler (Li, arXiv 2403.18461): learn a style from one image as a LoRA, and transfer it onto "
               f"a photo, whole or inside masks. Runs on {', '.join(FAMILY_NAMES[:-1])} and {FAMILY_NAMES[-1]}.")
# One line per subcommand: the main help's list and the top of each subcommand's help.
SUBCOMMAND_HELP = {
    "fit": "learn a style LoRA from a style image (or one LoRA per image of a folder)",
    "predict": "stylize photos with style LoRAs, whole or inside masks, from one photo to a dataset",
    "test": "score stylized results: LPIPS, FID, ArtFID, CFSD (StyleID's protocol) and CSD",
    "demo": "the browser page: a photo, its styles and their regions, the results",
    "export": "write a LoRA in the kohya / A1111 layout (A1111, ComfyUI, kohya's sd-scripts)",
    "compare": "run a protocol's methods on the same pairs and write one table and a side-by-side grid",
}
# The options of LightningCLI's main parser (before the subcommand) that take a separate value.
MAIN_OPTIONS_WITH_VALUE = ("--config", "-c", "--method")


def split_debug_flag(args: list[str]) -> tuple[bool, list[str]]:
    """(debug?, args without --debug): the flag is ours, LightningCLI must not see it."""
    debug = DEBUG_FLAG in args or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    return debug, [arg for arg in args if arg != DEBUG_FLAG]


def find_subcommand(args: list[str]) -> str:
    """The subcommand: the first argument that is neither an option nor the value of `--config`, as
    LightningCLI's main parser reads it (a plain `--help` is `main_help`'s, asked before).
    UserError when it is missing or unknown, so that the error needs no parser (and no torch)."""
    given = first_positional(args)
    if given in SUBCOMMANDS + TOOL_COMMANDS:
        return given
    choices = ", ".join(SUBCOMMANDS + TOOL_COMMANDS)
    if given is None:
        raise UserError("no subcommand", None, f"choose one of {choices} (e.g. diffstyler fit --config configs/style.yaml)")
    nearest = difflib.get_close_matches(given, SUBCOMMANDS + TOOL_COMMANDS, n=1)
    hint = f"did you mean {nearest[0]}? " if nearest else ""
    raise UserError(f"unknown subcommand {given!r}", None, f"{hint}choose one of {choices}")


def wants_main_help(args: list[str]) -> bool:
    """`diffstyler --help`: a help flag and no subcommand."""
    return first_positional(args) is None and any(arg in HELP_FLAGS for arg in args)


def main_help() -> str:
    """The help of `diffstyler` itself: the subcommands in our words (each subcommand's own help,
    `diffstyler <subcommand> --help`, needs its parser and hence torch and lightning)."""
    parser = argparse.ArgumentParser(prog="diffstyler", usage="diffstyler <subcommand> [--config FILE] [options]",
                                     description=DESCRIPTION,
                                     epilog="Each subcommand's options: diffstyler <subcommand> --help. "
                                            "Documentation: docs/index.md (mkdocs serve shows it as a site).")
    subcommands = parser.add_subparsers(title="subcommands", metavar="<subcommand>")
    for name, text in SUBCOMMAND_HELP.items():
        subcommands.add_parser(name, help=text)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also DIFFSTYLER_DEBUG=1)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' notices that a run hides (also DIFFSTYLER_VERBOSE=1)")
    parser.add_argument("--method", metavar="NAME",
                        help="with a protocol file: the method its stages run (configs/protocols/styleid.yaml: "
                             "diffstyler or styleid)")
    return parser.format_help()


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
