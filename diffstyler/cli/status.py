"""Exit statuses of the `diffstyler` command (a module of their own: `main` needs them before it
imports torch, and the parts that import torch need them too)."""

JOBS_FAILED_STATUS = 1  # some jobs of a predict run failed (each recorded in results.jsonl); the rest are done
USER_ERROR_STATUS = 2  # an error in the user's input or environment, as argparse uses for a bad command line


def interrupted_status(signum: int) -> int:
    """A command stopped by a signal exits as shells report it: 128 + the signal (130 for SIGINT,
    143 for SIGTERM)."""
    return 128 + signum
