"""`DiffStylerCLI`: LightningCLI with the subcommands of `MODES` and the project's shared defaults,
and `run_subcommand`, which runs it and turns its errors into one line and an exit status.

- Without a logger (`--trainer.logger false`) the run's own files, which Lightning would write into
  the working folder (the resolved config; fit's checkpoints), go next to its outputs.
- A fit stopped by Ctrl-C or SIGTERM saves a checkpoint of its last completed step
  (`diffstyler.callbacks.interrupt`) and ends with the command that resumes it, status 130 / 143.
- A predict run stopped by Ctrl-C or SIGTERM finishes the chunk of jobs in progress on every
  process (`diffstyler.callbacks.stop`), merges results.jsonl and ends with its summary (the jobs
  not started), status 130 / 143; the same command does the rest.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from diffstyler.callbacks import first_failure
from diffstyler.callbacks.first_failure import ReportFirstFailure, wait_for_launcher_exit
from diffstyler.callbacks.interrupt import FitInterrupted, SaveOnInterrupt, fit_until_interrupted
from diffstyler.callbacks.progress import JobProgressBar, StepProgressBar
from diffstyler.callbacks.stop import PredictInterrupted, StopOnSignal
from diffstyler.callbacks.writer import StylizationWriter
from diffstyler.cli.checks import check_fit_steps, check_inputs
from diffstyler.cli.command_line import DEFAULT_SUBCOMMAND, DESCRIPTION, SUBCOMMAND_HELP, SUBCOMMANDS
from diffstyler.cli.config_files import ConfigSource
from diffstyler.cli.lora_per_image import fit_one_lora_per_image
from diffstyler.cli.parsing import PARSER_SETTINGS, accept_single_values_as_lists, parse_error
from diffstyler.cli.reporting import exit_for, failure_line, interrupted_line, lora_written_line
from diffstyler.cli.status import JOBS_FAILED_STATUS, interrupted_status
from diffstyler.console import get_verbosity
from diffstyler.data import StyleDataModule, StylizeDataModule
from diffstyler.evaluation.data import EvaluationDataModule
from diffstyler.evaluation.evaluator import QualityEvaluator
from diffstyler.evaluation.report import METRICS_NAME
from diffstyler.predictor import StylizePredictor
from diffstyler.results import DONE, FAILED, RESULTS_NAME, SKIPPED
from diffstyler.training import StyleLoRAModule

# subcommand -> (LightningModule class, LightningDataModule class). A new one is added here and its
# name in `command_line.SUBCOMMANDS` (which `main` reads before importing this module).
MODES: dict[str, tuple[type[LightningModule], type[LightningDataModule]]] = {
    "fit": (StyleLoRAModule, StyleDataModule),
    "predict": (StylizePredictor, StylizeDataModule),
    "test": (QualityEvaluator, EvaluationDataModule),
}
assert tuple(MODES) == SUBCOMMANDS, "command_line.SUBCOMMANDS must name the subcommands of MODES, in order"
LOG_DIR = "outputs/logs"
MAX_FAILURES_SHOWN = 20
# Each subcommand's output folder (of its instantiated LightningModule).
OUTPUT_FOLDERS: dict[str, Callable[[Any], str]] = {
    "fit": lambda model: model.output_dir,  # the LoRA
    "predict": lambda model: model.output.folder,  # the stylized images
    "test": lambda model: model.output,  # the reports
}


class DiffStylerCLI(LightningCLI):
    """LightningCLI with the subcommands of `MODES` and the project's shared defaults:
    a TensorBoardLogger under `outputs/logs/<subcommand>`, `seed_everything` 0, the resolved config
    saved (overwriting) next to the logs, each module's own optimizer (no `--optimizer`), and the
    parsing rules of `diffstyler.cli.parsing`. `config_sources` are the `--config` files as read
    by `main`, to name the file of an unknown key."""

    def __init__(
        self,
        model_class: type[LightningModule],
        datamodule_class: type[LightningDataModule],
        subcommand: str = DEFAULT_SUBCOMMAND,
        args: ArgsType = None,
        config_sources: Sequence[ConfigSource] = (),
        **kwargs: Any,
    ) -> None:
        self.config_sources = config_sources
        self.subcommand_name = subcommand  # LightningCLI sets `self.subcommand` only after parsing
        kwargs.setdefault("trainer_defaults", shared_trainer_defaults(subcommand))
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        # jsonargparse gives each subcommand's parser the main parser's exit_on_error and allow_abbrev;
        # LightningCLI gives a subcommand's parser the kwargs under its name.
        kwargs.setdefault("parser_kwargs", {"prog": "diffstyler", "description": DESCRIPTION, **PARSER_SETTINGS,
                                            **{name: subcommand_parser_kwargs(name) for name in MODES}})
        super().__init__(model_class, datamodule_class, args=args, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self.config[self.subcommand].trainer
        no_logger = not trainer_config.get("logger")
        if (no_logger or self.subcommand == "predict") and trainer_config.get("default_root_dir") is None:
            # Without a logger, Lightning writes the run's own files (the resolved config, fit's
            # checkpoints) into default_root_dir, the working folder: they go next to the outputs.
            # So does, for predict, the checkpoint of Lightning's SLURM requeue (`hpc_ckpt_<n>.ckpt`,
            # without weights: `StylizePredictor.on_save_checkpoint`), where the requeued run finds it.
            kwargs.setdefault("default_root_dir", OUTPUT_FOLDERS[self.subcommand](self.model))
        trainer = super().instantiate_trainer(**kwargs)
        subcommand = self.subcommand
        trainer.callbacks.append(ReportFirstFailure(lambda error, rank: failure_line(subcommand, error, rank)))
        if subcommand == "fit":
            replace_default_progress_bar(trainer, StepProgressBar)
            trainer.callbacks.append(SaveOnInterrupt())
        if subcommand == "predict":
            replace_default_progress_bar(trainer, JobProgressBar)
            trainer.callbacks.append(StopOnSignal(self.model.writer))
        return trainer

    def fit(self, **kwargs: Any) -> None:
        """`trainer.fit`; with `data.one_lora_per_image`, one fresh fit per style image. Stopped by
        SIGINT or SIGTERM (`SaveOnInterrupt`), it raises FitInterrupted."""
        if getattr(self.datamodule, "one_lora_per_image", False):
            fit_one_lora_per_image(self, kwargs.get("ckpt_path"))
            return
        started = time.perf_counter()
        fit_until_interrupted(self.trainer, **kwargs)
        if self.trainer.is_global_zero:
            print(lora_written_line(self.model.output_dir, self.trainer.global_step, time.perf_counter() - started), file=sys.stderr)

    def predict(self, **kwargs: Any) -> None:
        """`trainer.predict`, keeping no per-job results in memory unless `--return_predictions true`:
        they are in results.jsonl, and a 100k-job run would hold them all until the end.

        What is the same for every job is checked first (`StylizePredictor.check_run`; its `setup`
        would, but only once a multi-process run has started all its processes). A run stopped by a
        signal (`PredictInterrupted`) was finished by its writer on every process: it is reported
        and the process exits here."""
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        self.model.check_run(self.datamodule)
        try:
            self.trainer.predict(**kwargs)
        except PredictInterrupted as stop:
            self.end_predict(self.model.writer.stopped_by or stop.signum)

    def after_predict(self) -> None:
        # A process whose jobs were all done may end here while another process stopped the run.
        self.end_predict(self.model.writer.stopped_by)

    def end_predict(self, stopped_by: Optional[int]) -> None:
        """The run's summary on rank zero; exit status 128 + the signal that stopped the run (on any
        process), else 1 when a job failed (the others are done)."""
        writer = self.model.writer
        if writer.summary and self.trainer.is_global_zero:
            why_it_failed = only_failure(writer)
            for line in [] if why_it_failed else writer.failures[:MAX_FAILURES_SHOWN]:
                print(f"diffstyler predict: job failed: {line}", file=sys.stderr)
            print(summary_line(writer.summary, writer.folder / RESULTS_NAME, writer.not_started, stopped_by, why_it_failed),
                  file=sys.stderr)
        if stopped_by:
            exit_after_the_launcher(interrupted_status(stopped_by))
        if writer.summary.get(FAILED):
            exit_after_the_launcher(JOBS_FAILED_STATUS)

    def test(self, **kwargs: Any) -> None:
        """`trainer.test` without Lightning's table of the logged metrics: `after_test` says the
        scores in one line (the table too with `--verbose`)."""
        kwargs["verbose"] = get_verbosity() <= logging.INFO
        self.trainer.test(**kwargs)

    def after_test(self) -> None:
        """The scores on rank zero: how many results were scored, and the metrics."""
        scores = getattr(self.model, "scores", None)
        if not scores or not self.trainer.is_global_zero:
            return
        for name, entry in (scores.get("runs") or {"": scores}).items():
            label = f" {name}:" if name else ""
            print(f"diffstyler test:{label} scored {entry['count']} of {entry['listed']} results: LPIPS {entry['lpips']:.4f}, "
                  f"FID {entry['fid']:.2f}, ArtFID {entry['artfid']:.2f}, CFSD {entry['cfsd']:.4f}, "
                  f"CSD {entry['csd']:.4f}", file=sys.stderr)
        print(f"diffstyler test: reports in {Path(self.model.output) / METRICS_NAME} (and the CSV and PNG beside it)", file=sys.stderr)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Called for each subcommand's parser, once it has the trainer's, model's and data's keys.
        accept_single_values_as_lists(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # Runs before LightningCLI reads the checkpoint's hyper-parameters and instantiates anything,
        # and before --help is printed (while parsing), once every subcommand's parser is complete.
        for name, subcommand_parser in self._subcommand_parsers.items():
            put_our_keys_first(subcommand_parser, name, self._subcommand_method_arguments[name])
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            # LightningCLI keeps the subcommands' parsers in `_subcommand_parsers` (lightning 2.6).
            subcommand_parser = self._subcommand_parsers[self.subcommand_name]
            raise parse_error(error, subcommand_parser, self.config_sources, sys.argv[1:] if args is None else args) from error
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            check_inputs(self.config[subcommand], *MODES[subcommand])
        if subcommand == "fit":
            check_fit_steps(self.config.fit.trainer)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        lightning_subcommands = LightningCLI.subcommands()
        return {name: lightning_subcommands[name] for name in MODES}


# --- help ----------------------------------------------------------------------------------------

def subcommand_parser_kwargs(subcommand: str) -> dict[str, str]:
    """The top of `diffstyler <subcommand> --help`: a short usage line (argparse's would list all 100
    keys) and our description (LightningCLI's is the Trainer method's docstring)."""
    return {
        "usage": f"diffstyler {subcommand} [-h] [--config FILE] [--print_config] [--model.KEY VALUE] [--data.KEY VALUE] "
                 "[--trainer.KEY VALUE] ...",
        "description": f"diffstyler {subcommand}: {SUBCOMMAND_HELP[subcommand]}. {DESCRIPTION} Our keys are --model.* "
                       "and --data.* (listed first); --trainer.* are Lightning's Trainer's.",
    }


def put_our_keys_first(parser: LightningArgumentParser, subcommand: str, method_arguments: Sequence[str]) -> None:
    """The help's groups of Lightning's keys (LightningCLI adds `--trainer.*` first, and the
    `Trainer.<subcommand>` method's own arguments last, titled by that method's docstring) moved
    after ours, the method's group titled as what it is."""
    def is_lightnings(group: Any) -> bool:
        dests = [action.dest for action in group._group_actions]
        trainer = all(dest == "trainer" or dest.startswith("trainer.") for dest in dests)
        return bool(dests) and (trainer or set(dests) <= set(method_arguments))

    for group in parser._action_groups:
        dests = [action.dest for action in group._group_actions]
        if dests and set(dests) <= set(method_arguments):
            group.title = f"Lightning's Trainer.{subcommand} arguments"
    parser._action_groups.sort(key=is_lightnings)  # a stable sort: each side keeps its order


