"""What a predict run shows in TensorBoard: `PredictionLogger`.

For the first `max_images` finished jobs, an image `results/<job id>` (content | results) and the
job's settings as text `settings/<job id>`; at the end of the run, its throughput
(`predict/results_per_minute`) and the done / skipped / failed counts (`predict/jobs_<status>`).
Only where the trainer has a TensorBoardLogger, and only on rank zero (so the counts and the
throughput are rank zero's share of the run; the summary line counts every process). Without a
logger (`--trainer.logger false`) nothing is written.
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from diffstyler.outputs import image_grid, pil_to_unit
from diffstyler.results import DONE, FAILED, SKIPPED

RESULTS_TAG = "results/{}"
SETTINGS_TAG = "settings/{}"
THROUGHPUT_TAG = "predict/results_per_minute"
COUNT_TAG = "predict/jobs_{}"


class PredictionLogger(Callback):
    """Logs predict's results to the trainer's TensorBoardLoggers (see the module's docstring)."""

    def __init__(self, max_images: int = 16) -> None:
        self.max_images = max_images
        self.logged = 0
        self.counts = {DONE: 0, SKIPPED: 0, FAILED: 0}
        self.started = 0.0

    @staticmethod
    def tensorboards(trainer) -> list[TensorBoardLogger]:
        if not trainer.is_global_zero:
            return []
        return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def on_predict_start(self, trainer, pl_module) -> None:
        self.logged, self.counts, self.started = 0, {DONE: 0, SKIPPED: 0, FAILED: 0}, time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs: Sequence[Any], batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        loggers = self.tensorboards(trainer)
        for result in outputs or []:
            self.counts[result.status] += 1
            if loggers and result.status == DONE and self.logged < self.max_images:
                self.log_result(loggers, result)
                self.logged += 1

    @staticmethod
    def log_result(loggers: list[TensorBoardLogger], result: Any) -> None:
        """The job's content and result images side by side, and its settings (the PNG metadata)."""
        grid = pil_to_unit(image_grid([result.content, *result.images], height=result.content.height))
        # Markdown: indented by four spaces, the JSON shows as code.
        text = "\n".join("    " + line for line in json.dumps(result.settings, indent=2, default=str).splitlines())
        for logger in loggers:
            logger.experiment.add_image(RESULTS_TAG.format(result.job.id), grid, global_step=0)
            logger.experiment.add_text(SETTINGS_TAG.format(result.job.id), text, global_step=0)

    def on_predict_end(self, trainer, pl_module) -> None:
        minutes = (time.perf_counter() - self.started) / 60
        for logger in self.tensorboards(trainer):
            experiment = logger.experiment
            experiment.add_scalar(THROUGHPUT_TAG, self.counts[DONE] / minutes if minutes > 0 else 0.0, 0)
            for status, count in self.counts.items():
                experiment.add_scalar(COUNT_TAG.format(status), count, 0)
            experiment.flush()
