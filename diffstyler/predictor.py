"""`StylizePredictor`: DiffStyler stylization as a LightningModule run by Lightning's predict loop.

Per job (see `data.jobs`): load the content, DDIM-invert it with the base model (cached), load each
style's LoRA as a named adapter of the ONE UNet, resolve masks, denoise with cross-LoRA injection
(`stylize.denoise_with_injection`), decode, composite, and write PNGs with their settings.
Outputs are written once: a job whose outputs are all finished and made with the current settings
(`results.job_is_done`) is skipped unless `overwrite` is set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torchmetrics.functional.image import structural_similarity_index_measure

from diffstyler.data.jobs import StyleEntry, chunked
from diffstyler.errors import UserError, config_error, first_line
from diffstyler.checks import check_writable_folder
from diffstyler.images import load_image, resize_to_multiple_of_8, sha256_file, to_tensor
from diffstyler.injection import InjectionConfig, describe_ineffective_sites
from diffstyler.inversion import InversionCache, InversionKey, invert_batch
from diffstyler.lora import (
    BASE_ROW,
    encode_prompts_per_adapter,
    load_style_adapter,
    set_adapter_scales,
    set_text_encoder_scales,
)
from diffstyler.masks import FastSAMSegmenter, MaskError, SegmenterConfig, mask_to_latent, resolve_mask, save_mask_png
from diffstyler.models import ModelLoadError, ModelSpec, decode_latents, encode_images, load_pipeline
from diffstyler.outputs import SETTINGS_HASH_KEY, image_grid, path_inside, pil_to_unit, save_result, to_pil
from diffstyler.results import DONE, FAILED, SKIPPED, ResultsLog, job_is_done, merge_results, settings_hash
from diffstyler.sampling import ddim_schedule
from diffstyler.sweep import SweepConfig, labelled_grid, sweep_cells
from diffstyler.stylize import (
    DenoiseJob,
    SamplingConfig,
    StepCallback,
    StyleRows,
    check_finite,
    denoise_jobs,
    fuse_styles,
    unet_rows,
)

log = logging.getLogger(__name__)

# What fails one job (its input: an unreadable image, an empty mask, a LoRA that does not fit,
# non-finite latents) and, with data.on_error "continue", not the run. Anything else is a bug or
# the machine's (out of memory) and stops the run.
JOB_ERRORS = (UserError, FileNotFoundError, MaskError, ModelLoadError)
RECENT_TRAJECTORIES = 8  # inversion trajectories kept in memory (a few MB each at 512 px)
MAX_EMBEDDINGS = 1024  # (prompt, adapter) text embeddings kept (300 KB each for SD 2.1)


@dataclass
class PreparedJob:
    """A job ready to denoise: its inputs decoded, masks resolved, adapters and prompts set up."""

    job: dict[str, Any]
    styles: list[StyleEntry]
    paths: dict[str, Any]
    job_hash: str
    content: Image.Image
    masks: list[Optional[torch.Tensor]]
    reference_embedding: torch.Tensor
    rows: list[StyleRows]
    seconds: float = 0.0  # spent preparing
    trajectory: Optional[torch.Tensor] = None



@dataclass
class OutputConfig:
    """What is written per job into `folder`.

    grid: also write `<name>_grid.png` (content | style images | results | masks).
    composite: with masks, paste the result into the content with the feathered full-resolution
      mask, so pixels outside the masks are the content's, bit for bit.
    overwrite: redo every job (default: skip jobs whose outputs are finished and carry the current
      settings hash, so a rerun resumes; see `diffstyler.results`).
    """

    folder: str = "outputs/stylized"
    grid: bool = True
    composite: bool = True
    overwrite: bool = False


@contextlib.contextmanager
def base_model(unet) -> Iterator[None]:
    """Run the UNet without any LoRA adapter inside the block."""
    has_adapters = bool(getattr(unet, "peft_config", None))
    if has_adapters:
        unet.disable_adapters()
    try:
        yield
    finally:
        if has_adapters:
            unet.enable_adapters()


class StylizePredictor(LightningModule):
    """Stylize content images with style LoRAs (paper section III-C/D).

    Args:
        model: the base model (default SD 2.1-base; `tiny` for smoke runs).
        injection: feature / attention injection switches, layers and step windows.
        sampling: steps, guidance, prompts, inversion sub-steps.
        segmenter: FastSAM weights and CLIP model for text / box / point masks.
        output: where and what to write.
        inversion_cache: folder for cached inversion trajectories (None: no cache).
        progress: show inner progress bars for inversion and denoising (the run has one bar of jobs).
        max_unet_rows: cap on the batch rows of one UNet call (None: no cap); jobs of a chunk
          (`data.batch_size`) beyond it run in further calls.
        max_loaded_adapters: LoRAs kept loaded at once (least recently used deleted first).
    """

    def __init__(
        self,
        model: ModelSpec = ModelSpec(),
        injection: InjectionConfig = InjectionConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        segmenter: SegmenterConfig = SegmenterConfig(),
        output: OutputConfig = OutputConfig(),
        inversion_cache: Optional[str] = "outputs/cache/inversion",
        progress: bool = False,
        sweep: SweepConfig = SweepConfig(),
        max_unet_rows: Optional[int] = None,
        max_loaded_adapters: int = 16,
    ):
        super().__init__()
        self.model_spec = model
        self.injection = injection
        self.sampling = sampling
        self.segmenter_config = segmenter
        self.output = output
        check_writable_folder(output.folder, "model.output.folder")  # now, not after the first job's work
        self.cache = InversionCache(inversion_cache) if inversion_cache else None
        self.progress = progress
        self.sweep = sweep
        # Called after every denoising step with a `stylize.StepState` (observers: previews, tests).
        self.step_callback: Optional[StepCallback] = None
        warn_about_ineffective_sites(injection)
        if max_unet_rows is not None and max_unet_rows < 1:
            raise config_error("model.max_unet_rows", f"must be >= 1 or null (no cap), got {max_unet_rows}")
        if max_loaded_adapters < 1:
            raise config_error("model.max_loaded_adapters", f"must be >= 1, got {max_loaded_adapters}")
        self.max_unet_rows = max_unet_rows
        self.max_loaded_adapters = max_loaded_adapters
        self.pipe = None
        self._adapters: OrderedDict[tuple[str, float], str] = OrderedDict()  # (LoRA, scale) -> adapter, LRU order
        self._adapter_scales: dict[str, float] = {}
        self._adapters_loaded = 0
        self._embeddings: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()  # (prompt, adapter) -> [1, 77, d]
        self._recent_trajectories: OrderedDict[InversionKey, torch.Tensor] = OrderedDict()
        self._segmenter: Optional[FastSAMSegmenter] = None
        # this process's job counts and failures in the current predict run, and its results log
        self.counts: dict[str, int] = {DONE: 0, SKIPPED: 0, FAILED: 0}
        self.failures: list[str] = []
        self.summary: dict[str, int] = {}
        # "continue": a failing job is recorded and the others go on (the data module's `on_error`
        # in a predict run); "stop": it is raised
        self.on_error = "stop"
        self._results_log: Optional[ResultsLog] = None

    def configure_model(self) -> None:
        if self.pipe is not None:
            return
        self.pipe = load_pipeline(self.model_spec)
        # Registered as submodules so that Lightning moves them to the device.
        self.unet, self.vae, self.text_encoder = self.pipe.unet, self.pipe.vae, self.pipe.text_encoder
        self.requires_grad_(False)

    # -- Lightning ------------------------------------------------------------------------------

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int = 0) -> list[dict[str, Any]]:
        return self.stylize_jobs(batch)

    def on_predict_start(self) -> None:
        datamodule = self.trainer.datamodule
        if getattr(datamodule, "needs_segmenter", lambda: False)():
            import_ultralytics()
        self.on_error = getattr(datamodule, "on_error", "stop")
        self.counts = {DONE: 0, SKIPPED: 0, FAILED: 0}
        self.failures = []
        self._results_log = ResultsLog(self.output.folder)

    def on_predict_end(self) -> None:
        """Sum the job counts of every process; rank zero merges results.jsonl and says how many
        jobs were skipped. `self.summary` is the whole run's counts on every process."""
        counts = torch.tensor([self.counts[DONE], self.counts[SKIPPED], self.counts[FAILED]], device=self.device)
        total = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self.summary = dict(zip((DONE, SKIPPED, FAILED), (int(n) for n in total)))
        self.trainer.strategy.barrier("results")
        job_ids = getattr(self.trainer.datamodule, "job_ids", None)
        if self.trainer.is_global_zero and job_ids is not None:
            merge_results(self.output.folder, job_ids())
        skipped = self.summary[SKIPPED]
        if skipped:
            rank_zero_info(f"{skipped} job{'' if skipped == 1 else 's'} already done, skipped")

    # -- jobs -----------------------------------------------------------------------------------

    def stylize_jobs(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Stylize a chunk of jobs: the finished ones are skipped, the rest prepared one by one,
        inverted together and denoised together in groups of one latent size (`max_unet_rows`).
        A job that fails with a user error is recorded (results.jsonl) and, with `on_error`
        "continue", the others go on. Returns one result per job, in order."""
        results: dict[str, dict[str, Any]] = {}
        prepared = []
        in_use: set[str] = set()  # adapters the chunk's prepared jobs need: never evicted meanwhile
        for job in jobs:
            started = time.perf_counter()
            try:
                job_prepared = self._prepare(job, in_use)
            except JOB_ERRORS as error:
                results[job["id"]] = self._finish(job, FAILED, started, error=error)
                continue
            if job_prepared is None:
                results[job["id"]] = self._finish(job, SKIPPED, started, outputs=self._output_paths(job)["results"])
                continue
            prepared.append(job_prepared)
        self._add_trajectories(prepared)
        for group in self._groups(prepared):
            for result in self._stylize_group(group):
                results[result["id"]] = result
        return [results[job["id"]] for job in jobs]

    def stylize_job(self, job: dict[str, Any]) -> dict[str, Any]:
        """`stylize_jobs` of one job."""
        return self.stylize_jobs([job])[0]

    def _finish(self, job: dict[str, Any], status: str, started: float, outputs=(), error: Optional[BaseException] = None,
                seconds: Optional[float] = None) -> dict[str, Any]:
        """Count and record a job's end; with `on_error` "stop" a failure is raised again.

        The result's `outputs` are paths; in results.jsonl they are relative to the output folder.
        """
        line = first_line(error) if error is not None else None  # a UserError's str is its one line
        result = {
            "id": job["id"],
            "content": job["content"],
            "styles": [style.get("name") for style in job["styles"]],
            "loras": [style.get("lora") for style in job["styles"]],
            "outputs": [str(path) for path in outputs],
            "status": status,
            "seconds": round(seconds if seconds is not None else time.perf_counter() - started, 3),
            "error": line,
        }
        if error is not None and self.on_error == "stop":
            raise error  # the run's one error line; nothing of the job is written
        self.counts[status] += 1
        if self._results_log is not None:
            self._results_log.record({**result, "outputs": [self._relative_to_folder(p) for p in outputs]})
        if error is not None:
            self.failures.append(f"{job['where']}: {line}")
            log.warning("job %s failed (%s): %s", job["id"], job["where"], line)
        return {**result, "skipped": status == SKIPPED}

    def _relative_to_folder(self, path: Path) -> str:
        """An output as a posix path relative to the output folder (results.jsonl travels with it)."""
        return Path(path).relative_to(Path(self.output.folder).resolve()).as_posix()

    def _prepare(self, job: dict[str, Any], in_use: set[str]) -> Optional["PreparedJob"]:
        """Everything a job needs before denoising except its trajectory; None when it is done."""
        styles = [StyleEntry.from_dict(s) for s in job["styles"]]
        paths = self._output_paths(job)
        job_hash = self._settings_hash(job, styles)
        if not self.output.overwrite and job_is_done(every_path(paths), job_hash):
            return None
        started = time.perf_counter()
        torch.manual_seed(job["seed"])
        content = resize_to_multiple_of_8(load_image(job["content"]), job["resolution"])
        masks = [self._mask(entry, content, path, job_hash) for entry, path in zip(styles, paths["masks"])]
        reference_embedding, rows = self._style_rows(styles, masks, content, in_use)
        return PreparedJob(job, styles, paths, job_hash, content, masks, reference_embedding, rows,
                           seconds=time.perf_counter() - started)

    def _groups(self, prepared: list["PreparedJob"]) -> list[list["PreparedJob"]]:
        """Jobs of one latent size in the order given, at most `max_unet_rows` rows per UNet call
        (a job bigger than that runs alone); with a sweep, every job alone."""
        runs: dict[tuple[int, int], list[list[PreparedJob]]] = {}  # latent size -> its groups
        for job in prepared:
            groups = runs.setdefault((job.content.height, job.content.width), [[]])
            rows = sum(self._unet_rows(other) for other in groups[-1]) + self._unet_rows(job)
            over_cap = self.max_unet_rows is not None and rows > self.max_unet_rows
            if groups[-1] and (self.sweep.active or over_cap):
                groups.append([])
            groups[-1].append(job)
        return [group for groups in runs.values() for group in groups]

    def _unet_rows(self, job: "PreparedJob") -> int:
        return unet_rows(len(job.rows), self.injection.reference_model, self.sampling.uses_uncond)

    def _stylize_group(self, group: list["PreparedJob"]) -> list[dict[str, Any]]:
        """Denoise, decode and write a group; when a user error fails the group, each job is run
        alone, so only the jobs that fail by themselves are recorded as failed."""
        started = time.perf_counter()
        try:
            written = self._denoised_and_written(group)
        except JOB_ERRORS as error:
            if len(group) == 1:
                return [self._finish(group[0].job, FAILED, started, error=error, seconds=group[0].seconds)]
            return [result for job in group for result in self._stylize_group([job])]
        share = (time.perf_counter() - started) / len(group)
        return [
            self._finish(job.job, DONE, started, outputs=paths, seconds=job.seconds + share)
            for job, paths in zip(group, written)
        ]

    def _denoised_and_written(self, group: list["PreparedJob"]) -> list[list[Path]]:
        adapters = {row.adapter for job in group for row in job.rows}
        set_adapter_scales(self.pipe.unet, {name: self._adapter_scales[name] for name in sorted(adapters)})
        schedule = ddim_schedule(self.pipe.scheduler, self.sampling.steps)

        def stylized(injection: InjectionConfig) -> list[list[Image.Image]]:
            denoise = [DenoiseJob(j.trajectory, j.reference_embedding, j.rows, id=j.job["id"]) for j in group]
            with torch.no_grad():
                latents = denoise_jobs(self.pipe.unet, denoise, schedule, injection, self.sampling,
                                       callback=self.step_callback, progress=self.progress)
            return [self._decode(job_latents, j.rows, j.trajectory, j.content, j.masks) for job_latents, j in zip(latents, group)]

        if self.sweep.active:  # `_groups` gives a sweep one job per group
            job = group[0]
            torch.manual_seed(job.job["seed"])
            settings = self._settings(job.job, job.styles, job.content)
            grid, settings["Sweep cells"] = self._ablation_grid(lambda injection: stylized(injection)[0], job.content, job.paths)
            return [self._write(job.styles, [grid], job.paths, job.content, job.masks, settings, job.job_hash)]
        return [
            self._write(job.styles, images, job.paths, job.content, job.masks,
                        self._settings(job.job, job.styles, job.content), job.job_hash)
            for job, images in zip(group, stylized(self.injection))
        ]

    def _ablation_grid(self, stylized, content: Image.Image, paths: dict[str, Any]) -> tuple[Image.Image, list[dict]]:
        """One labelled grid of the job's result under every setting of `sweep` (same inversion),
        and each cell's settings with its Content SSIM."""
        if len(paths["results"]) != 1:
            raise UserError("cannot sweep", "model.sweep",
                            "a sweep makes one grid of one image per setting: give one style, or masks for every style")
        cells = sweep_cells(self.sweep, self.injection)
        images = [stylized(cell.injection)[0] for cell in cells]
        summaries = [
            {**cell.settings, "Content SSIM": round(content_ssim(content, image), 4)} for cell, image in zip(cells, images)
        ]
        return labelled_grid(cells, images), summaries

    def _output_paths(self, job: dict[str, Any]) -> dict[str, Any]:
        """The job's files (named by `data.jobs.job_output_files`) in the output folder, each checked
        to lie inside it: results, grid (None without `output.grid`), masks (None per unmasked style)."""
        files = job["files"]
        return {
            "results": [self._output_path(name) for name in files["results"]],
            "grid": self._output_path(files["grid"]) if self.output.grid else None,
            "masks": [self._output_path(name) if name else None for name in files["masks"]],
        }

    def _output_path(self, name: str) -> Path:
        return path_inside(self.output.folder, name, "model.output.folder")

    def _inversion_key(self, job: "PreparedJob") -> InversionKey:
        return InversionKey(
            image_sha256=sha256_file(job.job["content"]),
            # every field that changes the weights or the schedule (single-file config, prediction type)
            model=json.dumps({k: v for k, v in asdict(self.model_spec).items() if k != "dtype"}, sort_keys=True),
            height=job.content.height,
            width=job.content.width,
            steps=self.sampling.steps,
            substeps=self.sampling.inversion_substeps,
            prompt=self.sampling.inversion_prompt,
            dtype=str(self.pipe.unet.dtype),
        )

    def _add_trajectories(self, prepared: list["PreparedJob"]) -> None:
        """Give every job its content's inversion trajectory (inversion prompt, base model): from
        memory (the last contents), the disk cache, or by inverting the missing contents together,
        several of one size per UNet call. A content shared by several jobs is inverted once."""
        unet = self.pipe.unet
        schedule = ddim_schedule(self.pipe.scheduler, self.sampling.steps)
        missing: dict[InversionKey, list[PreparedJob]] = {}
        for job in prepared:
            key = self._inversion_key(job)
            trajectory = self._recent_trajectories.get(key)
            if trajectory is None and self.cache is not None:
                shape = (schedule.num_steps + 1, unet.config.in_channels, *self._latent_size(job.content))
                cached = self.cache.load(key, shape)  # None also for a broken file: recomputed
                trajectory = None if cached is None else cached.to(unet.device, unet.dtype)
            if trajectory is None:
                missing.setdefault(key, []).append(job)
            else:
                self._remember_trajectory(key, trajectory)
                job.trajectory = trajectory
        by_size: dict[tuple[int, int], list[InversionKey]] = {}
        for key in missing:
            by_size.setdefault((key.height, key.width), []).append(key)
        for keys in by_size.values():
            for batch in chunked(keys, self.max_unet_rows or len(keys)):
                for key, trajectory in zip(batch, self._inverted([missing[k][0] for k in batch], schedule)):
                    if self.cache:
                        self.cache.save(key, trajectory)
                    self._remember_trajectory(key, trajectory)
                    for job in missing[key]:
                        job.trajectory = trajectory

    def _inverted(self, jobs: list["PreparedJob"], schedule) -> list[torch.Tensor]:
        unet = self.pipe.unet
        pixels = torch.stack([to_tensor(job.content) for job in jobs])
        latents = encode_images(self.pipe, pixels).to(unet.dtype)
        with base_model(unet):
            return invert_batch(unet, latents, jobs[0].reference_embedding, schedule,
                                self.sampling.inversion_substeps, progress=self.progress)

    def _remember_trajectory(self, key: InversionKey, trajectory: torch.Tensor) -> None:
        """Keep the last few trajectories in memory: a content's jobs in the next chunk reuse it
        without the disk cache (or when there is none)."""
        self._recent_trajectories[key] = trajectory
        self._recent_trajectories.move_to_end(key)
        while len(self._recent_trajectories) > RECENT_TRAJECTORIES:
            self._recent_trajectories.popitem(last=False)

    def _latent_size(self, content: Image.Image) -> tuple[int, int]:
        return content.height // self.pipe.vae_scale_factor, content.width // self.pipe.vae_scale_factor

    def _mask(self, entry: StyleEntry, content: Image.Image, path: Optional[Path], job_hash: str) -> Optional[torch.Tensor]:
        if entry.mask is None:
            return None
        mask = resolve_mask(entry.mask, content, self._segmenter_factory)
        save_mask_png(mask, path, {SETTINGS_HASH_KEY: job_hash})
        return mask

    def _segmenter_factory(self) -> FastSAMSegmenter:
        if self._segmenter is None:
            self._segmenter = FastSAMSegmenter(self.segmenter_config)
        return self._segmenter

    def adapter_for(self, entry: StyleEntry, in_use: Optional[set[str]] = None) -> str:
        """The named adapter holding this LoRA at this scale, loaded on first use. At most
        `max_loaded_adapters` stay loaded: the least recently used one not in `in_use` goes first."""
        key = (entry.lora, float(entry.scale))
        in_use = set() if in_use is None else in_use
        if key in self._adapters:
            self._adapters.move_to_end(key)
        else:
            self._evict_adapters(in_use)
            name = f"style{self._adapters_loaded}"  # never reused, so cached embeddings stay right
            self._adapters_loaded += 1
            load_style_adapter(self.pipe, entry.lora, name)
            self._adapters[key] = name
            self._adapter_scales[name] = float(entry.scale)
        in_use.add(self._adapters[key])
        return self._adapters[key]

    def _evict_adapters(self, in_use: set[str]) -> None:
        """Make room for one more adapter by deleting the least recently used ones not in use."""
        for key, name in list(self._adapters.items()):
            if len(self._adapters) < self.max_loaded_adapters:
                return
            if name in in_use:
                continue
            self.pipe.delete_adapters(name)
            del self._adapters[key], self._adapter_scales[name]
            self._embeddings = OrderedDict((k, v) for k, v in self._embeddings.items() if k[1] != name)

    def _style_rows(self, styles: list[StyleEntry], masks: list, content: Image.Image,
                    in_use: Optional[set[str]] = None) -> tuple[torch.Tensor, list[StyleRows]]:
        """The reference (inversion) prompt's embedding and each style's adapter, prompts and latent mask.

        The reference prompt is encoded with the base model, style k's prompt and negative prompt
        with style k's text-encoder LoRA where it has one (`prompt_embeddings`).
        """
        names = [self.adapter_for(entry, in_use) for entry in styles]
        prompts, adapters = [self.sampling.inversion_prompt], [BASE_ROW]
        for name, entry in zip(names, styles):
            prompts += [entry.prompt, self.sampling.negative_prompt]
            adapters += [name, name]
        embeddings = self.prompt_embeddings(prompts, adapters)
        device, dtype = self.pipe.unet.device, self.pipe.unet.dtype
        latent_hw = self._latent_size(content)
        rows = []
        for k, (name, mask) in enumerate(zip(names, masks)):
            latent_mask = None
            if mask is not None:
                latent_mask = mask_to_latent(mask, latent_hw)[None, None].to(device, dtype)
            cond, uncond = embeddings[1 + 2 * k : 2 + 2 * k], embeddings[2 + 2 * k : 3 + 2 * k]
            rows.append(StyleRows(name, cond, uncond, latent_mask, name=styles[k].name))
        return embeddings[:1], rows

    def prompt_embeddings(self, prompts: list[str], adapters: list[str]) -> torch.Tensor:
        """Text embeddings of (prompt, adapter) pairs, remembered for the run: the prompts a
        dataset repeats (the inversion and negative prompts, each style's) are encoded once.
        The missing ones are encoded in one text-encoder batch."""
        keys = list(zip(prompts, adapters))
        missing = list(dict.fromkeys(key for key in keys if key not in self._embeddings))
        if missing:
            loaded = sorted({a for _, a in missing if a != BASE_ROW})
            set_text_encoder_scales(self.pipe.text_encoder, {name: self._adapter_scales[name] for name in loaded})
            encoded = encode_prompts_per_adapter(self.pipe, [p for p, _ in missing], [a for _, a in missing])
            for key, embedding in zip(missing, encoded.split(1)):
                self._embeddings[key] = embedding
        embeddings = torch.cat([self._embeddings[key] for key in keys])
        for key in keys:
            self._embeddings.move_to_end(key)
        while len(self._embeddings) > MAX_EMBEDDINGS:
            self._embeddings.popitem(last=False)
        return embeddings

    def _decode(self, latents, rows, trajectory, content, masks) -> list[Image.Image]:
        if masks[0] is None:
            return [self._decoded_image(latent, row.label) for latent, row in zip(latents, rows)]
        fused = fuse_styles(latents, [r.mask for r in rows], trajectory[-1:])
        result = self._decoded_image(fused, " + ".join(row.label for row in rows))
        if self.output.composite:
            result = composite_in_pixels(content, result, masks)
        return [result]

    def _decoded_image(self, latent: torch.Tensor, style: str) -> Image.Image:
        """The decoded image; NaN or inf left after decoding (fp16 VAEs retry in float32) fail the job."""
        pixels = decode_latents(self.pipe, latent)
        check_finite(pixels, style, what="decoded image")
        return to_pil(pixels)

    def _settings(self, job: dict[str, Any], styles: list[StyleEntry], content: Image.Image) -> dict[str, Any]:
        return {
            "Steps": self.sampling.steps,
            "Sampler": "DDIM",
            "CFG scale": self.sampling.guidance_scale,
            "Seed": job["seed"],
            "Size": f"{content.width}x{content.height}",
            "Model": self.model_spec.name,
            "Content": job["content"],
            "Job": job["id"],
            "Styles": [
                {**asdict(e), "lora_sha256": sha256_file(e.lora)} for e in styles
            ],
            "Injection": asdict(self.injection),
            **({"Sweep": asdict(self.sweep)} if self.sweep.active else {}),
            "Sampling": asdict(self.sampling),
            "Composite": self.output.composite,
        }

    def _settings_hash(self, job: dict[str, Any], styles: list[StyleEntry]) -> str:
        """The hash of everything that changes the pixels of this job's outputs (files by content,
        not by path), stored in each PNG: a rerun keeps a file only when it matches."""
        has_masks = styles[0].mask is not None
        return settings_hash({
            "model": asdict(self.model_spec),
            "dtype": str(self.pipe.unet.dtype),
            "sampling": asdict(self.sampling),
            "injection": asdict(self.injection),
            "sweep": asdict(self.sweep) if self.sweep.active else None,
            "segmenter": asdict(self.segmenter_config) if has_masks else None,
            "composite": self.output.composite if has_masks else None,
            "seed": job["seed"],
            "resolution": job["resolution"],
            "content_sha256": sha256_file(job["content"]),
            "styles": [style_fingerprint(entry) for entry in styles],
        })

    def _write(self, styles, images, paths, content, masks, settings, job_hash) -> list[Path]:
        prompt = " | ".join(e.prompt for e in styles)
        # An ablation grid has one similarity per cell, already in its settings.
        written = [
            save_result(image, path, prompt, self.sampling.negative_prompt,
                        settings if self.sweep.active else {**settings, "Content SSIM": round(content_ssim(content, image), 4)},
                        job_hash)
            for image, path in zip(images, paths["results"])
        ]
        if paths["grid"] is not None:
            extras = [load_image(e.image) for e in styles if e.image]
            mask_tiles = [to_pil(m[None].expand(3, -1, -1)) for m in masks if m is not None]
            grid = image_grid([content, *extras, *images, *mask_tiles], height=content.height)
            save_result(grid, paths["grid"], prompt, self.sampling.negative_prompt, settings, job_hash)
        return written


def import_ultralytics() -> None:
    """Import ultralytics now, on every process at this same point of the run.

    Its import (the settings file) waits in `torch.distributed.barrier()` on every process of a
    DDP run. Imported lazily at a process's first FastSAM mask, it would hang every run where some
    process has no such job (one job on two processes; a resumed run whose jobs there are done).
    """
    import ultralytics  # noqa: F401


def warn_about_ineffective_sites(injection: InjectionConfig) -> None:
    """Warn once, at config time, when the injection settings make configured layers irrelevant."""
    message = describe_ineffective_sites(injection)
    if message:
        rank_zero_warn(message)


def every_path(paths: dict[str, Any]) -> list[Path]:
    """All files of `StylizePredictor._output_paths`: results, then the grid and masks when written."""
    return [*paths["results"], *(path for path in [paths["grid"], *paths["masks"]] if path is not None)]


def style_fingerprint(entry: StyleEntry) -> dict[str, Any]:
    """What of a style entry changes the pixels, with files (LoRA, mask file, style image) by sha256."""
    mask = None
    if entry.mask is not None:
        mask = {**asdict(entry.mask), "file_sha256": sha256_file(entry.mask.file) if entry.mask.file else None}
    return {
        "prompt": entry.prompt,
        "scale": float(entry.scale),
        "lora_sha256": sha256_file(entry.lora),
        "mask": mask,
        "image_sha256": sha256_file(entry.image) if entry.image else None,
    }


def content_ssim(content: Image.Image, result: Image.Image) -> float:
    """Structural similarity of the result to the content (1 = same structure), via torchmetrics."""
    return float(structural_similarity_index_measure(pil_to_unit(result)[None], pil_to_unit(content)[None], data_range=1.0))


def composite_in_pixels(content: Image.Image, result: Image.Image, masks: list[torch.Tensor]) -> Image.Image:
    """Blend the result into the content by the union of the soft masks.

    Where every mask is exactly 0 the content's 8-bit values are copied, so those pixels are
    bit-identical to the content.
    """
    weight = torch.stack([m.float() for m in masks]).amax(0)
    content_unit, result_unit = pil_to_unit(content), pil_to_unit(result)
    blended = to_pil(weight * result_unit + (1 - weight) * content_unit)
    outside = (weight == 0).numpy()
    blended_array = np.array(blended)
    blended_array[outside] = np.array(content.convert("RGB"))[outside]
    return Image.fromarray(blended_array)
