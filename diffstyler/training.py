"""Style LoRA training (paper section III-C, eq. 3) as a LightningModule, on any backbone.

The base model (VAE, text encoders, denoiser) is frozen; only a PEFT LoRA on the denoiser's
attention projections learns the style:

    L = E_{z0, eps, t} || target - model(z_t, t, c) ||²

with z0 the VAE latent of a style image and c the prompt's conditioning. What z_t, t and the
target are is the backbone's, as the family was trained: on SD 1.x / 2.x / SDXL the DDPM forward
process with t uniform in [0, 1000) and the target eps (or v for v-prediction); on SD 3.5 and
FLUX.1 rectified flow, z_t = (1 - sigma) z0 + sigma eps with sigma drawn logit-normally and the
target the velocity eps - z0. On SDXL, c also holds the time ids of each image (its size, the
corner of its crop and the crop's size); the text encoders stay frozen.

Reproducibility: the noise, timesteps and augmentation of step k come from a generator seeded with
(seed, k, rank), never from the global RNG. A run resumed from a checkpoint therefore computes
exactly the same next-step loss as the uninterrupted run, and the preview callback cannot shift
the training randomness.

Checkpoints hold only the trainable LoRA weights (plus optimizer and loop state): the frozen base
is reloaded from `model` on resume, so a checkpoint is a small fraction of the UNet.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from diffstyler.backbones import Backbone, backbone_for
from diffstyler.backbones.base import trim_to_tokens
from diffstyler.callbacks.progress import StepProgressBar
from diffstyler.checks import check_writable_folder
from diffstyler.data.style import DEFAULT_STYLE_PROMPT, StyleDataModule
from diffstyler.errors import UserError, config_error
from diffstyler.conditioning import Conditioning
from diffstyler.console import quiet_library_calls
from diffstyler.export import export_lora
from diffstyler.lora import LORA_INFO_NAME, LORA_WEIGHTS_NAME, StyleLoRAConfig, add_style_adapter, save_lora, write_lora_info
from diffstyler.models import AnyPipeline, ModelSpec, encode_images, encode_prompts, load_pipeline
from diffstyler.quantization import check_quantization_device
from diffstyler.torch_utils import eval_mode

METADATA_NAME = LORA_INFO_NAME
CROP_FRACTION = 0.75  # side of a random crop (data.crop), as a fraction of the latent's side


class StyleLoRAModule(LightningModule):
    """Learns a style LoRA from the style image(s) of a `StyleDataModule`.

    Args:
        model: base model to load (hub id, local folder, single file, or `tiny`).
        lora: LoRA rank / alpha / target modules / dropout (paper: rank 16 on to_q, to_k, to_v).
        learning_rate: AdamW learning rate, constant (paper: 2e-4).
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        adam_epsilon: AdamW epsilon.
        gradient_checkpointing: recompute the denoiser's activations in backward to save GPU memory.
        output_dir: where the LoRA and its metadata are exported when fit ends.
        adapter_name: name of the PEFT adapter inside the denoiser.
        seed: seeds each step's noise, timesteps and augmentation. None: the seed given to
            `seed_everything` (the CLI's `seed_everything`, default 0).
        export_kohya: also write `<output_dir>/<folder name>.safetensors` in the kohya / A1111
            layout (`diffstyler.export`), the file A1111, ComfyUI and sd-scripts load.
    """

    def __init__(
        self,
        model: ModelSpec = ModelSpec(),
        lora: StyleLoRAConfig = StyleLoRAConfig(),
        learning_rate: float = 2e-4,
        weight_decay: float = 1e-2,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_epsilon: float = 1e-8,
        gradient_checkpointing: bool = False,
        output_dir: str = "outputs/lora",
        adapter_name: str = "style",
        seed: Optional[int] = None,
        export_kohya: bool = False,
    ) -> None:
        super().__init__()
        if seed is not None and seed < 0:
            raise config_error("model.seed", f"must be >= 0, got {seed}")
        # Now, not at the export after all the training.
        check_writable_folder(output_dir, "model.output_dir")
        self.model_spec = model
        self.lora_config = lora
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.adam_betas = tuple(adam_betas)
        self.adam_epsilon = adam_epsilon
        self.gradient_checkpointing = gradient_checkpointing
        self.output_dir = output_dir
        self.adapter_name = adapter_name
        self.seed = seed
        self.export_kohya = export_kohya
        # Checkpoints hold only the LoRA; the frozen base comes from `model` again.
        self.strict_loading = False
        # Filled by configure_model(): loading is deferred so that the data is validated first
        # and every DDP process builds its own copy.
        self.pipe = None
        self.backbone: Optional[Backbone] = None
        self.denoiser = self.vae = self.text_encoders = None
        # Encoded once and reused for every step (not saved: recomputed identically on resume).
        self.latent_cache: dict[int, torch.Tensor] = {}
        self.prompt_cache: dict[str, Conditioning] = {}
        self.train_started: Optional[float] = None  # perf_counter at the training loop's start

    # --- model ----------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.denoiser is not None:
            return
        # A pipeline given to train on (`train_style(pipe=...)`) is used as it is: no second base model.
        pipe = self.pipe if self.pipe is not None else load_pipeline(self.model_spec)
        backbone = backbone_for(pipe)
        pipe.vae.requires_grad_(False)
        for encoder in backbone.text_encoders:
            encoder.requires_grad_(False)
        add_style_adapter(backbone.denoiser, self.lora_config, self.adapter_name)
        if self.gradient_checkpointing:
            backbone.denoiser.enable_gradient_checkpointing()
        backbone.denoiser.train()  # pretrained models load in eval mode; LoRA dropout needs train mode
        self.pipe, self.backbone = pipe, backbone
        # Registered as submodules, so that Lightning moves them to the device.
        self.denoiser, self.vae = backbone.denoiser, pipe.vae
        self.text_encoders = torch.nn.ModuleList(backbone.text_encoders)

    def setup(self, stage: str) -> None:
        # Lightning calls setup before configure_model: the checks need no model, so they come first.
        check_quantization_device(self.model_spec.quantization, self.trainer.strategy.root_device)
        frozen_half = self.model_spec.torch_dtype != torch.float32
        if frozen_half and "mixed" not in str(self.trainer.precision):
            raise config_error(
                "model.model.dtype",
                f"{self.model_spec.dtype} needs a mixed-precision trainer (trainer.precision 16-mixed or "
                f"bf16-mixed), got {self.trainer.precision!r}: the float32 LoRA and half-precision base "
                "layers only mix under autocast",
            )

    def trainable_parameter_names(self) -> set[str]:
        return {name for name, parameter in self.named_parameters() if parameter.requires_grad}

    # --- loss (eq. 3) ---------------------------------------------------------------------------

    def denoising_loss(
        self, latents: torch.Tensor, prompt: Conditioning, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """MSE between the denoiser's prediction on noised latents and its target (eps, v, or the
        velocity: the backbone's)."""
        noisy_latents = self.backbone.noised(latents, noise, timesteps)
        base_dtype = self.model_spec.torch_dtype
        prediction = self.backbone.predict(noisy_latents.to(base_dtype), timesteps, prompt.to(base_dtype))
        target = self.backbone.training_target(latents, noise, timesteps)
        return F.mse_loss(prediction.float(), target.float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator = self.step_generator()
        whole = self.style_latents(batch)
        latents, corners = self.augment_latents(whole, batch, generator)
        prompt = self.size_conditioning(self.prompt_conditioning(batch["prompt"]), whole, latents, corners)
        timesteps = self.backbone.draw_training_timesteps(len(latents), generator, latents.shape)
        noise = torch.randn(latents.shape, generator=generator)
        loss = self.denoising_loss(latents, prompt, noise.to(latents), timesteps.to(self.device))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(latents))
        return loss

    def step_generator(self) -> torch.Generator:
        """A CPU generator for this step, seeded from (seed, global step, rank)."""
        seeds = np.random.SeedSequence([self.training_seed, self.global_step, self.global_rank])
        return torch.Generator().manual_seed(int(seeds.generate_state(1, dtype=np.uint64)[0]))

    @property
    def training_seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    # --- cached inputs --------------------------------------------------------------------------

    def style_latents(self, batch: dict) -> torch.Tensor:
        """Latents [B, C, h, w] of the batch's images, VAE-encoded on first use only (cut to whole
        tokens for a transformer)."""
        latents = []
        for index, pixels in zip(batch["index"].tolist(), batch["pixel_values"]):
            if index not in self.latent_cache:
                self.latent_cache[index] = self._encode_image(pixels)
            latents.append(self.latent_cache[index])
        return torch.stack(latents)

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        # Full precision and eval mode: the cached latent must not depend on the step or precision
        # under which it was first needed. The posterior mean (the paper's script draws a new
        # posterior sample each step) is what makes a single cached latent possible.
        with torch.autocast(self.device.type, enabled=False), eval_mode(self.vae):
            return self.backbone.trim_to_tokens(encode_images(self.pipe, pixels.unsqueeze(0)))[0].float()

    def prompt_conditioning(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning (one row each), computed once per distinct prompt."""
        for prompt in set(prompts) - self.prompt_cache.keys():
            with torch.autocast(self.device.type, enabled=False), eval_mode(self.text_encoders):
                self.prompt_cache[prompt] = encode_prompts(self.pipe, [prompt])
        return Conditioning.cat([self.prompt_cache[prompt] for prompt in prompts])

    def augment_latents(self, latents: torch.Tensor, batch: dict,
                        generator: torch.Generator) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Optional random crops and left-right flips of the cached latents (data.crop / data.flip),
        and each crop's top-left corner on the latent grid ((0, 0) uncropped).

        Augmenting latents instead of pixels keeps the single VAE pass; a flip or crop of an
        SD latent decodes to (very nearly) the flipped or cropped image.
        """
        augmented, corners = [], []
        for latent, crop, flip in zip(latents, batch["crop"].tolist(), batch["flip"].tolist()):
            corner = (0, 0)
            if crop:
                latent, corner = _random_crop(latent, CROP_FRACTION, generator)
                latent = trim_to_tokens(latent, self.token_cells)
            if flip and torch.rand((), generator=generator) < 0.5:
                latent = latent.flip(-1)
            augmented.append(latent)
            corners.append(corner)
        return torch.stack(augmented), corners

    def size_conditioning(self, prompt: Conditioning, whole: torch.Tensor, latents: torch.Tensor,
                          corners: list[tuple[int, int]]) -> Conditioning:
        """The batch's conditioning with each image's size, its crop's corner and the crop's size in
        pixels, where the family reads them (SDXL's time ids; uncropped: the image's size twice and
        (0, 0), as stylization gives them)."""
        factor = self.backbone.latent_factor
        original, target = tuple(factor * side for side in whole.shape[-2:]), tuple(factor * side for side in latents.shape[-2:])
        return self.backbone.training_size_conditioning(prompt, original, [(factor * top, factor * left) for top, left in corners], target)

    # --- optimisation and checkpoints -----------------------------------------------------------

    def configure_optimizers(self) -> torch.optim.Optimizer:
        lora_parameters = [parameter for parameter in self.parameters() if parameter.requires_grad]
        return torch.optim.AdamW(
            lora_parameters,
            lr=self.learning_rate,
            betas=self.adam_betas,
            weight_decay=self.weight_decay,
            eps=self.adam_epsilon,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = self.trainable_parameter_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints of earlier versions name the denoiser `unet`.
        checkpoint["state_dict"] = {("denoiser." + key.removeprefix("unet.") if key.startswith("unet.") else key): value
                                    for key, value in checkpoint["state_dict"].items()}
        # strict_loading is off (the base is not in the checkpoint), so check the LoRA part here.
        missing = sorted(self.trainable_parameter_names() - checkpoint["state_dict"].keys())
        if missing:
            raise UserError(
                "checkpoint does not fit the model", "ckpt_path",
                f"it lacks {len(missing)} LoRA weights of this model (e.g. {missing[0]}); "
                "was it trained with the same model.lora settings and model.adapter_name?",
            )

    def release_pipeline(self) -> None:
        """Give back a pipeline the module was given to train on: the adapter deleted from its
        denoiser (the LoRA is in `output_dir`), every module frozen and in eval mode again."""
        if self.adapter_name in getattr(self.denoiser, "peft_config", {}):
            self.denoiser.delete_adapters(self.adapter_name)
        for module in (self.denoiser, self.vae, self.text_encoders):
            if module is not None:
                module.requires_grad_(False).eval()

    # --- export ---------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        self.train_started = time.perf_counter()

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            self.export(self.output_dir)

    def export(self, output_dir: str | os.PathLike) -> Path:
        """Write `pytorch_lora_weights.safetensors` (diffusers format) and `diffstyler_lora.json`
        (and with `export_kohya`, the kohya-layout file)."""
        output_dir = Path(output_dir)
        save_lora(self.denoiser, self.adapter_name, output_dir)
        write_lora_info(output_dir, self.export_metadata())
        if self.export_kohya:
            export_lora(output_dir, "kohya", output_dir / f"{output_dir.resolve().name}.safetensors")
        return output_dir

    def export_metadata(self) -> dict[str, Any]:
        style = self._style_metadata()
        return {
            **self.recipe(),
            "prediction_type": self.backbone.family.prediction_type,
            "steps": self.global_step,
            # the training loop's seconds in this run (the model loaded; a resumed fit: since its
            # resume): what a style costs before its first result (`diffstyler compare`)
            "fit_seconds": None if self.train_started is None else round(time.perf_counter() - self.train_started, 3),
            **style,
            "model_card": self.model_card(style),
        }

    def model_card(self, style: dict[str, Any]) -> dict[str, Any]:
        """The fields a model page (civitai and the like) asks of a LoRA."""
        family = self.backbone.family
        prompts = style.get("prompt")
        return {
            "type": "LORA",
            "base_model": family.name or f"cross-attention width {family.text_width}",
            "base_model_name": self.model_spec.name,
            "trigger_words": [prompts] if isinstance(prompts, str) else list(prompts or []),
            "rank": self.lora_config.rank,
            "steps": self.global_step,
            "training_images_sha256": [image.get("sha256") for image in style.get("style_images", [])],
        }

    def recipe(self) -> dict[str, Any]:
        """The settings a LoRA is trained with that are known before training (the part of
        `diffstyler_lora.json` a rerun of `data.one_lora_per_image` compares)."""
        lora = self.lora_config
        return {
            "weights": LORA_WEIGHTS_NAME,
            "base_model": {
                "name": self.model_spec.name,
                "revision": self.model_spec.revision,
                "variant": self.model_spec.variant,
            },
            "adapter_name": self.adapter_name,
            "rank": lora.rank,
            "alpha": lora.alpha if lora.alpha is not None else lora.rank,
            "target_modules": lora.targets(self.default_lora_targets()),
            "dropout": lora.dropout,
            "learning_rate": self.learning_rate,
            "seed": self.training_seed,
        }

    @property
    def token_cells(self) -> int:
        """Latent cells per side of the denoiser's token (known without loading the model: its kind's)."""
        from diffstyler.models import model_kind

        return model_kind(self.model_spec).backbone.token_cells

    def default_lora_targets(self) -> tuple[str, ...]:
        """The family's Q/K/V (known without loading the model: its kind's)."""
        from diffstyler.models import model_kind

        return model_kind(self.model_spec).default_lora_targets

    def _style_metadata(self) -> dict[str, Any]:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if hasattr(datamodule, "style_metadata"):
            return datamodule.style_metadata()
        # Trained from plain dataloaders: only the prompts are known.
        return {"prompt": sorted(self.prompt_cache), "style_images": []}


def _random_crop(latent: torch.Tensor, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
    height, width = latent.shape[-2:]
    crop_height, crop_width = max(1, round(height * fraction)), max(1, round(width * fraction))
    top = int(torch.randint(0, height - crop_height + 1, (), generator=generator))
    left = int(torch.randint(0, width - crop_width + 1, (), generator=generator))
    return latent[..., top : top + crop_height, left : left + crop_width], (top, left)


def train_style(
    images: str | os.PathLike | list[str | os.PathLike],
    output_dir: str | os.PathLike,
    steps: int = 200,
    *,
    model: str | ModelSpec = ModelSpec(),
    prompt: str = DEFAULT_STYLE_PROMPT,
    lora: StyleLoRAConfig = StyleLoRAConfig(),
    learning_rate: float = 2e-4,
    resolution: Optional[int] = None,
    seed: int = 0,
    accelerator: str = "auto",
    precision: str = "32-true",
    callbacks: Optional[list[Callback]] = None,
    progress: bool = True,
    pipe: Optional[AnyPipeline] = None,
) -> Path:
    """Learn a style LoRA from one image (or several) and write it to `output_dir`; returns the folder.

    The same `StyleLoRAModule` and data module as `diffstyler fit`, with the paper's defaults (rank
    16 on Q/K/V, 200 steps, AdamW at 2e-4), seeded as the CLI seeds (`seed_everything`), so the same
    settings give the LoRA `diffstyler fit` gives. `resolution` None: the model's native size (512
    for SD 1.5 and SD 2.1-base, 1024 for SDXL; the model is then loaded before the images are read).
    No logger and no checkpoints; pass Lightning `callbacks` to watch or stop the training (an
    exception raised in one ends it). It prints one bar over the steps (`progress`; False: nothing
    at all): Lightning's own lines are silenced during the call (`diffstyler.set_verbosity`).

    `pipe`: a diffusers pipeline already loaded (e.g. `DiffStylerPipeline(...).pipe`) to train on
    instead of loading `model` again, which then only names the base model in the LoRA's info. The
    adapter is added to its denoiser for the training and deleted after it, also when the training
    fails or is stopped, and the pipeline is left frozen, in eval mode, on its device (Lightning
    moves what it trained to the CPU at the end); its other adapters compute what they did before.
    """
    if steps < 1:
        raise config_error("steps", f"must be >= 1, got {steps}")
    seed_everything(seed, workers=True, verbose=False)
    module = StyleLoRAModule(model=model if isinstance(model, ModelSpec) else ModelSpec(name=model), lora=lora,
                             learning_rate=learning_rate, output_dir=str(output_dir))
    module.pipe = pipe
    device = pipe.device if pipe is not None else None
    try:
        if resolution is None:
            module.configure_model()
            resolution = module.backbone.native_resolution
        data = StyleDataModule(images=[str(i) for i in (images if isinstance(images, list) else [images])], prompt=prompt,
                               resolution=resolution)
        with quiet_library_calls():  # Lightning's environment lines, tips and "`Trainer.fit` stopped"
            trainer = Trainer(max_steps=steps, accelerator=accelerator, devices=1, precision=precision, logger=False,
                              enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
                              callbacks=[*([StepProgressBar()] if progress else []), *(callbacks or [])])
            trainer.fit(module, datamodule=data)
    finally:
        if pipe is not None:
            module.release_pipeline()
            pipe.to(device)
    return Path(output_dir)
