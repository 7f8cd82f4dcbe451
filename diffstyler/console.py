"""A quiet console: a run prints its progress bar, diffstyler's own one-line notices and its summary,
and the Python API (`train_style`, `DiffStylerPipeline.load_style` and its calls) prints nothing but
its progress bars.

The libraries' tips, environment reports and deprecations are silenced at their source, unless
`--verbose` (or DIFFSTYLER_VERBOSE=1, which is how DDP's other ranks learn it), or
`diffstyler.set_verbosity("info")` in Python, asks for them:
- Lightning's info lines ("GPU available" / "TPU available", the litlogger / litmodels tips,
  "Seed set to", "`Trainer.fit` stopped: `max_steps=...` reached", DDP's start-up lines): its
  loggers' level, so that its warnings still show;
- diffusers' "No LoRA keys associated to CLIPTextModel found" (once per LoRA: our LoRAs train the
  UNet only): that one message of that one logger; and the notes torch and diffusers give while
  importing when torchao is installed (`quiet_imports`, before the imports);
- PEFT's "Already found a `peft_config` attribute" (from the second adapter on: several named
  adapters on one UNet is the design) and torch's `LeafSpec` deprecation (raised inside
  Lightning's utilities): warning filters on their exact messages.
The model summary table is off in the CLI's trainer defaults (`cli.app.shared_trainer_defaults`).
Warnings and errors of our own, and any other warning these libraries give, still show.

The command silences them for its whole process (`quiet_libraries`). The Python API silences them
only while one of its own calls runs (`quiet_library_calls`, a context manager), so the user's
other Lightning, diffusers or PEFT code keeps its messages. Logger levels and warning filters are
process-wide: while our call runs, another thread's Lightning info lines are silenced too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Iterator, Union

VERBOSE_FLAG = "--verbose"
VERBOSE_VARIABLE = "DIFFSTYLER_VERBOSE"

# Loggers whose info-level lines are noise for a user (their warnings still show).
CHATTY_LOGGERS = ("lightning.pytorch", "lightning.fabric")
# logger -> the starts of the messages it gives that are notes about what we do on purpose.
DROPPED_LOG_MESSAGES = {
    "diffusers.loaders.lora_base": ("No LoRA keys associated to CLIPTextModel",),  # also CLIPTextModelWithProjection (SDXL)
}
# The same, for notes given while the libraries import (`quiet_imports`: dropped for the whole
# process, since an import happens once): when torchao (int8 quantization) is installed, torchao
# 0.18 registers its Enums as pytree constants, which torch 2.14 deprecates, and diffusers 0.42
# looks for tensor types torchao 0.18 moved (neither matters to its int8 weight-only config).
IMPORT_LOG_MESSAGES = {
    "torch.utils._pytree": ("<enum '",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}
# (message regex, matched from the start, and category) of warnings about the libraries' own code
# or our deliberate use of them.
WARNINGS = (
    (r"Already found a `peft_config` attribute in the model", UserWarning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning),
)


def verbose_requested(args: list[str]) -> tuple[bool, list[str]]:
    """(verbose?, args without --verbose): the flag is ours, LightningCLI must not see it."""
    verbose = VERBOSE_FLAG in args or os.environ.get(VERBOSE_VARIABLE, "") not in ("", "0")
    return verbose, [arg for arg in args if arg != VERBOSE_FLAG]


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of `starts`."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


# One filter object per logger, so that quieting twice adds nothing (`addFilter` skips a filter it has).
_MESSAGE_FILTERS = {name: DropMessages(starts) for name, starts in DROPPED_LOG_MESSAGES.items()}
_IMPORT_FILTERS = {name: DropMessages(starts) for name, starts in IMPORT_LOG_MESSAGES.items()}


def quiet_imports() -> None:
    """Drop the notes the libraries give while they import (`IMPORT_LOG_MESSAGES`), for this
    process: call it before importing them (filters on a logger outlive its configuration)."""
    for name, message_filter in _IMPORT_FILTERS.items():
        logging.getLogger(name).addFilter(message_filter)


def quiet_libraries() -> None:
    """Silence the libraries' notices for this process (see the module's docstring). Call it after
    lightning is imported: its import sets its loggers' level to INFO."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_imports()
    for name, message_filter in _MESSAGE_FILTERS.items():
        logging.getLogger(name).addFilter(message_filter)
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


# --- the Python API -----------------------------------------------------------------------------

VERBOSITY_NAMES = {"warning": logging.WARNING, "info": logging.INFO}
_verbosity = logging.WARNING


def set_verbosity(level: Union[int, str]) -> None:
    """What the libraries diffstyler calls may print during its calls: "warning" (or
    `logging.WARNING`, the default) hides their tips, environment lines and known-harmless notices
    (see the module's docstring); "info" (`logging.INFO`, as the command's `--verbose`) shows them.
    Warnings of our own, and the libraries' other warnings, show either way."""
    global _verbosity
    if isinstance(level, str):
        if level.lower() not in VERBOSITY_NAMES:
            raise ValueError(f"verbosity must be one of {', '.join(VERBOSITY_NAMES)} or a logging level, got {level!r}")
        level = VERBOSITY_NAMES[level.lower()]
    _verbosity = int(level)


def get_verbosity() -> int:
    """The level `set_verbosity` set (`logging.INFO` when DIFFSTYLER_VERBOSE is set)."""
    return logging.INFO if verbose_requested([])[0] else _verbosity


@contextlib.contextmanager
def quiet_library_calls() -> Iterator[None]:
    """Within the block, the libraries' notices of the module's docstring are silenced (unless the
    verbosity is "info"); afterwards the loggers' levels and filters and the warning filters are as
    they were."""
    if get_verbosity() < logging.WARNING:
        yield
        return
    levels = {name: logging.getLogger(name).level for name in CHATTY_LOGGERS}
    filtered = {name for name, message_filter in _MESSAGE_FILTERS.items() if message_filter in logging.getLogger(name).filters}
    try:
        with warnings.catch_warnings():
            quiet_libraries()
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for name, message_filter in _MESSAGE_FILTERS.items():
            if name not in filtered:  # the command's own quieting (`quiet_libraries`) stays
                logging.getLogger(name).removeFilter(message_filter)