# --- defaults and progress -------------------------------------------------------------------

def replace_default_progress_bar(trainer: Trainer, progress_bar: type[TQDMProgressBar]) -> None:
    """Lightning's own progress bar (tqdm, or rich where it is installed), if the trainer has one,
    replaced by ours (`callbacks.progress`: jobs for predict, steps for fit); a progress bar the
    user configured is kept."""
    for index, callback in enumerate(trainer.callbacks):
        if type(callback) in (TQDMProgressBar, RichProgressBar):
            trainer.callbacks[index] = progress_bar()


def summary_line(summary: dict[str, int], results: Path, not_started: int = 0, stopped_by: Optional[int] = None,
                 why_it_failed: Optional[str] = None) -> str:
    """The last line of a predict run: its jobs by outcome; `stopped_by` the signal that stopped it;
    `why_it_failed` the failure of a run whose one job failed (no need to look further up)."""
    total = sum(summary.values()) + not_started
    stopped = f"interrupted by {signal.Signals(stopped_by).name}: " if stopped_by else ""
    failed = f"{summary[FAILED]} failed" + (f" ({why_it_failed})" if why_it_failed else "")
    rest = f", {not_started} not started" if not_started else ""
    again = "; the same command does the rest" if stopped_by and not_started else ""
    return (f"diffstyler predict: {stopped}{total} job{'' if total == 1 else 's'}: {summary[DONE]} done, "
            f"{summary[SKIPPED]} already done (skipped), {failed}{rest}; results in {results}{again}")


