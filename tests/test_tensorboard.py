"""What predict writes to TensorBoard (`callbacks.tensorboard.PredictionLogger`), read back from the
event file, and that a run without a logger writes no log folder."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffstyler.callbacks.tensorboard import PredictionLogger
from diffstyler.callbacks.writer import JobResult
from diffstyler.cli import main
from diffstyler.outputs import read_settings
from diffstyler.data import StyleEntry, StylizeDataModule
from diffstyler.results import DONE
from tests.helpers import CONTENT, REPO_ROOT, make_job, make_predictor


def read_events(folder) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    return events


@pytest.mark.slow
def test_predict_logs_each_result_grid_its_settings_and_the_throughput(tmp_path, loras):
    """Mistakes caught: the PredictionLogger not declared by the predictor (an empty event folder),
    the grid without the content beside the result, the settings or the throughput not logged."""
    second = tmp_path / "second.png"
    Image.open(CONTENT).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(second)
    data = StylizeDataModule(content=[str(CONTENT), str(second)], styles=[StyleEntry(lora=str(loras[0]))], resolution=64)
    logger = TensorBoardLogger(str(tmp_path / "logs"), name="predict")
    trainer = Trainer(accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(make_predictor(tmp_path), datamodule=data, return_predictions=False)

    events = read_events(logger.log_dir)
    assert sorted(events.Tags()["images"]) == ["results/content_shapes", "results/second"]
    grid = events.Images("results/content_shapes")[0]
    assert (grid.height, grid.width) == (2 + 48 + 2, 2 + 64 + 2 + 64 + 2)  # content | result (64 x 48), 2 px apart and around
    text = events.Tensors("settings/content_shapes/text_summary")[0].tensor_proto.string_val[0].decode()
    settings = json.loads("\n".join(line[4:] for line in text.splitlines()))
    assert "Seed" in settings and settings.items() <= read_settings(tmp_path / "out" / "content_shapes.png").items()  # the PNG's
    assert events.Scalars("predict/jobs_done")[0].value == 2
    assert events.Scalars("predict/results_per_minute")[0].value > 0


def test_only_the_first_max_images_results_are_logged(tmp_path, loras):
    """Mistake caught: every job's grid logged (a 100k-job run would write 100k images)."""
    logger = TensorBoardLogger(str(tmp_path / "logs"), name="predict")
    trainer = Trainer(accelerator="cpu", devices=1, logger=logger)
    job = make_job([StyleEntry(lora=str(loras[0]))])
    content = Image.new("RGB", (16, 16), "white")
    results = [JobResult(replace(job, id=f"job{k}"), DONE, 0.0, content=content, images=[content]) for k in range(3)]
    callback = PredictionLogger(max_images=2)
    callback.on_predict_start(trainer, None)
    callback.on_predict_batch_end(trainer, None, results, results, 0)
    callback.on_predict_end(trainer, None)
    events = read_events(logger.log_dir)
    assert sorted(events.Tags()["images"]) == ["results/job0", "results/job1"]
    assert events.Scalars("predict/jobs_done")[0].value == 3


@pytest.mark.slow
def test_predict_without_a_logger_writes_no_log_folder(tmp_path, loras, monkeypatch):
    """Mistake caught: `--trainer.logger false` still leaving an event folder under outputs/logs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    main(["predict", "--config", str(REPO_ROOT / "configs" / "smoke" / "stylize.yaml"), "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", "--data.content", json.dumps([str(CONTENT)]),
          "--data.styles", json.dumps([{"lora": str(loras[0].parent)}]), "--model.output.folder", str(tmp_path / "run"),
          "--model.inversion_cache", "null", "--model.sampling.steps", "4", "--model.injection.feature_steps", "2",
          "--model.injection.attention_steps", "2"])
    assert (tmp_path / "run" / "results.jsonl").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]
    assert not any(path.name.startswith("events.out.tfevents") for path in (tmp_path / "run").rglob("*"))
