"""Several processes (DDP): the first failing rank's error is the one the user reads last.

When a job fails on one rank, the other ranks only see a broken connection (gloo: "Connection
closed by peer"), and rank 0, whose output the user reads last, would end with that traceback;
or Lightning's process observer kills rank 0 when a child exits with an error. So:
- each rank reports its own failure to a folder shared by the ranks of the run, in
  `on_exception` (before Lightning tears anything down, hence before the others' connections
  break), and a child rank then interrupts the launcher (rank 0 of the node) with SIGUSR2 (not SIGUSR1: SLURM's
  requeue signal, which Lightning handles) and
  stays alive, so that the observer does not kill the launcher, until the launcher has exited;
- a rank whose error is not a user error but follows another rank's report shows that report
  instead (`diffstyler.cli.reporting.exit_for`): rank 0 prints its line last and exits with its status; the
  others exit quietly.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

from lightning.pytorch import Callback, LightningModule, Trainer

from diffstyler.callbacks.stop import PredictInterrupted
from diffstyler.outputs import atomic_write

@dataclass
class DistributedRun:
    rank: int  # this process's global rank
    launcher_pid: int  # the process that started this node's ranks (local rank 0)
    reports: Path  # the folder shared by the ranks of this run

    @property
    def is_launcher(self) -> bool:
        return self.launcher_pid == os.getpid()


class AnotherRankFailed(RuntimeError):
    """Raised in the launcher when a child rank has reported its failure (SIGUSR2)."""


# Set when the signal arrives: raised inside a C extension (torch making a tensor of a LoRA file),
# AnotherRankFailed can come out as that extension's own error, without a chain leading back to it.
another_rank_signalled = False


def raise_another_rank_failed(signum: int, frame: Any) -> NoReturn:
    global another_rank_signalled
    another_rank_signalled = True
    raise AnotherRankFailed("another rank failed")


WAIT_FOR_LAUNCHER_S = 20.0  # how long a failed child waits for the launcher to report and exit


# Set in the trainer's setup of a multi-process run. Kept here because Lightning's teardown removes
# WORLD_SIZE from the environment before `main` sees the error.
current_run: Optional[DistributedRun] = None


def failure_reports_folder(launcher_pid: int) -> Path:
    """One folder per run, named by the launcher's pid and the run's port."""
    run = f"{launcher_pid}-{os.environ.get('MASTER_PORT', '')}"
    return Path(tempfile.gettempdir()) / "diffstyler" / "failures" / run


def report_failure(run: DistributedRun, line: str, status: int) -> None:
    report = json.dumps({"rank": run.rank, "line": line, "status": status}).encode()
    atomic_write(run.reports / f"rank{run.rank}.json", lambda handle: handle.write(report))  # never half a report


def failure_of_another_rank(run: DistributedRun) -> Optional[dict[str, Any]]:
    """The earliest failure reported by another rank of this run, if any."""
    reports = sorted(run.reports.glob("rank*.json"), key=lambda path: path.stat().st_mtime_ns) if run.reports.is_dir() else []
    for path in reports:
        report = json.loads(path.read_text())
        if report["rank"] != run.rank:
            return report
    return None


# (error, rank) -> (the line the user reads, the exit status)
FailureLine = Callable[[BaseException, Optional[int]], tuple[str, int]]


class ReportFirstFailure(Callback):
    """Reports this rank's failure for the other ranks (see above), unless another rank failed first."""

    def __init__(self, failure_line: FailureLine) -> None:
        self.failure_line = failure_line

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        global current_run
        if trainer.world_size <= 1:
            return
        launcher_pid = os.getpid() if trainer.local_rank == 0 else os.getppid()
        current_run = DistributedRun(trainer.global_rank, launcher_pid, failure_reports_folder(launcher_pid))
        if current_run.is_launcher and hasattr(signal, "SIGUSR2"):
            signal.signal(signal.SIGUSR2, raise_another_rank_failed)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, PredictInterrupted):  # not a failure: every rank stops and finishes the run together
            return
        if current_run is None or failure_of_another_rank(current_run) is not None:
            return
        report_failure(current_run, *self.failure_line(exception, current_run.rank))
        if not current_run.is_launcher and hasattr(signal, "SIGUSR2"):
            os.kill(current_run.launcher_pid, signal.SIGUSR2)


def wait_for_launcher_exit(run: DistributedRun) -> None:
    """Keep a failed child alive until the launcher has printed its report and exited: Lightning's
    observer kills the launcher as soon as a child exits with an error. The process group goes
    first, so that a launcher blocked in a collective wakes up with a broken connection."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    deadline = time.monotonic() + WAIT_FOR_LAUNCHER_S
    while os.getppid() == run.launcher_pid and time.monotonic() < deadline:
        time.sleep(0.1)
