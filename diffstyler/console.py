"""A quiet console: a run prints its progress bar, diffstyler's own one-line notices and its summary.

The libraries' tips, environment reports and deprecations are silenced at their source (their
loggers' levels, warning filters), unless `--verbose` (or DIFFSTYLER_VERBOSE=1) asks for them:
Lightning's "GPU available" / "TPU available" lines, its litlogger / litmodels tips, "Seed set to",
"`Trainer.fit` stopped: `max_steps=...` reached", the model summary table; diffusers' "No LoRA keys
associated to CLIPTextModel found" (once per LoRA); PEFT's "Already found a `peft_config`
attribute" (from the second adapter on); torch's `LeafSpec` deprecation; jsonargparse's
deprecations from Lightning's own CLI code. Warnings and errors of our own, and anything at
warning level or above that these libraries log, still show.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_FLAG = "--verbose"
VERBOSE_VARIABLE = "DIFFSTYLER_VERBOSE"

# Loggers whose info-level chatter is noise for a user (their warnings still show).
CHATTY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")
# Loggers (and, for diffusers / transformers, their own verbosity switches) whose warnings are notes
# about things we do on purpose.
NOTE_LOGGERS = ("diffusers", "transformers")
# (message regex, category) of warnings that are about the libraries' own code or our deliberate use.
WARNINGS = (
    (r".*Already found a `peft_config` attribute", UserWarning),  # several named adapters on one UNet: the design
    (r".*isinstance\(treespec, LeafSpec\)", Warning),  # inside Lightning's utilities
    (r".*(was deprecated in v4|skip_none parameter was deprecated)", Warning),  # jsonargparse, called by Lightning's CLI
    (r".*You have overridden `transfer_batch_to_device`", UserWarning),
)


def verbose_requested(args: list[str]) -> tuple[bool, list[str]]:
    """(verbose?, args without --verbose): the flag is ours; DDP ranks get it from the environment."""
    verbose = VERBOSE_FLAG in args or os.environ.get(VERBOSE_VARIABLE, "") not in ("", "0")
    return verbose, [arg for arg in args if arg != VERBOSE_FLAG]


def quiet_libraries() -> None:
    """Silence the libraries' notices for this process (see the module's docstring)."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in NOTE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
