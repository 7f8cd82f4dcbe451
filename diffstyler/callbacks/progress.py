"""The progress bars of the `diffstyler` command (Lightning's tqdm bar, counting what a user counts).

- `JobProgressBar`, predict: jobs done out of the jobs of this process, with the done, skipped and
  failed counts and an ETA (Lightning's bar would count chunks of `data.batch_size` jobs). In a
  multi-process run only rank zero draws, so the bar shows rank zero's share of the jobs; the
  summary at the end of the run counts every process's jobs.
- `StepProgressBar`, fit: optimizer steps out of the fit's total, with an ETA and the loss
  (Lightning's bar counts batches of an epoch, and a fit here is epochs of one batch: `Epoch 3/-2`).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar

from diffstyler.results import DONE, FAILED, SKIPPED


def jobs_of_this_process(trainer) -> int:
    """The jobs of the chunks this process's sampler hands out (see `data.jobs.ChunkDataset`)."""
    loaders = trainer.predict_dataloaders
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    return sum(len(loader.dataset[index]) for loader in loaders for index in loader.sampler)


class JobProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting jobs in predict runs (from the `JobResult`s of each chunk): one
    bar named `Jobs` from its first frame (Lightning's would show `Predicting` over chunks first)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counts = {DONE: 0, SKIPPED: 0, FAILED: 0}

    @property
    def predict_description(self) -> str:
        processes = self.trainer.world_size
        return "Jobs" if processes == 1 else f"Jobs (rank 0 of {processes} processes)"

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)  # the bar, named by `predict_description`
        self.counts = {DONE: 0, SKIPPED: 0, FAILED: 0}
        self.predict_progress_bar.reset(total=jobs_of_this_process(trainer))

    def on_predict_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Nothing: the bar counts jobs from the start (Lightning's resets it for each dataloader)."""

    def on_predict_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        for result in outputs or []:
            self.counts[result.status] += 1
        self.predict_progress_bar.set_postfix(dict(self.counts), refresh=False)
        self.predict_progress_bar.update(len(batch))


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar over a fit's optimizer steps (`trainer.estimated_stepping_batches`, which
    is max_steps where it is set), starting from the step a resumed fit continues from."""

    @property
    def train_description(self) -> str:
        return "Steps"  # from the bar's first frame (Lightning's is "Training")

    def on_train_start(self, trainer, pl_module) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=trainer.estimated_stepping_batches)
        self.train_progress_bar.initial = self.train_progress_bar.n = trainer.global_step

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        """One bar for the whole fit: nothing to reset at each epoch."""

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """The bar stays open until the fit ends."""

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version folder: not news at every step
        return metrics
