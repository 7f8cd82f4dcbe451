"""`DiffStylerCLI`: LightningCLI with the subcommands of `MODES` and the project's shared defaults."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from diffstyler.callbacks.first_failure import ReportFirstFailure
from diffstyler.callbacks.progress import JobProgressBar
from diffstyler.cli.checks import check_inputs
from diffstyler.cli.command_line import DEFAULT_SUBCOMMAND, SUBCOMMANDS
from diffstyler.cli.reporting import failure_line
from diffstyler.cli.status import JOBS_FAILED_STATUS
from diffstyler.data import StyleDataModule, StylizeDataModule
from diffstyler.evaluation.data import EvaluationDataModule
from diffstyler.evaluation.evaluator import QualityEvaluator
from diffstyler.evaluation.report import METRICS_NAME
from diffstyler.lora_per_image import fit_one_lora_per_image
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
DESCRIPTION = "DiffStyler: learn style LoRAs on Stable Diffusion 2.1-base and stylize image regions with them."
MAX_FAILURES_SHOWN = 20


class DiffStylerCLI(LightningCLI):
    """LightningCLI with the subcommands of `MODES` and the project's shared defaults:
    a TensorBoardLogger under `outputs/logs/<subcommand>`, `seed_everything` 0, the resolved config
    saved (overwriting) next to the logs, and each module's own optimizer (no `--optimizer`)."""

    def __init__(
        self,
        model_class: type[LightningModule],
        datamodule_class: type[LightningDataModule],
        subcommand: str = DEFAULT_SUBCOMMAND,
        args: ArgsType = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("trainer_defaults", shared_trainer_defaults(subcommand))
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        # exit_on_error off: jsonargparse raises ArgumentError, which `main` prints as one line.
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION, "exit_on_error": False})
        super().__init__(model_class, datamodule_class, args=args, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        subcommand = self.subcommand
        trainer.callbacks.append(ReportFirstFailure(lambda error, rank: failure_line(subcommand, error, rank)))
        if subcommand == "predict":
            count_jobs_in_progress_bar(trainer)
        return trainer

    def fit(self, **kwargs: Any) -> None:
        """`trainer.fit`; with `data.one_lora_per_image`, one fresh fit per style image."""
        if getattr(self.datamodule, "one_lora_per_image", False):
            fit_one_lora_per_image(self, kwargs.get("ckpt_path"))
        else:
            self.trainer.fit(**kwargs)

    def predict(self, **kwargs: Any) -> None:
        """`trainer.predict`, keeping no per-job results in memory unless `--return_predictions true`:
        they are in results.jsonl, and a 100k-job run would hold them all until the end."""
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        self.trainer.predict(**kwargs)

    def after_predict(self) -> None:
        """The run's summary on rank zero; exit status 1 when a job failed (the others are done)."""
        summary = getattr(self.model, "summary", None)
        if not summary:
            return
        folder = Path(self.model.output.folder)
        if self.trainer.is_global_zero:
            for line in self.model.failures[:MAX_FAILURES_SHOWN]:
                print(f"diffstyler predict: job failed: {line}", file=sys.stderr)
            print(summary_line(summary, folder / RESULTS_NAME), file=sys.stderr)
        if summary[FAILED]:
            sys.exit(JOBS_FAILED_STATUS)

    def after_test(self) -> None:
        """The scores on rank zero: how many results were scored, and the metrics."""
        scores = getattr(self.model, "scores", None)
        if not scores or not self.trainer.is_global_zero:
            return
        for name, entry in (scores.get("runs") or {"": scores}).items():
            label = f" {name}:" if name else ""
            print(f"diffstyler test:{label} scored {entry['count']} of {entry['listed']} results: LPIPS {entry['lpips']:.4f}, "
                  f"FID {entry['fid']:.2f}, ArtFID {entry['artfid']:.2f}, CFSD {entry['cfsd']:.4f}", file=sys.stderr)
        print(f"diffstyler test: reports in {Path(self.model.output) / METRICS_NAME} (and the CSV and PNG beside it)", file=sys.stderr)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # Runs before LightningCLI reads the checkpoint's hyper-parameters and instantiates anything.
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            check_inputs(self.config[subcommand], *MODES[subcommand])

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        lightning_subcommands = LightningCLI.subcommands()
        return {name: lightning_subcommands[name] for name in MODES}


# --- defaults and progress -------------------------------------------------------------------

def count_jobs_in_progress_bar(trainer: Trainer) -> None:
    """Lightning's own progress bar (tqdm, or rich where it is installed), if the trainer has one,
    replaced by one that counts jobs; a progress bar the user configured is kept."""
    for index, callback in enumerate(trainer.callbacks):
        if type(callback) in (TQDMProgressBar, RichProgressBar):
            trainer.callbacks[index] = JobProgressBar()


def summary_line(summary: dict[str, int], results: Path) -> str:
    total = sum(summary.values())
    return (f"diffstyler predict: {total} job{'' if total == 1 else 's'}: {summary[DONE]} done, "
            f"{summary[SKIPPED]} already done (skipped), {summary[FAILED]} failed; results in {results}")


# Trainer defaults that make a run without --config follow the paper (section IV): 200 LoRA steps.
# Without max_steps Lightning would fall back to max_epochs=1000, and an epoch is one step here.
PAPER_TRAINER_DEFAULTS: dict[str, dict[str, Any]] = {"fit": {"max_steps": 200}, "predict": {}, "test": {}}


def shared_trainer_defaults(subcommand: str) -> dict[str, Any]:
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": LOG_DIR, "name": subcommand},
        },
        **PAPER_TRAINER_DEFAULTS[subcommand],
    }
