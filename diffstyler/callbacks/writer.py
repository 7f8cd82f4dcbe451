"""Writing a predict run: `StylizationWriter`, a Lightning `BasePredictionWriter`.

`StylizePredictor.predict_step` returns one `JobResult` per job of its chunk (images in memory,
nothing written). The writer, after each chunk:
- writes every finished job's PNGs under the output folder (each path checked to stay inside it):
  its results with their settings, the `Content SSIM` and the settings hash (`outputs.save_result`),
  the grid (content | style images | results | masks) and the masks;
- appends each job's line to this process's part of `results.jsonl` (`results.ResultsLog`) and
  counts it (done, skipped, failed);
- applies the failure policy (`data.on_error`): "continue" records a failed job and goes on,
  "stop" raises its error (the run's one error line); the jobs found failing before the model
  loaded (`data.inputs`) are recorded when the run starts;
- stops the run with one line naming the folder when it cannot write there (a full disk, a folder
  made read-only: `folder_errors_as_one_line`); every file is whole or absent, so a rerun does the rest.
At the end of the run it sums the counts of every process and rank zero merges results.jsonl; so it
does when a signal stopped the run between two chunks (`callbacks.stop`: the run's stop requests go
through the writer, whose folder every process shares). Whether a job is already done (`is_done`:
every file there, decoding, with the current settings hash) is asked by the predictor before it
does any work for the job.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torchmetrics.functional.image import structural_similarity_index_measure

from diffstyler.callbacks.stop import PredictInterrupted
from diffstyler.checks import check_writable_folder
from diffstyler.data.jobs import Job, StylizeDataModule
from diffstyler.errors import UserError, first_line
from diffstyler.images import load_image
from diffstyler.masks import save_mask_png
from diffstyler.outputs import SETTINGS_HASH_KEY, atomic_write, image_grid, lora_tag, path_inside, pil_to_unit, save_result, to_pil
from diffstyler.results import DONE, FAILED, PARTS_FOLDER, SKIPPED, ResultsLog, job_is_done, merge_results

log = logging.getLogger(__name__)


@dataclass
class OutputConfig:
    """What is written per job into `folder`.

    Args:
        folder: the output folder; every file of the run is written inside it.
        grid: also write `<name>_grid.png` (content | style images | results | masks).
        composite: with masks, paste the result into the content with the feathered
            full-resolution mask, so pixels outside the masks are the content's, bit for bit.
        overwrite: redo every job (default: skip jobs whose outputs are finished and carry the
            current settings hash, so a rerun resumes; see `diffstyler.results`).
    """

    folder: str = "outputs/stylized"
    grid: bool = True
    composite: bool = True
    overwrite: bool = False


@dataclass
class JobResult:
    """A job's outcome as `predict_step` returns it: what to write (when done) and what to record.

    images: the result images, one per file of `job.files.results`. masks: each style's soft mask
    (None for styles without one). settings: the PNG metadata. sweep: an ablation grid's cells
    (each with its own Content SSIM), in place of one Content SSIM.
    """

    job: Job
    status: str
    seconds: float
    settings_hash: Optional[str] = None
    content: Optional[Image.Image] = None
    images: list[Image.Image] = field(default_factory=list)
    masks: list[Optional[torch.Tensor]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    sweep: bool = False
    error: Optional[BaseException] = None

    def to(self, device: torch.device | str, **kwargs: Any) -> "JobResult":
        """The result with its masks on `device`. Lightning moves predictions with `.to` (it would
        otherwise rebuild the dataclass field by field, which a frozen `Job` refuses)."""
        return replace(self, masks=[None if m is None else m.to(device) for m in self.masks])


@dataclass(frozen=True)
class JobRecord:
    """A job's line of results.jsonl, with its output files as absolute paths."""

    id: str
    content: str
    styles: tuple[Optional[str], ...]
    loras: tuple[Optional[str], ...]
    outputs: tuple[Path, ...]
    status: str
    seconds: float
    error: Optional[str]
    methods: tuple[str, ...] = ()  # per style: "diffstyler" (a LoRA) or "styleid" (an image alone)
    images: tuple[Optional[str], ...] = ()  # per style: its style image as given (None: none given)

    def as_line(self, folder: Path) -> dict[str, Any]:
        """The JSON line: outputs relative to the output folder (results.jsonl travels with it)."""
        return {"id": self.id, "content": self.content, "styles": list(self.styles), "loras": list(self.loras),
                "methods": list(self.methods), "images": list(self.images),
                "outputs": [path.relative_to(folder).as_posix() for path in self.outputs], "status": self.status,
                "seconds": self.seconds, "error": self.error}


@dataclass(frozen=True)
class JobPaths:
    """A job's files in the output folder (grid None without `output.grid`, a mask None per unmasked style)."""

    results: tuple[Path, ...]
    grid: Optional[Path]
    masks: tuple[Optional[Path], ...]

    def every_file(self) -> list[Path]:
        return [*self.results, *(path for path in (self.grid, *self.masks) if path is not None)]


