"""Preview images during LoRA training, and the small text-to-image sampler they use (any backbone).

`PreviewGrid` samples a few images with the live LoRA every N steps and logs a grid to
TensorBoard. It samples under the Trainer's own autocast context instead of casting the LoRA:
with "16-mixed" the LoRA weights must stay float32 for the gradient scaler (diffusers PR 13895).
The noise comes from a fixed seed, so successive grids show the same samples as the style is
learnt, and the training randomness (seeded per step) is untouched.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torchvision
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from diffstyler.backbones import backbone_for
from diffstyler.models import AnyPipeline
from diffstyler.sampling import classifier_free_guidance
from diffstyler.torch_utils import eval_mode


@torch.no_grad()
def sample_text_to_image(
    pipe: AnyPipeline,
    prompt: Union[str, list[str]],
    negative_prompt: Union[str, list[str]],
    height: int,
    width: int,
    steps: int,
    guidance_scale: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Plain sampling with the backbone's sampler (DDIM with eta 0, or flow-matching Euler) and
    classifier-free guidance where the family guides with negative rows; returns images
    [B, 3, H, W] in [0, 1].

    The schedule comes from a fresh copy of the pipeline's scheduler (`Backbone.schedule`), so the
    pipeline's own scheduler state is left alone. Initial noise is drawn on `generator`'s device,
    so a CPU generator gives the same images on every device.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts")
    backbone = backbone_for(pipe)
    if height % backbone.pixel_multiple or width % backbone.pixel_multiple:
        raise ValueError(f"height and width must be multiples of {backbone.pixel_multiple}, got {height}x{width}")

    device, dtype = backbone.denoiser.device, backbone.dtype
    negative_rows = backbone.negative_rows(guidance_scale)
    text = backbone.encode_prompts((negatives if negative_rows else []) + prompts).to(device, dtype)
    text = backbone.size_conditioning(text, (height, width))  # SDXL: the image's size, no crop
    latent_size = backbone.latent_size(height, width)
    schedule = backbone.schedule(steps, backbone.image_tokens(*latent_size))

    shape = (len(prompts), backbone.latent_channels, *latent_size)
    latents = torch.randn(shape, generator=generator, device=generator.device).to(device, torch.float32)
    for i, timestep in enumerate(schedule.timesteps):
        rows = torch.cat([latents, latents]) if negative_rows else latents
        prediction = backbone.predict(rows.to(dtype), timestep, text, guidance_scale).float()
        if negative_rows:
            noise_uncond, noise_text = prediction.chunk(2)
            prediction = classifier_free_guidance(noise_uncond, noise_text, guidance_scale)
        latents = schedule.step(latents, prediction, i)
    return backbone.decode_latents(latents)


class PreviewGrid(Callback):
    """Every `every_n_steps` optimizer steps, log a grid of images sampled with the current LoRA.

    Works with a LightningModule that exposes its pipeline as `.pipe` (StyleLoRAModule). Runs on
    global rank zero only; logs to every TensorBoardLogger of the trainer.

    Args:
        every_n_steps: sampling interval in optimizer steps.
        prompts: prompts to sample; None: the data module's `prompt`.
        images_per_prompt: samples per prompt (one grid row per prompt).
        steps: DDIM steps per sample.
        guidance_scale: classifier-free guidance scale.
        negative_prompt: the unconditional prompt.
        height / width: image size in pixels; None: the UNet's native size (512 for SD 2.1-base, 1024 for SDXL).
        seed: seed of the initial noise; the same for every grid.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        prompts: Optional[list[str]] = None,
        images_per_prompt: int = 2,
        steps: int = 25,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        height: Optional[int] = None,
        width: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"PreviewGrid.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.prompts = prompts
        self.images_per_prompt = images_per_prompt
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.height = height
        self.width = width
        self.seed = seed

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self._preview_prompts(trainer) is None:
            raise ValueError("PreviewGrid needs `prompts`, or a data module with a `prompt` attribute")
        if stage == "fit" and not any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers):
            rank_zero_warn("PreviewGrid logs to TensorBoard, but the trainer has no TensorBoardLogger: no previews")

    def _preview_prompts(self, trainer: Trainer) -> Optional[list[str]]:
        if self.prompts:
            return list(self.prompts)
        prompt = getattr(trainer.datamodule, "prompt", None)
        return [prompt] if prompt else None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not loggers:
            return
        grid = self.make_grid(trainer, pl_module)
        for logger in loggers:
            logger.experiment.add_image("preview", grid, global_step=step)

    def make_grid(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor:
        """One row per prompt, `images_per_prompt` columns; a float tensor [3, H, W] in [0, 1]."""
        pipe = pl_module.pipe
        native = backbone_for(pipe).native_resolution
        prompts = [p for p in self._preview_prompts(trainer) for _ in range(self.images_per_prompt)]
        generator = torch.Generator().manual_seed(self.seed)
        with eval_mode(backbone_for(pipe).denoiser), trainer.precision_plugin.forward_context():
            images = sample_text_to_image(
                pipe,
                prompts,
                self.negative_prompt,
                height=self.height or native,
                width=self.width or native,
                steps=self.steps,
                guidance_scale=self.guidance_scale,
                generator=generator,
            )
        return torchvision.utils.make_grid(images.cpu(), nrow=self.images_per_prompt)
