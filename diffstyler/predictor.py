"""`StylizePredictor`: DiffStyler over datasets, as a LightningModule run by Lightning's predict loop.

The method is `DiffStylerPipeline`'s; this module only orchestrates it for chunks of jobs
(`data.batch_size`), on one or many processes:
1. prepare each job: skip it when its outputs are done with the current settings (asked of the
   writer), else load its content, make its masks and its styles' rows (`pipeline.prepare_styles`);
2. invert the chunk's contents together, several of one size per call (`pipeline.trajectories`);
3. denoise jobs of one latent size together, at most `max_unet_rows` rows per denoiser call
   (`pipeline.denoise`), finish them as `__call__` does (`pipeline.finish`), and return one
   `JobResult` per job;
4. a job whose input fails (a user error) fails alone: a failing group is run again job by job.
Writing the results, results.jsonl, the counts and the failure policy are the `StylizationWriter`
callback's (`callbacks.writer`), which this module declares (`configure_callbacks`) with
`callbacks.tensorboard.PredictionLogger` (result grids, settings and throughput in TensorBoard). Before the
model loads, `check_run` checks what is the same for every job, so that its error stops the run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from diffstyler.callbacks.tensorboard import PredictionLogger
from diffstyler.callbacks.writer import JobResult, OutputConfig, StylizationWriter, content_ssim
from diffstyler.checks import check_lora_finite, check_model_reference, check_writable_folder
from diffstyler.data.inputs import job_input_failures, jobs_that_run
from diffstyler.data.jobs import Job, StyleEntry, StylizeDataModule
from diffstyler.errors import UserError, config_error
from diffstyler.backbones import LayerMap
from diffstyler.images import LATENT_FACTOR, load_image, resize_to_multiple, sha256_file
from diffstyler.injection import (
    INJECTION_WINDOWS,
    InjectionConfig,
    check_injection_window,
    check_window_steps,
    describe_ineffective_sites,
)
from diffstyler.lora import check_lora_width
from diffstyler.masks import SegmenterConfig, check_segmenter
from diffstyler.memory import check_offload, check_offload_device
from diffstyler.models import ModelSpec, load_pipeline, model_lora_width, pixel_multiple_for
from diffstyler.methods import StyleIDConfig
from diffstyler.pipeline import DiffStylerPipeline, attach_style_trajectories
from diffstyler.quantization import check_quantization_device
from diffstyler.provenance import PixelSettings
from diffstyler.results import DONE, FAILED, SKIPPED
from diffstyler.rows import rows_per_job
from diffstyler.stylize import DenoiseJob, SamplingConfig, StepCallback, StyleRows, call_methods
from diffstyler.sweep import SweepConfig, ablation_grid

# What fails one job (a user error about its input: an unreadable image, an empty mask, a LoRA that
# does not fit, non-finite latents) and, with data.on_error "continue", not the run. Anything else
# is a bug or the machine's (out of memory) and stops the run.
JOB_ERRORS = (UserError,)
NOT_CHECKED = object()  # `StylizePredictor.check_run` has not run yet


@dataclass
class PreparedJob:
    """A job ready to denoise: its inputs decoded, masks made, adapters and prompts set up."""

    job: Job
    pixel_settings: PixelSettings
    settings_hash: str
    content: Image.Image
    masks: list[Optional[torch.Tensor]]
    reference: Any  # Conditioning of the inversion prompt
    rows: list[StyleRows]
    style_images: list[Image.Image]  # the image styles' images at the content's size (StyleID)
    seconds: float = 0.0  # spent preparing
    trajectory: Optional[torch.Tensor] = None

    def denoise_job(self) -> DenoiseJob:
        return DenoiseJob(self.trajectory, self.reference, self.rows, id=self.job.id)


class StylizePredictor(LightningModule):
    """Stylize content images with style LoRAs (paper section III-C/D) for `diffstyler predict`.

    Args:
        model: the base model (default SD 2.1-base; `tiny` for smoke runs).
        injection: feature / attention injection switches, layers and step windows (LoRA styles: DiffStyler).
        styleid: StyleID's settings for image styles (a `data.styles` entry with `image` and no `lora`).
        sampling: steps, guidance, prompts, inversion sub-steps.
        segmenter: FastSAM weights and CLIP model for text / box / point masks.
        output: where and what to write.
        inversion_cache: folder for cached inversion trajectories (None: no cache).
        progress: show inner progress bars for inversion and denoising (the run has one bar of jobs).
        sweep: lists of injection settings: one labelled ablation grid per job instead of one result.
        max_unet_rows: cap on the batch rows of one UNet call (None: no cap); jobs of a chunk
            (`data.batch_size`) beyond it run in further calls.
        max_loaded_adapters: LoRAs kept loaded at once (least recently used deleted first).
        vae_tiling: for small GPUs (`memory`): the VAE in tiles (pixels change near tile borders of
            images larger than the VAE's sample size; recorded in the settings).
        vae_slicing: for small GPUs: the VAE one image at a time (same pixels).
        offload: for small GPUs: "model" / "sequential" / "group" / "group_leaf" keeps the weights in
            CPU memory, moving each model / layer / block (the next one prefetched) / layer
            (prefetched) to the GPU when it runs (same pixels; CUDA only); "none" keeps them there. A
            quantized transformer is `model.model.quantization` / `model.model.transformer`.
    """

    def __init__(
        self,
        model: ModelSpec = ModelSpec(),
        injection: InjectionConfig = InjectionConfig(),
        styleid: StyleIDConfig = StyleIDConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        segmenter: SegmenterConfig = SegmenterConfig(),
        output: OutputConfig = OutputConfig(),
        inversion_cache: Optional[str] = "outputs/cache/inversion",
        progress: bool = False,
        sweep: SweepConfig = SweepConfig(),
        max_unet_rows: Optional[int] = None,
        max_loaded_adapters: int = 16,
        vae_tiling: bool = False,
        vae_slicing: bool = False,
        offload: str = "none",
    ):
        super().__init__()
        if max_unet_rows is not None and max_unet_rows < 1:
            raise config_error("model.max_unet_rows", f"must be >= 1 or null (no cap), got {max_unet_rows}")
        if max_loaded_adapters < 1:
            raise config_error("model.max_loaded_adapters", f"must be >= 1, got {max_loaded_adapters}")
        self.model_spec = model
        self.injection = injection
        self.styleid = styleid
        self.sampling = sampling
        self.segmenter_config = segmenter
        self.output = output
        self.writer = StylizationWriter(output)
        self.inversion_cache = inversion_cache
        self.progress = progress
        self.sweep = sweep
        self.max_unet_rows = max_unet_rows
        self.max_loaded_adapters = max_loaded_adapters
        self.vae_tiling, self.vae_slicing = vae_tiling, vae_slicing
        self.offload = check_offload(offload, "model.offload")
        # Called after every denoising step with a `stylize.StepState` (observers: previews, tests).
        self.step_callback: Optional[StepCallback] = None
        self.pipeline: Optional[DiffStylerPipeline] = None
        check_injection_windows(injection, sweep, sampling.steps)
        self._checked_datamodule: Any = NOT_CHECKED

    def check_run(self, datamodule: Any) -> None:
        """Check, before the model loads, everything that is the same for every job, so that its
        error stops the run in one line instead of failing each job: the model reference, the
        inversion cache folder (the output folder: `StylizationWriter`), each LoRA of `data.styles`
        (made for this model family, every weight finite), FastSAM's weights and, for text prompts,
        the CLIP model. Then what differs per job where the files tell (`data.inputs`: its content
        decodes, its masks leave pixels to style, its boxes and points lie inside the content, a
        manifest row's LoRA fits): every job failing stops the run (one line per kind of failure),
        else the failing jobs are recorded as failed when the run starts and the others run. Runs
        once per data module; `setup` calls it, and the CLI earlier, before a multi-process run
        starts its processes."""
        if datamodule is self._checked_datamodule:
            return
        check_model_reference(self.model_spec)
        multiple = pixel_multiple_for(self.model_spec) if isinstance(datamodule, StylizeDataModule) else None
        if multiple and datamodule.resolution % multiple:
            raise config_error("data.resolution", f"must be a multiple of {multiple} for this model (a transformer reads "
                                                  f"2x2 latent cells as one token), got {datamodule.resolution}")
        if self.inversion_cache is not None:
            check_writable_folder(self.inversion_cache, "model.inversion_cache", "inversion cache folder")
        if isinstance(datamodule, StylizeDataModule):
            model = model_lora_width(self.model_spec)  # None: not known without a download
            loras = list(dict.fromkeys(Path(entry.lora) for entry in datamodule.styles if entry.lora is not None))
            for lora in loras:
                if model is not None:
                    check_lora_width(lora, model[1], model[0])
                check_lora_finite(lora)
            if datamodule.needs_segmenter():
                check_segmenter(self.segmenter_config, datamodule.needs_text_prompts())
            jobs = datamodule.jobs()
            failures = job_input_failures(jobs, model, [str(lora) for lora in loras], multiple=multiple or LATENT_FACTOR)
            datamodule.failed_up_front = jobs_that_run(jobs, failures, datamodule.on_error)
        self._checked_datamodule = datamodule

    def configure_model(self) -> None:
        if self.pipeline is not None:
            return
        self.pipeline = DiffStylerPipeline(load_pipeline(self.model_spec), self.model_spec, self.segmenter_config,
                                           self.inversion_cache, self.max_loaded_adapters, progress=self.progress)
        pipe, backbone = self.pipeline.pipe, self.pipeline.backbone
        if self.offload == "none":
            # Registered as submodules so that Lightning moves them to the device (SDXL and SD 3.5 have
            # several text encoders).
            self.denoiser, self.vae = backbone.denoiser, pipe.vae
            self.text_encoders = torch.nn.ModuleList(backbone.text_encoders)
        # Offloaded, they are not: Lightning would move every weight to the GPU (undoing the offload)
        # or fail on sequential offload's `meta` weights; the offload hooks place them instead.
        offload_device = self.trainer.strategy.root_device if self.offload != "none" and self._trainer is not None else None
        self.pipeline.set_memory_options(self.vae_tiling, self.vae_slicing, self.offload, offload_device)
        # The layer rules become this model's layer numbers (checked against it) and the windows
        # numbers of steps: what the run records.
        backbone.check_sampling(self.sampling.steps, self.sampling.inversion_solver)
        self.injection = self.pipeline.resolve_injection(self.injection, self.sampling.steps)
        self.styleid = self.pipeline.resolve_styleid(self.styleid)
        warn_about_ineffective_sites(self.injection, self.pipeline.layer_map, self.sampling.steps)

    def configure_callbacks(self) -> list[Any]:
        return [self.writer, PredictionLogger()]

    # -- Lightning ------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # Before `configure_model`: nothing is loaded yet.
        self.check_run(self.trainer.datamodule)
        check_offload_device(self.offload, self.trainer.strategy.root_device, "model.offload")
        check_quantization_device(self.model_spec.quantization, self.trainer.strategy.root_device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A predict run's state is its output folder (the finished files and results.jsonl), not
        the model: a checkpoint of it (Lightning's SLURM requeue on SIGUSR1 saves one) holds no
        weights, which would be gigabytes of what the model name already says, and no loop
        progress, which a rerun must not take for finished jobs."""
        checkpoint["state_dict"] = {}
        checkpoint.pop("loops", None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The requeued run resumes from that checkpoint (Lightning finds it under SLURM): the model
        # is the one `configure_model` loaded, whatever the checkpoint holds.
        checkpoint["state_dict"] = {}
        self.strict_loading = False

    def on_predict_start(self) -> None:
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, StylizeDataModule) and datamodule.needs_segmenter():
            import_ultralytics()

    def predict_step(self, batch: list[Job], batch_idx: int = 0) -> list[JobResult]:
        return self.stylize_jobs(batch)

    # -- jobs -----------------------------------------------------------------------------------

    def stylize_jobs(self, jobs: list[Job]) -> list[JobResult]:
        """Stylize a chunk of jobs: the finished ones are skipped, the rest prepared one by one,
        inverted together and denoised together in groups of one latent size (`max_unet_rows`).
        A job that fails with a user error fails alone. Returns one result per job, in order."""
        results: dict[str, JobResult] = {}
        prepared = []
        with self.pipeline.adapters.pinned():  # the chunk's adapters stay loaded until it is done
            for job in jobs:
                started = time.perf_counter()
                try:
                    job_prepared = self.prepare(job)
                except JOB_ERRORS as error:
                    results[job.id] = JobResult(job, FAILED, time.perf_counter() - started, error=error)
                    continue
                if job_prepared is None:
                    results[job.id] = JobResult(job, SKIPPED, time.perf_counter() - started)
                    continue
                prepared.append(job_prepared)
            inverting = time.perf_counter()
            self.add_trajectories(prepared)
            share = (time.perf_counter() - inverting) / max(1, len(prepared))
            for job in prepared:  # each job's share of the chunk's inversions, in its seconds
                job.seconds += share
            for group in self.groups(prepared):
                results.update((result.job.id, result) for result in self.stylize_group(group))
        return [results[job.id] for job in jobs]

    def prepare(self, job: Job) -> Optional[PreparedJob]:
        """Everything a job needs before denoising except its trajectory; None when it is done."""
        pixel_settings = self.pixel_settings(job)
        job_hash = pixel_settings.rerun_hash(sha256_file(job.content))
        if self.writer.is_done(job, job_hash):
            return None
        started = time.perf_counter()
        torch.manual_seed(job.seed)
        content = resize_to_multiple(load_image(job.content), job.resolution, self.pipeline.backbone.pixel_multiple)
        masks = [None if entry.mask is None else self.pipeline.make_mask(entry.mask, content) for entry in job.styles]
        reference, rows = self.pipeline.prepare_styles(job.styles, masks, content, self.sampling)
        return PreparedJob(job, pixel_settings, job_hash, content, masks, reference, rows, self.pipeline.images_of(job.styles, content),
                           seconds=time.perf_counter() - started)

    def add_trajectories(self, prepared: list[PreparedJob]) -> None:
        """Give every job its content's inversion trajectory and its image styles' (StyleID); an
        image shared by several jobs is inverted once, and missing images of one size together (at
        most `max_unet_rows` per call)."""
        if not prepared:
            return
        requests = [(job.pixel_settings.inversion_key(image), image) for job in prepared for image in (job.content, *job.style_images)]
        trajectories = iter(self.pipeline.trajectories(requests, prepared[0].reference, self.sampling, max_batch=self.max_unet_rows))
        for job in prepared:
            job.trajectory = next(trajectories)
            attach_style_trajectories(job.rows, [next(trajectories) for _ in job.style_images])

    def groups(self, prepared: list[PreparedJob]) -> list[list[PreparedJob]]:
        """Jobs of one latent size in the order given, at most `max_unet_rows` rows per UNet call
        (a job bigger than that runs alone); with a sweep, every job alone."""
        runs: dict[tuple[int, int], list[list[PreparedJob]]] = {}  # latent size -> its groups
        for job in prepared:
            groups = runs.setdefault((job.content.height, job.content.width), [[]])
            rows = sum(self._rows(other) for other in groups[-1]) + self._rows(job)
            over_cap = self.max_unet_rows is not None and rows > self.max_unet_rows
            if groups[-1] and (self.sweep.active or over_cap):
                groups.append([])
            groups[-1].append(job)
        return [group for groups in runs.values() for group in groups]

    def _rows(self, job: PreparedJob) -> int:
        backbone = self.pipeline.backbone
        methods = call_methods(backbone, self.injection, self.styleid, self.sampling.steps)
        denoise_job = job.denoise_job()
        latents = [denoise_job.trajectory[0:1]] * len(denoise_job.styles)
        return rows_per_job(denoise_job.rows(latents, methods), backbone.negative_rows(self.sampling.guidance_scale))

    def stylize_group(self, group: list[PreparedJob]) -> list[JobResult]:
        """Denoise and decode a group; when a user error fails the group, each job is run alone, so
        only the jobs that fail by themselves fail."""
        started = time.perf_counter()
        try:
            if self.sweep.active:  # `groups` gives a sweep one job per group
                grid, cells = self.sweep_grid(group[0])
                outputs = [([grid], {"Sweep cells": cells})]
            else:
                outputs = [(images, {}) for images in self.stylized(group, self.injection)]
        except JOB_ERRORS as error:
            if len(group) == 1:
                return [JobResult(group[0].job, FAILED, group[0].seconds, error=error)]
            return [result for job in group for result in self.stylize_group([job])]
        share = (time.perf_counter() - started) / len(group)
        return [
            JobResult(job.job, DONE, job.seconds + share, job.settings_hash, job.content, images, job.masks,
                      {**self.settings(job), **extra}, sweep=self.sweep.active)
            for job, (images, extra) in zip(group, outputs)
        ]

    def stylized(self, group: list[PreparedJob], injection: InjectionConfig) -> list[list[Image.Image]]:
        """Each job's images: one per style without masks; the fused, composited image with masks."""
        jobs = [job.denoise_job() for job in group]
        latents = self.pipeline.denoise(jobs, injection, self.sampling, self.step_callback, self.styleid)
        images = []
        for prepared, job, job_latents in zip(group, jobs, latents):
            styles, fused = self.pipeline.finish(job, job_latents, prepared.content, prepared.masks, self.output.composite, per_style=False)
            images.append(styles if fused is None else [fused])
        return images

    def sweep_grid(self, job: PreparedJob) -> tuple[Image.Image, list[dict[str, Any]]]:
        """One labelled grid of the job's result under every setting of `sweep` (same inversion),
        and each cell's settings with its Content SSIM."""
        if len(job.job.files.results) != 1:
            raise UserError("cannot sweep", "model.sweep",
                            "a sweep makes one grid of one image per setting: give one style, or masks for every style")
        torch.manual_seed(job.job.seed)
        return ablation_grid(self.sweep, self.injection, lambda injection: self.stylized([job], injection)[0][0],
                             lambda image: content_ssim(job.content, image))

    def settings(self, job: PreparedJob) -> dict[str, Any]:
        """What the job's PNGs and results.jsonl record."""
        return job.pixel_settings.recorded(job.content.size, job.job.content, job.job.id)

    def pixel_settings(self, job: Job) -> PixelSettings:
        """Every setting that changes the pixels of this job's outputs (`provenance`)."""
        return self.pipeline.pixel_settings(job.styles, self.sampling, self.injection, job.seed, job.resolution,
                                            self.output.composite, self.styleid, asdict(self.sweep) if self.sweep.active else None)

    def settings_hash(self, job: Job) -> str:
        """The hash of everything that changes the pixels of this job's outputs (files by content,
        not by path), stored in each PNG: a rerun keeps a file only when it matches."""
        return self.pixel_settings(job).rerun_hash(sha256_file(job.content))


def import_ultralytics() -> None:
    """Import ultralytics now, on every process at this same point of the run.

    Its import (the settings file) waits in `torch.distributed.barrier()` on every process of a
    DDP run. Imported lazily at a process's first FastSAM mask, it would hang every run where some
    process has no such job (one job on two processes; a resumed run whose jobs there are done).
    """
    import ultralytics  # noqa: F401


def check_injection_windows(injection: InjectionConfig, sweep: SweepConfig, steps: int) -> None:
    """The injection windows, and the swept ones, fit in the sampling's `steps`."""
    check_injection_window(injection, steps)
    for key, values in sweep.axes():
        if key in INJECTION_WINDOWS:
            for window in values:
                check_window_steps(window, steps, f"model.sweep.{key}")


def warn_about_ineffective_sites(injection: InjectionConfig, layers: LayerMap, steps: int) -> None:
    """Warn once, when the model is loaded, when the injection settings make configured layers irrelevant."""
    message = describe_ineffective_sites(injection, layers, steps)
    if message:
        rank_zero_warn(message)
