"""`QualityEvaluator`: the LightningModule that `diffstyler test` runs through Lightning's test loop.

Every test batch holds (content, style, result) triples of one or more runs, each image at the size
its metric needs (`data.EvaluationDataModule`). Each run has its own metrics (LPIPS, FID, CFSD, CSD
from `metrics.build_metrics`), all on ONE set of feature networks; torchmetrics syncs their states over DDP
processes when they are computed, so each triple is counted once whichever process scored it.
Per-triple LPIPS, CFSD and CSD travel in `CatMetric`s with the triple's index, so rank zero can write the
per-image table in dataset order. At the end rank zero writes the reports (`report.write_reports`);
the metrics go to the logger, and where it is a TensorBoardLogger, the per-image scores too
(`report.log_per_image`).
"""

from __future__ import annotations

from typing import Any, Optional

from lightning import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics import CatMetric

from diffstyler.checks import check_writable_folder
from diffstyler.evaluation.data import describe_preprocessing, same_size_groups
from diffstyler.evaluation.metrics import MetricsConfig, build_metrics, feature_networks
from diffstyler.evaluation.report import describe_networks, log_per_image, per_image_rows, write_reports

PER_IMAGE_COLUMNS = ("index", "lpips", "cfsd", "csd")


class QualityEvaluator(LightningModule):
    """Score stylization results (`diffstyler test`).

    Args:
        metrics: which feature networks (local weight files; `random: true` for the smoke config).
        output: the folder for metrics.json, metrics_per_image.csv, metrics_per_style.csv, metrics.png.
    """

    def __init__(self, metrics: MetricsConfig = MetricsConfig(), output: str = "outputs/evaluation"):
        super().__init__()
        check_writable_folder(output, "model.output")
        self.metrics_config = metrics
        self.output = output
        self.run_metrics: Optional[nn.ModuleList] = None
        self.per_image: Optional[nn.ModuleDict] = None
        self.scores: dict[str, Any] = {}

    def configure_model(self) -> None:
        """Load the feature networks once and give every run its metrics on them."""
        if self.run_metrics is not None:
            return
        runs = len(self.trainer.datamodule.runs) if self._trainer is not None else 1
        networks = feature_networks(self.metrics_config)
        self.run_metrics = nn.ModuleList(build_metrics(networks) for _ in range(runs))
        self.per_image = nn.ModuleDict({name: CatMetric(nan_strategy="disable") for name in PER_IMAGE_COLUMNS})

    def test_step(self, batch: dict[str, Any], batch_idx: int = 0) -> None:
        for group in same_size_groups(batch):
            values = self.run_metrics[group["run"]].update(
                group["content"], group["style"], group["result"],
                cfsd_content=group["cfsd_content"], cfsd_result=group["cfsd_result"],
                csd_style=group["csd_style"], csd_result=group["csd_result"])
            self.per_image["index"].update(group["index"].double())
            for metric in PER_IMAGE_COLUMNS[1:]:
                self.per_image[metric].update(values[metric].double())

    def on_test_epoch_end(self) -> None:
        data = self.trainer.datamodule
        runs = {name: self.run_metrics[run].compute() for run, name in enumerate(data.runs)}  # with artfid
        per_image = {name: metric.compute().cpu() for name, metric in self.per_image.items()}
        labels = {name: name if len(runs) > 1 else "test" for name in runs}
        for name, scores in runs.items():
            self.log_dict({f"{labels[name]}/{key}": value for key, value in scores.items()}, rank_zero_only=True)
        if not self.trainer.is_global_zero:
            return
        rows = per_image_rows(data, per_image)
        self.scores = write_reports(self.output, data, runs, rows, describe_networks(self.metrics_config),
                                    describe_preprocessing(data.size))
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                log_per_image(logger.experiment, rows, labels, self.global_step)