def only_failure(writer: StylizationWriter) -> Optional[str]:
    """The failure of a run whose one job failed (this process's: the one job is rank zero's)."""
    one_job = sum(writer.summary.values()) + writer.not_started == 1
    return writer.failures[0] if one_job and writer.summary[FAILED] and writer.failures else None


def exit_after_the_launcher(status: int) -> None:
    """sys.exit(status); a process started by the launcher of a multi-process run first waits for it
    to exit: Lightning's launcher kills itself when one of its processes ends with an error."""
    run = first_failure.current_run
    if run is not None and not run.is_launcher:
        wait_for_launcher_exit(run)
    sys.exit(status)


# Trainer defaults that make a run without --config follow the paper (section IV): 200 LoRA steps.
# Without max_steps Lightning would fall back to max_epochs=1000, and an epoch is one step here.
PAPER_TRAINER_DEFAULTS: dict[str, dict[str, Any]] = {"fit": {"max_steps": 200}, "predict": {}, "test": {}}


def shared_trainer_defaults(subcommand: str) -> dict[str, Any]:
    """A TensorBoardLogger under `outputs/logs/<subcommand>`; no model summary table (a quiet
    console: `diffstyler.console`; `--trainer.enable_model_summary true` shows it); the paper's steps."""
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": LOG_DIR, "name": subcommand},
        },
        "enable_model_summary": False,
        **PAPER_TRAINER_DEFAULTS[subcommand],
    }


# --- running a subcommand ------------------------------------------------------------------------

def run_subcommand(subcommand: str, args: Optional[list[str]], sources: Sequence[ConfigSource], command: list[str],
                   debug: bool) -> None:
    """The subcommand run by `DiffStylerCLI` (`args` None: from sys.argv). A user error ends the
    process with one line on stderr and status 2; with `debug` it is raised. A fit stopped by a
    signal ends it with the line that continues it (`command`: the arguments as the user gave
    them) and status 128 + the signal."""
    model_class, datamodule_class = MODES[subcommand]
    try:
        DiffStylerCLI(model_class, datamodule_class, subcommand=subcommand, args=args, config_sources=sources)
    except FitInterrupted as stop:
        if rank_zero_only.rank == 0:
            print(interrupted_line(stop.interruption, command), file=sys.stderr)
        sys.exit(interrupted_status(stop.interruption.signum))
    except Exception as error:  # not BaseException: sys.exit keeps its meaning
        if not debug:
            exit_for(subcommand, error)
        raise