class StylizationWriter(BasePredictionWriter):
    def __init__(self, output: OutputConfig, on_error: str = "stop") -> None:
        super().__init__(write_interval="batch")
        check_writable_folder(output.folder, "model.output.folder")  # now, not after the first job's work
        self.output = output
        self.folder = Path(output.folder).resolve()
        self.on_error = on_error
        self.counts: dict[str, int] = {DONE: 0, SKIPPED: 0, FAILED: 0}  # this process's, in this run
        self.failures: list[str] = []
        self.summary: dict[str, int] = {}  # the whole run's counts, after the run
        self.jobs_in_run: Optional[int] = None  # every process's jobs (None: not a StylizeDataModule's)
        self.stopped_by: Optional[int] = None  # after the run: the signal that stopped it, on any process
        self._log: Optional[ResultsLog] = None
        self._stop_signum: Optional[int] = None  # this process's stop request
        self._stop_file: Optional[Path] = None  # the stop requests of a multi-process run, while it runs

    # -- Lightning ------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        if isinstance(trainer.datamodule, StylizeDataModule):
            self.on_error = trainer.datamodule.on_error

    def on_predict_start(self, trainer, pl_module) -> None:
        self.start()
        datamodule = trainer.datamodule
        self.jobs_in_run = len(datamodule.job_ids()) if isinstance(datamodule, StylizeDataModule) else None
        if isinstance(datamodule, StylizeDataModule) and trainer.is_global_zero:
            # the jobs whose inputs fail, found before the model loaded (`data.inputs`): no process runs them
            self.write([JobResult(job, FAILED, 0.0, error=error) for job, error in datamodule.failed_up_front])
        self.stopped_by = None
        if trainer.world_size > 1:  # one name for the run's stop requests, that every process knows
            self._stop_file = self.folder / PARTS_FOLDER / f"stop-{trainer.strategy.broadcast(secrets.token_hex(8))}"

    def write_on_batch_end(self, trainer, pl_module, prediction: Sequence[JobResult], batch_indices, batch, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        self.write(prediction)

    def on_predict_end(self, trainer, pl_module) -> None:
        self.finish(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Every process of a stopped run comes here or to `on_predict_end`, so they finish together.
        if isinstance(exception, PredictInterrupted):
            self.finish(trainer, pl_module, exception.signum)

    def finish(self, trainer, pl_module, signum: int = 0) -> None:
        """Sum the job counts of every process and find whether a signal stopped any (`signum`: this
        one's, 0 for none); then rank zero merges results.jsonl (every process has flushed its part
        by the barrier) and says how many jobs were skipped. `summary` and `stopped_by` are the
        whole run's on every process."""
        stop_file, self._stop_file = self._stop_file, None  # the run is over: no more stop requests
        counts = torch.tensor([self.counts[DONE], self.counts[SKIPPED], self.counts[FAILED]], device=pl_module.device)
        total = trainer.strategy.reduce(counts, reduce_op="sum")
        self.summary = dict(zip((DONE, SKIPPED, FAILED), (int(n) for n in total)))
        self.stopped_by = int(trainer.strategy.reduce(torch.tensor(signum, device=pl_module.device), reduce_op="max")) or None
        trainer.strategy.barrier("results")
        if trainer.is_global_zero:
            if stop_file is not None:
                stop_file.unlink(missing_ok=True)
            if isinstance(trainer.datamodule, StylizeDataModule):
                with folder_errors_as_one_line(self.folder):
                    merge_results(self.folder, trainer.datamodule.job_ids())
        skipped = self.summary[SKIPPED]
        if skipped:
            rank_zero_info(f"{skipped} job{'' if skipped == 1 else 's'} already done, skipped")

    @property
    def not_started(self) -> int:
        """Jobs of the run that no process started (after the run; 0 when the run's jobs are unknown)."""
        return 0 if self.jobs_in_run is None else self.jobs_in_run - sum(self.summary.values())

    # -- stopping the run (`callbacks.stop`) -----------------------------------------------------

    def request_stop(self, signum: int) -> None:
        """Ask every process of the run to stop before its next chunk: this one at once, the others
        through a file next to the results' part files (written whole, by `atomic_write`)."""
        if self._stop_signum is None:
            self._stop_signum = signum
        if self._stop_file is not None and not self._stop_file.exists():
            self._stop_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self._stop_file, lambda handle: handle.write(str(signum).encode()))

    def stop_requested(self) -> Optional[int]:
        """The signal that asked this process or another to stop; None while none did."""
        if self._stop_signum is None and self._stop_file is not None and self._stop_file.is_file():
            text = self._stop_file.read_text().strip()
            self._stop_signum = int(text) if text.isdigit() else int(signal.SIGTERM)
        return self._stop_signum

    # -- what the predictor asks ----------------------------------------------------------------

    def paths(self, job: Job) -> JobPaths:
        """The job's files (named by `data.naming.JobFiles`), each checked to lie inside the folder."""
        files = job.files
        return JobPaths(
            tuple(self._inside(name) for name in files.results),
            self._inside(files.grid) if self.output.grid else None,
            tuple(self._inside(name) if name else None for name in files.masks),
        )

    def is_done(self, job: Job, settings_hash: str) -> bool:
        if self.output.overwrite:
            return False
        with folder_errors_as_one_line(self.folder):  # it removes what a killed run left
            return job_is_done(self.paths(job).every_file(), settings_hash)

    def _inside(self, name: str) -> Path:
        return path_inside(self.output.folder, name, "model.output.folder")

    # -- writing --------------------------------------------------------------------------------

    def start(self) -> None:
        """A new run: counts from zero and a fresh part file of results.jsonl."""
        self.counts = {DONE: 0, SKIPPED: 0, FAILED: 0}
        self.failures = []
        self._stop_signum = None
        self._log = ResultsLog(self.folder)

    def write(self, results: Sequence[JobResult]) -> list[JobRecord]:
        """Write and record each job in order; with `on_error` "stop" a failed job's error is raised."""
        if self._log is None:
            self.start()
        return [self._write_one(result) for result in results]

    def _write_one(self, result: JobResult) -> JobRecord:
        paths = self.paths(result.job)
        outputs: tuple[Path, ...] = ()
        if result.status == DONE:
            with folder_errors_as_one_line(self.folder):
                outputs = self._write_files(result, paths)
        elif result.status == SKIPPED:
            outputs = paths.results
        line = first_line(result.error) if result.error is not None else None  # a UserError's str is its one line
        if result.error is not None and self.on_error == "stop":
            raise result.error  # the run's one error line; nothing of the job is written
        job = result.job
        record = JobRecord(job.id, job.content, tuple(s.name for s in job.styles), tuple(s.lora for s in job.styles),
                           outputs, result.status, round(result.seconds, 3), line,
                           tuple(s.method for s in job.styles), tuple(s.image for s in job.styles))
        with folder_errors_as_one_line(self.folder):
            self._log.record(record.as_line(self.folder))
        self.counts[result.status] += 1
        if result.error is not None:
            self.failures.append(f"{job.where}: {line}")
            log.warning("job %s failed (%s): %s", job.id, job.where, line)
        return record

    def _write_files(self, result: JobResult, paths: JobPaths) -> tuple[Path, ...]:
        chunks = {SETTINGS_HASH_KEY: result.settings_hash}
        for mask, path in zip(result.masks, paths.masks):
            if mask is not None and path is not None:
                save_mask_png(mask, path, chunks)
        styles = result.job.styles
        prompt = " | ".join(entry.prompt for entry in styles)
        tags = " ".join(lora_tag(entry.name, entry.scale) for entry in styles if entry.lora is not None)  # image styles have no LoRA
        negative = result.settings["Sampling"]["negative_prompt"]
        written = []
        for image, path in zip(result.images, paths.results):
            # An ablation grid has one similarity per cell, already in its settings.
            settings = result.settings if result.sweep else {**result.settings, "Content SSIM": round(content_ssim(result.content, image), 4)}
            written.append(save_result(image, path, prompt, negative, settings, result.settings_hash, tags))
        if paths.grid is not None:
            extras = [load_image(entry.image) for entry in styles if entry.image]
            mask_tiles = [to_pil(mask[None].expand(3, -1, -1)) for mask in result.masks if mask is not None]
            grid = image_grid([result.content, *extras, *result.images, *mask_tiles], height=result.content.height)
            save_result(grid, paths.grid, prompt, negative, result.settings, result.settings_hash, tags)
        return tuple(written)


@contextlib.contextmanager
def folder_errors_as_one_line(folder: Path) -> Iterator[None]:
    """An OSError while writing into the output folder (a full disk, a quota, a folder made
    read-only) stops the run with one line naming the folder, instead of a traceback. Every file
    is written whole or not at all (`outputs.atomic_write`, `results.ResultsLog`), so what the run
    finished is kept and the same command does the rest. The user errors of reading an input
    (a style image of the grid) stay what they are."""
    try:
        yield
    except UserError:
        raise
    except OSError as error:
        raise UserError("cannot write into the output folder", f"model.output.folder={folder}",
                        f"{error.strerror or first_line(error)}; the finished jobs are kept, and the same command "
                        "does the rest once it can write there") from error


def content_ssim(content: Image.Image, result: Image.Image) -> float:
    """Structural similarity of the result to the content (1 = same structure), via torchmetrics."""
    return float(structural_similarity_index_measure(pil_to_unit(result)[None], pil_to_unit(content)[None], data_range=1.0))
