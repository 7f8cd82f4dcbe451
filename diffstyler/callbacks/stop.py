"""A predict run stopped by SIGTERM or Ctrl-C (SIGINT) ends between two chunks of jobs, on every
process, with its results merged and its summary printed.

Schedulers (SLURM preemption, Kubernetes, `timeout`) send SIGTERM and expect the process to stop
soon, in a consistent state, and to say that it did not finish. Lightning's predict loop only logs
SIGTERM and runs to the end. `StopOnSignal` (added to predict runs by the CLI):
- during the predict loop, turns SIGTERM and the first Ctrl-C into a stop request
  (`StylizationWriter.request_stop`): this process sees it at once, the other processes of the run
  through a file next to the results' part files, in the output folder every process shares (on
  every node); a second Ctrl-C stops at once (KeyboardInterrupt);
- before each chunk, raises `PredictInterrupted` when this process or any other asked to stop: the
  chunk in progress was finished and written, the next is not started;
- `StylizationWriter.on_exception` then finishes the run as at its end, on every process together
  (counts summed, results.jsonl merged by rank zero), and the CLI prints the summary with the jobs
  not started and exits 128 + the signal. A rerun does the rest.

Lightning's own SIGTERM handler is taken out of the chain during the predict loop: it broadcasts
from rank zero inside the handler, a collective that only its training loop matches, so a process
signalled alone would wait in it for good (and a broadcast met by another collective corrupts both).
The other handlers of the chain still run: under SLURM its "bypass" and, when SLURM's requeue
signal is SIGTERM, the requeue. SLURM's requeue on SIGUSR1 (Lightning's: it closes the loggers,
saves `hpc_ckpt_<n>.ckpt`, which holds no weights for predict, and runs `scontrol requeue`) is
deferred to the end of the chunk in progress: run inside the signal handler, it would close the
TensorBoard writer in the middle of a write of `PredictionLogger` (whose write then fails). Lightning
puts back the handlers it found when the run ends.
"""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

if TYPE_CHECKING:
    from diffstyler.callbacks.writer import StylizationWriter


class PredictInterrupted(BaseException):
    """A predict run stopped by a signal between two chunks (a BaseException, like KeyboardInterrupt:
    no handler of errors takes it)."""

    def __init__(self, signum: int):
        super().__init__(f"predict interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class StopOnSignal(Callback):
    """See the module's docstring. `writer` holds the run's stop requests."""

    def __init__(self, writer: "StylizationWriter") -> None:
        self.writer = writer
        self.ctrl_c_pressed = False
        self.requeue_handlers: Optional[Callable[[int, Any], Any]] = None  # Lightning's, for SLURM's requeue signal
        self.requeue_requested: Optional[int] = None  # that signal, until the chunk in progress is done

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.ctrl_c_pressed = False
        self.requeue_handlers, self.requeue_requested = None, None
        if threading.current_thread() is threading.main_thread():  # Python sets handlers there only
            signal.signal(signal.SIGINT, self.on_sigint)
            signal.signal(signal.SIGTERM, _HandlersCompose([self.on_sigterm, *sigterm_handlers_but_lightnings_notifier(trainer)]))
            requeue = slurm_requeue_signal(trainer)
            if requeue is not None and callable(signal.getsignal(requeue)):
                self.requeue_handlers = signal.getsignal(requeue)
                signal.signal(requeue, self.on_requeue_signal)

    def on_requeue_signal(self, signum: int, frame: Any) -> None:
        self.requeue_requested = signum

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        self.requeue_if_requested()

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.requeue_if_requested()

    def requeue_if_requested(self) -> None:
        """SLURM's requeue, asked for during the chunk that just ended, done now (see the module's docstring)."""
        signum, self.requeue_requested = self.requeue_requested, None
        if signum is not None and self.requeue_handlers is not None:
            self.requeue_handlers(signum, None)

    def on_sigterm(self, signum: int, frame: Any) -> None:
        self.writer.request_stop(signal.SIGTERM)

    def on_sigint(self, signum: int, frame: Any) -> None:
        if self.ctrl_c_pressed:
            raise KeyboardInterrupt
        self.ctrl_c_pressed = True
        self.writer.request_stop(signal.SIGINT)

    def on_predict_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        if trainer.received_sigterm:  # by Lightning's handler, before ours was set
            self.writer.request_stop(signal.SIGTERM)
        signum = self.writer.stop_requested()
        if signum is not None:
            raise PredictInterrupted(signum)


def slurm_requeue_signal(trainer: Trainer) -> Optional[int]:
    """The signal on which Lightning requeues a SLURM job, when it does and the signal is not one
    this callback stops the run on (SIGTERM, SIGINT); else None."""
    environment = trainer._accelerator_connector.cluster_environment
    if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
        return None
    requeue = environment.requeue_signal
    return None if requeue in (signal.SIGTERM, signal.SIGINT) else requeue


def sigterm_handlers_but_lightnings_notifier(trainer: Trainer) -> list[Callable[[int, Any], Any]]:
    """The SIGTERM handlers in place (Lightning's chain, or the one handler there), without
    Lightning's notifier (see the module's docstring)."""
    current = signal.getsignal(signal.SIGTERM)
    handlers = current.signal_handlers if isinstance(current, _HandlersCompose) else [current]
    notifier = trainer._signal_connector._sigterm_notifier_fn
    return [handler for handler in handlers if callable(handler) and handler != notifier]
