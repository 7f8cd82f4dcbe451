"""The lines the `diffstyler` command ends with: one line per user error, the first failure of a
multi-process run (see `diffstyler.callbacks.first_failure`), the resume command of an
interrupted fit, and where a finished fit wrote its LoRA. The exit statuses are in `status`."""

from __future__ import annotations

import re
import shlex
import signal
import sys
from typing import Optional

from jsonargparse import ArgumentError

from diffstyler.callbacks import first_failure
from diffstyler.callbacks.first_failure import AnotherRankFailed, failure_of_another_rank, wait_for_launcher_exit
from diffstyler.callbacks.interrupt import Interruption
from diffstyler.cli.status import USER_ERROR_STATUS
from diffstyler.errors import UserError, UserErrors, config_error, first_line

# Errors about the user's inputs: shown as one line instead of a traceback. ArgumentError is
# jsonargparse's (exit_on_error off); ours are all UserErrors.
USER_ERRORS = (UserError, ArgumentError)


def user_error_line(error: BaseException) -> str:
    """What `main` prints after `diffstyler <subcommand>: error: `."""
    if isinstance(error, UserError):
        return first_line(error.line())
    if isinstance(error, ArgumentError):
        return argument_error_line(str(error))
    return first_line(error)


def argument_error_line(message: str) -> str:
    """jsonargparse's 'Parser key "a.b":\n  reason' as `invalid config value (a.b): reason`."""
    found = re.match(r'\s*Parser key "([^"]+)":\s*(.*)', message, re.DOTALL)
    if found is None:
        return first_line(message)
    reasons = [line.strip(" -") for line in found.group(2).splitlines() if line.strip(" -")]
    return config_error(found.group(1), "; ".join(reasons)).line()


def failure_line(subcommand: str, error: BaseException, rank: Optional[int]) -> tuple[str, int]:
    """The line and exit status for `error`; user errors are one line (`UserErrors`: one line for
    each of its errors), others point at their traceback."""
    place = f"[rank {rank}] " if rank is not None else ""
    if isinstance(error, UserErrors):
        return "\n".join(f"diffstyler {subcommand}: error: {place}{line}" for line in error.lines), USER_ERROR_STATUS
    if isinstance(error, USER_ERRORS):
        return f"diffstyler {subcommand}: error: {place}{user_error_line(error)}", USER_ERROR_STATUS
    return f"diffstyler {subcommand}: error: {place}{type(error).__name__}: {first_line(error)} (traceback above)", 1


def interrupted_by_another_rank(error: BaseException) -> bool:
    """Whether the signal another rank sends has arrived, or `AnotherRankFailed` (which it raises)
    is in the error's chain: it can strike inside a file read, whose handler then reports it as a
    broken file, or inside torch, which then raises an error of its own without the chain."""
    if first_failure.another_rank_signalled:
        return True
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, AnotherRankFailed):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def exit_for(subcommand: str, error: BaseException) -> None:
    """Print the one line for a user error and exit; in a multi-process run, show the first failing
    rank's error in place of a broken connection. Returns (the caller re-raises) for anything else."""
    current_run = first_failure.current_run  # set by ReportFirstFailure in a multi-process run
    rank = current_run.rank if current_run is not None else None
    earlier = failure_of_another_rank(current_run) if current_run is not None else None
    if earlier is not None and (not isinstance(error, USER_ERRORS) or interrupted_by_another_rank(error)):
        if rank == 0:
            print(earlier["line"], file=sys.stderr)
        sys.exit(earlier["status"])
    if isinstance(error, USER_ERRORS):
        print(failure_line(subcommand, error, rank)[0], file=sys.stderr)
        if current_run is not None and not current_run.is_launcher:
            wait_for_launcher_exit(current_run)
        sys.exit(USER_ERROR_STATUS)


def lora_written_line(folder: str, steps: int, seconds: float, image: Optional[tuple[int, int]] = None) -> str:
    """The last line of a fit; `image` (number, count) for one LoRA of a fit over a folder."""
    place = f"[{image[0]}/{image[1]}] " if image else ""
    return f"diffstyler fit: {place}LoRA written to {folder} ({steps} steps, {seconds:.1f} s)"


# --- an interrupted fit -----------------------------------------------------------------------------

def interrupted_line(interruption: Interruption, command: list[str]) -> str:
    """The line for a fit stopped by a signal, with the command that continues it: `command` (the
    arguments as given, without the program) plus `--ckpt_path` of the checkpoint it saved."""
    stopped = f"diffstyler fit: interrupted by {signal.Signals(interruption.signum).name}"
    stopped += f" after step {interruption.step}" if interruption.step > 0 else " before its first step"
    if interruption.checkpoint is not None:
        return f"{stopped}; resume with: {shell_command(with_checkpoint(command, str(interruption.checkpoint)))}"
    if not interruption.resumable:
        return f"{stopped}; the LoRAs already trained are kept, continue with: {shell_command(command)}"
    return f"{stopped}; no checkpoint of it was saved, start again with: {shell_command(command)}"


def with_checkpoint(command: list[str], checkpoint: str) -> list[str]:
    """`command` with `--ckpt_path checkpoint` in place of any `--ckpt_path` it had."""
    kept, skip = [], False
    for arg in command:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return [*kept, "--ckpt_path", checkpoint]


def shell_command(args: list[str]) -> str:
    return shlex.join(["diffstyler", *args])
