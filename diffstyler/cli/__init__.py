"""The `diffstyler` command: one LightningCLI whose subcommands share trainer, logger and seed settings.

    diffstyler fit --config configs/style.yaml          # learn a style LoRA
    diffstyler fit --config configs/style.yaml --print_config > my.yaml
    diffstyler fit --config my.yaml --model.lora.rank 8
    diffstyler predict --config configs/stylize.yaml       # stylize content images
    diffstyler fit --config configs/style.yaml --data.images '[styles/]' --data.one_lora_per_image true
    diffstyler test --config configs/protocols/styleid.yaml  # a protocol file: one section per subcommand

The parts:
- `app`: `DiffStylerCLI` and `MODES` (each subcommand's LightningModule and DataModule; `main` picks
  the pair from the subcommand before building the parser), the shared trainer defaults;
- `checks`: the config checks that run after parsing, before anything is instantiated;
- `config_files`: the `--config` files, read before the parser (missing files, YAML errors), and
  protocol files (a section per subcommand; the subcommand gets only its section);
- `parsing`: exact parsing (no abbreviations, single values as lists, unknown keys named);
- `command_line`: the subcommand and `--debug`, read before any parser exists;
- `reporting`: one-line errors, the first failure of a multi-process run, the resume line of an
  interrupted fit; `status`: exit statuses.
The loop of a fit over a folder (one LoRA per style image) is `diffstyler.cli.lora_per_image`.

Order of work (LightningCLI in lightning 2.6): parse → check → seed → instantiate data and model →
Trainer → `trainer.fit`. The checks (`check_inputs`: every config dataclass built once so a bad
value is reported with its key, the `fit --ckpt_path` checkpoint read weights-only) and the data
module (which reads its images) run before the model loads its weights in `configure_model`, so
a bad input fails in seconds; so does, for predict, the check of what is the same for every job
(`StylizePredictor.check_run`: model reference, LoRAs, FastSAM, CLIP), before the trainer starts
any other process. The resolved config of a run is saved as `config.yaml` next to its
TensorBoard logs.

What needs no parser is checked first, before torch, lightning and diffusers are imported (seconds):
the subcommand's name, and that each `--config` file exists and is YAML holding a mapping (with a
protocol file's section). Unknown keys and bad values need the parser, which is built from the
classes' signatures, hence after those imports.

Errors in the user's input or environment (`reporting.USER_ERRORS`) are printed as one line,
`diffstyler <subcommand>: error: <what> (<file or key>): <why>`, with exit status 2 (as argparse
uses for a bad command line); `--debug` or DIFFSTYLER_DEBUG=1 shows the traceback instead.
`--verbose` or DIFFSTYLER_VERBOSE=1 shows the libraries' notices that a run hides by default
(`diffstyler.console`). A fit
stopped by Ctrl-C or SIGTERM ends with the command that resumes it and status 130 / 143; a predict
run so stopped ends with its summary (the jobs not started: the same command does them) and the
same statuses.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

from diffstyler.cli.command_line import DEBUG_VARIABLE, TOOL_COMMANDS, find_subcommand, main_help, split_debug_flag, wants_main_help
from diffstyler.cli.config_files import config_sources, expand_extends, protocol_stage
from diffstyler.cli.status import JOBS_FAILED_STATUS, USER_ERROR_STATUS, interrupted_status
from diffstyler.console import VERBOSE_VARIABLE, quiet_imports, quiet_libraries, verbose_requested
from diffstyler.errors import UserError

__all__ = ["JOBS_FAILED_STATUS", "USER_ERROR_STATUS", "main", "protocol_stage"]


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the `diffstyler` console script (returns None: its value becomes the exit code).

    A user error ends the process with one line on stderr and status 2; with --debug it is raised.
    From the console (`args` None) the libraries' notices are silenced unless --verbose is given
    (`diffstyler.console`); called with `args`, the process's logging is left as it is.
    """
    from_console = args is None
    command = sys.argv[1:] if from_console else list(args)  # as given: what a resume line repeats
    debug, args = split_debug_flag(command)
    if debug:
        os.environ[DEBUG_VARIABLE] = "1"  # for the ranks that DDP starts
    verbose, args = verbose_requested(args)
    if verbose:
        os.environ[VERBOSE_VARIABLE] = "1"  # for the ranks that DDP starts
    if wants_main_help(args):
        print(main_help(), end="")
        sys.exit(0)
    subcommand = None
    try:
        subcommand = find_subcommand(args)
        if subcommand in TOOL_COMMANDS:
            run_tool(subcommand, args)
        sources = config_sources(args, subcommand)
        args = expand_extends(protocol_stage(args, subcommand))
    except UserError as error:
        if debug:
            raise
        program = f"diffstyler {subcommand}" if subcommand else "diffstyler"
        print(f"{program}: error: {error.line()}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)
    if from_console:
        # LightningCLI reads sys.argv itself, and DDP relaunches sys.argv for the other ranks.
        sys.argv[1:], args = args, None
    try:
        if from_console and not verbose:
            quiet_imports()
        # Imported only now: torch, lightning and diffusers take seconds to import, and the errors
        # above need none of them.
        from diffstyler.cli.app import run_subcommand

        if from_console and not verbose:
            quiet_libraries()
        run_subcommand(subcommand, args, sources, command, debug)
    except KeyboardInterrupt:  # Ctrl-C before a fit's own handling starts (imports, parsing, reading the data)
        if debug:
            raise
        print(f"diffstyler {subcommand}: interrupted", file=sys.stderr)
        sys.exit(interrupted_status(signal.SIGINT))


def run_tool(name: str, args: list[str]) -> None:
    """Run a non-Lightning subcommand (`tools.TOOLS`) and exit with its status (a UserError it
    raises is `main`'s one line)."""
    from diffstyler.cli.tools import TOOLS

    position = args.index(name)
    sys.exit(TOOLS[name](args[:position] + args[position + 1 :]))
