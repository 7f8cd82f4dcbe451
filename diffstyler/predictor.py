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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torchmetrics.functional.image import structural_similarity_index_measure

from diffstyler.data.jobs import StyleEntry
from diffstyler.errors import UserError
from diffstyler.checks import check_writable_folder
from diffstyler.images import load_image, resize_to_multiple_of_8, sha256_file, to_tensor
from diffstyler.injection import InjectionConfig, describe_ineffective_sites
from diffstyler.inversion import InversionCache, InversionKey, invert
from diffstyler.lora import (
    BASE_ROW,
    encode_prompts_per_adapter,
    load_style_adapter,
    set_adapter_scales,
    set_text_encoder_scales,
)
from diffstyler.masks import FastSAMSegmenter, SegmenterConfig, mask_to_latent, resolve_mask, save_mask_png
from diffstyler.models import ModelSpec, decode_latents, encode_images, load_pipeline
from diffstyler.outputs import SETTINGS_HASH_KEY, image_grid, path_inside, pil_to_unit, save_result, to_pil
from diffstyler.results import job_is_done, settings_hash
from diffstyler.sampling import ddim_schedule
from diffstyler.sweep import SweepConfig, labelled_grid, sweep_cells
from diffstyler.stylize import SamplingConfig, StepCallback, StyleRows, check_finite, denoise_with_injection, fuse_styles


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
        progress: show progress bars for inversion and denoising.
    """

    def __init__(
        self,
        model: ModelSpec = ModelSpec(),
        injection: InjectionConfig = InjectionConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        segmenter: SegmenterConfig = SegmenterConfig(),
        output: OutputConfig = OutputConfig(),
        inversion_cache: Optional[str] = "outputs/cache/inversion",
        progress: bool = True,
        sweep: SweepConfig = SweepConfig(),
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
        self.pipe = None
        self._adapters: dict[tuple[str, float], str] = {}
        self._segmenter: Optional[FastSAMSegmenter] = None
        self._skipped_jobs = 0  # jobs found already done in this predict run, for `on_predict_end`

    def configure_model(self) -> None:
        if self.pipe is not None:
            return
        self.pipe = load_pipeline(self.model_spec)
        # Registered as submodules so that Lightning moves them to the device.
        self.unet, self.vae, self.text_encoder = self.pipe.unet, self.pipe.vae, self.pipe.text_encoder
        self.requires_grad_(False)

    # -- Lightning ------------------------------------------------------------------------------

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int = 0) -> list[dict[str, Any]]:
        return [self.stylize_job(job) for job in batch]

    def on_predict_start(self) -> None:
        self._skipped_jobs = 0

    def on_predict_end(self) -> None:
        """Say once (rank zero) how many jobs were already done, summed over all processes."""
        count = torch.tensor(self._skipped_jobs, device=self.device)
        skipped = int(self.trainer.strategy.reduce(count, reduce_op="sum"))
        if skipped:
            rank_zero_info(f"{skipped} job{'' if skipped == 1 else 's'} already done, skipped")

    # -- one job ------------------------------------------------------------------------------

    def stylize_job(self, job: dict[str, Any]) -> dict[str, Any]:
        styles = [StyleEntry.from_dict(s) for s in job["styles"]]
        paths = self._output_paths(job)
        job_hash = self._settings_hash(job, styles)
        if not self.output.overwrite and job_is_done(every_path(paths), job_hash):
            self._skipped_jobs += 1
            return {"id": job["id"], "skipped": True, "outputs": [str(p) for p in paths["results"]]}
        torch.manual_seed(job["seed"])

        content = resize_to_multiple_of_8(load_image(job["content"]), job["resolution"])
        schedule = ddim_schedule(self.pipe.scheduler, self.sampling.steps)
        masks = [self._mask(entry, content, path, job_hash) for entry, path in zip(styles, paths["masks"])]
        reference_embedding, rows = self._style_rows(styles, masks, content)
        trajectory = self._trajectory(content, job["content"], schedule, reference_embedding)

        def stylized(injection: InjectionConfig) -> list[Image.Image]:
            with torch.no_grad():
                latents = denoise_with_injection(
                    self.pipe.unet, trajectory, reference_embedding, rows, schedule,
                    injection, self.sampling, callback=self.step_callback, progress=self.progress,
                )
            return self._decode(latents, rows, trajectory, content, masks)

        settings = self._settings(job, styles, content)
        if self.sweep.active:
            grid, settings["Sweep cells"] = self._ablation_grid(stylized, content, paths)
            images = [grid]
        else:
            images = stylized(self.injection)
        written = self._write(styles, images, paths, content, masks, settings, job_hash)
        return {"id": job["id"], "skipped": False, "outputs": [str(p) for p in written]}

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

    def _trajectory(self, content: Image.Image, path: str, schedule, embedding: torch.Tensor) -> torch.Tensor:
        """The content's inversion trajectory (the inversion prompt's `embedding`), cached on disk."""
        unet = self.pipe.unet
        key = InversionKey(
            image_sha256=sha256_file(path),
            # every field that changes the weights or the schedule (single-file config, prediction type)
            model=json.dumps({k: v for k, v in asdict(self.model_spec).items() if k != "dtype"}, sort_keys=True),
            height=content.height,
            width=content.width,
            steps=self.sampling.steps,
            substeps=self.sampling.inversion_substeps,
            prompt=self.sampling.inversion_prompt,
            dtype=str(unet.dtype),
        )
        latent_shape = (schedule.num_steps + 1, unet.config.in_channels, content.height // self.pipe.vae_scale_factor, content.width // self.pipe.vae_scale_factor)
        cached = self.cache.load(key, latent_shape) if self.cache else None  # None also for a broken file: recomputed
        if cached is not None:
            return cached.to(unet.device, unet.dtype)
        pixels = to_tensor(content).unsqueeze(0)
        latent = encode_images(self.pipe, pixels).to(unet.dtype)
        with base_model(unet):
            trajectory = invert(unet, latent, embedding, schedule, self.sampling.inversion_substeps, progress=self.progress)
        if self.cache:
            self.cache.save(key, trajectory)
        return trajectory

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

    def adapter_for(self, entry: StyleEntry) -> str:
        """The named adapter holding this LoRA at this scale, loaded on first use."""
        key = (entry.lora, float(entry.scale))
        if key not in self._adapters:
            name = f"style{len(self._adapters)}"
            load_style_adapter(self.pipe, entry.lora, name)
            self._adapters[key] = name
        return self._adapters[key]

    def _style_rows(self, styles: list[StyleEntry], masks: list, content: Image.Image) -> tuple[torch.Tensor, list[StyleRows]]:
        """The reference (inversion) prompt's embedding and each style's adapter, prompts and latent mask.

        All prompts are encoded in one text-encoder batch: the reference with the base model,
        style k's prompt and negative prompt with style k's text-encoder LoRA where it has one.
        """
        names = [self.adapter_for(entry) for entry in styles]
        scales = {name: float(entry.scale) for name, entry in zip(names, styles)}
        set_adapter_scales(self.pipe.unet, scales)
        set_text_encoder_scales(self.pipe.text_encoder, scales)
        prompts, adapters = [self.sampling.inversion_prompt], [BASE_ROW]
        for name, entry in zip(names, styles):
            prompts += [entry.prompt, self.sampling.negative_prompt]
            adapters += [name, name]
        embeddings = encode_prompts_per_adapter(self.pipe, prompts, adapters)
        device, dtype = self.pipe.unet.device, self.pipe.unet.dtype
        latent_hw = (content.height // self.pipe.vae_scale_factor, content.width // self.pipe.vae_scale_factor)
        rows = []
        for k, (name, mask) in enumerate(zip(names, masks)):
            latent_mask = None
            if mask is not None:
                latent_mask = mask_to_latent(mask, latent_hw)[None, None].to(device, dtype)
            cond, uncond = embeddings[1 + 2 * k : 2 + 2 * k], embeddings[2 + 2 * k : 3 + 2 * k]
            rows.append(StyleRows(name, cond, uncond, latent_mask, name=styles[k].name))
        return embeddings[:1], rows

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
