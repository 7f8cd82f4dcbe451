"""What a predict run shows in TensorBoard: `PredictionLogger`.

For the first `max_images` finished jobs, an image (content | results) and the job's settings as
text; at the end of the run, its throughput (results per minute, and the done / skipped / failed
counts of this process). Only where the trainer has a TensorBoardLogger, and only rank zero writes
(Lightning's logger experiment is a no-op elsewhere). Without a logger nothing is written.
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from diffstyler.outputs import image_grid, pil_to_unit
from diffstyler.results import DONE, FAILED, SKIPPED


class PredictionLogger(Callback):
    def __init__(self, max_images: int = 16) -> None:
        self.max_images = max_images
        self.logged = 0
        self.counts = {DONE: 0, SKIPPED: 0, FAILED: 0}
        self.started = 0.0

    def _loggers(self, trainer) -> list[TensorBoardLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def on_predict_start(self, trainer, pl_module) -> None:
        self.logged, self.counts, self.started = 0, {DONE: 0, SKIPPED: 0, FAILED: 0}, time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs: Sequence[Any], batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        loggers = self._loggers(trainer)
        for result in outputs or []:
            self.counts[result.status] += 1
            if not loggers or result.status != DONE or self.logged >= self.max_images:
                continue
            grid = pil_to_unit(image_grid([result.content, *result.images], height=result.content.height))
            text = "```\n" + json.dumps(result.settings, indent=2, default=str) + "\n```"
            for logger in loggers:
                logger.experiment.add_image(f"results/{result.job.id}", grid, global_step=0)
                logger.experiment.add_text(f"settings/{result.job.id}", text, global_step=0)
            self.logged += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        minutes = (time.perf_counter() - self.started) / 60
        for logger in self._loggers(trainer):
            experiment = logger.experiment
            experiment.add_scalar("predict/results_per_minute", self.counts[DONE] / minutes if minutes > 0 else 0.0, 0)
            for status, count in self.counts.items():
                experiment.add_scalar(f"predict/jobs_{status}", count, 0)
            experiment.flush()

