"""A fit stopped by Ctrl-C (SIGINT) or SIGTERM keeps its work: a checkpoint of the last step it
completed, from which `--ckpt_path` resumes it.

Lightning already stops a fit on SIGTERM between two steps: its signal handler only sets a flag,
and the loops raise `SIGTERMException` when the step in progress is done (on every rank: rank 0
broadcasts the flag), then call the callbacks' `on_exception`. `SaveOnInterrupt` builds on that:

- Ctrl-C during training runs Lightning's SIGTERM handler, so it stops the same way, at the end of
  the step; a second Ctrl-C stops at once, and so does Ctrl-C before training starts (model
  loading), with nothing to save;
- `on_exception`, for `SIGTERMException`, saves a checkpoint of that completed step (the module
  keeps only the LoRA and its optimizer state in it), under a temporary name, then renamed;
- `interruption` records the signal, the step and the checkpoint, for the CLI's resume line.

`fit_until_interrupted` runs `trainer.fit` with this Ctrl-C handler and raises `FitInterrupted`
when a signal stopped the fit. The handler is set and restored around `trainer.fit`, not in the
callback's hooks: Lightning puts back the handlers it found when it ends a fit, and calls no hook
after an exception.

Nothing else is changed: Lightning's SIGTERM handler and, under SLURM, its SIGUSR1 requeue (which
saves its own `hpc_ckpt_*.ckpt` and requeues the job) keep working as without this callback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

CHECKPOINT_NAME = "interrupted-step={step}.ckpt"
SIGNAL_LOG = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")


@dataclass
class Interruption:
    """How a fit was stopped: the signal, the steps completed, the checkpoint of the last one
    (None when there is none: no step completed, a second Ctrl-C stopped the step itself, or the
    fit is not `resumable` with --ckpt_path)."""

    signum: int
    step: int
    checkpoint: Optional[Path] = None
    resumable: bool = True


class FitInterrupted(BaseException):
    """A fit stopped by a signal (a BaseException, like KeyboardInterrupt: no error handler takes it)."""

    def __init__(self, interruption: Interruption):
        super().__init__(f"fit interrupted by {signal.Signals(interruption.signum).name} at step {interruption.step}")
        self.interruption = interruption


class SaveOnInterrupt(Callback):
    """See the module's docstring. `save_checkpoint` False: record the interruption, save nothing
    (a fit that cannot be resumed with --ckpt_path, e.g. one LoRA of a fit over a folder)."""

    def __init__(self, save_checkpoint: bool = True) -> None:
        self.save_checkpoint = save_checkpoint
        self.interruption: Optional[Interruption] = None
        self.training = False

    # --- Ctrl-C --------------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning's SIGTERM handler is in place from here on, until after the export of the LoRA
        # (the module's on_train_end): a Ctrl-C during the export lets it finish.
        self.training = True

    @contextlib.contextmanager
    def handling_ctrl_c(self) -> Iterator[None]:
        """SIGINT handled by `on_sigint` in the block (Python sets handlers in the main thread only:
        elsewhere the block runs with Lightning's own behaviour)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self.on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def on_sigint(self, signum: int, frame: Any) -> None:
        lightning_handler = signal.getsignal(signal.SIGTERM)
        if self.interruption is None and self.training and callable(lightning_handler):
            # the step is known when the loop stops
            self.interruption = Interruption(signal.SIGINT, step=-1, resumable=self.save_checkpoint)
            # Quiet: its log line would say "Received SIGTERM" for the user's Ctrl-C.
            with log_level(SIGNAL_LOG, logging.WARNING):
                lightning_handler(signal.SIGTERM, frame)
            return
        raise FitInterrupted(self.interruption or Interruption(signal.SIGINT, step=-1, resumable=self.save_checkpoint))

    # --- the checkpoint ----------------------------------------------------------------------------

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, FitInterrupted):
            exception.interruption.step = trainer.global_step
            self.interruption = exception.interruption
        elif isinstance(exception, SIGTERMException):
            # Lightning raises SIGTERMException only between steps: global_step steps are complete.
            signum = self.interruption.signum if self.interruption is not None else signal.SIGTERM
            self.interruption = Interruption(signum, trainer.global_step, resumable=self.save_checkpoint)
            if self.save_checkpoint and trainer.global_step > 0:
                self.interruption.checkpoint = save_checkpoint_atomically(trainer, checkpoint_folder(trainer))


def fit_until_interrupted(trainer: Trainer, *args: Any, **kwargs: Any) -> None:
    """`trainer.fit(*args, **kwargs)` with Ctrl-C handled by the trainer's `SaveOnInterrupt` (if it
    has one); FitInterrupted when a signal stopped the fit."""
    saver = next((callback for callback in trainer.callbacks if isinstance(callback, SaveOnInterrupt)), None)
    try:
        with saver.handling_ctrl_c() if saver is not None else contextlib.nullcontext():
            trainer.fit(*args, **kwargs)
    except SIGTERMException as stop:  # Lightning's stop between two steps, on SIGTERM or Ctrl-C
        interruption = saver.interruption if saver is not None else None
        raise FitInterrupted(interruption or Interruption(signal.SIGTERM, trainer.global_step)) from stop


@contextlib.contextmanager
def log_level(logger: logging.Logger, level: int) -> Iterator[None]:
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def checkpoint_folder(trainer: Trainer) -> Path:
    """Where the fit's periodic checkpoints go (the first ModelCheckpoint's folder), else
    `checkpoints/` in the log folder (or, without a logger, in default_root_dir)."""
    periodic = trainer.checkpoint_callback
    if periodic is not None and getattr(periodic, "dirpath", None):
        return Path(periodic.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"


def save_checkpoint_atomically(trainer: Trainer, folder: Path) -> Path:
    """`trainer.save_checkpoint` (every rank takes part; rank 0 writes) under a temporary name in
    `folder`, renamed when complete: a reader never finds half a checkpoint under the final name."""
    path = folder / CHECKPOINT_NAME.format(step=trainer.global_step)
    partial = folder / f".{path.name}.partial"
    trainer.save_checkpoint(partial, weights_only=False)  # with the optimizer and loop states, to resume
    if trainer.is_global_zero:
        os.replace(partial, path)
    trainer.strategy.barrier("SaveOnInterrupt")
    return path

