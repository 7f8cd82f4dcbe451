"""The stylization loop: denoising with the LoRA-integrated denoiser guided by the content pass.

`denoise_jobs` is a stateless sampler (with a per-step callback) over one or several jobs of one
latent size, on any backbone. At step i, ONE denoiser call runs every job's rows
(`rows.RowLayout`: reference rows on the inversion latent z_t = trajectory[i], then each style's
uncond and cond rows), with per-row adapter routing and the reference rows' features and attention
injected into the style rows (`injection.Injector`, paper eq. 4 and 5). Then classifier-free
guidance (on families that guide with negative rows) and the schedule's step per style (DDIM, or
Euler on the flow-matching velocity), and each style latent is set back to the content's
trajectory outside its mask (eq. 6).

Every step's outputs are checked for NaN and inf: a half-precision call that overflows is run
again in float32; what is still not finite fails the job, naming the style.

Masks (paper section III-D): style k denoises its own latent (eq. 6 with its own mask M_k). The
fused latent (`fuse_styles`, eq. 7) takes each style's latent inside its mask and the trajectory
outside all masks; where masks overlap the later style wins. Without masks every style produces
its own full image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Literal, Optional

import torch
from tqdm.auto import tqdm

from diffstyler.backbones import Backbone
from diffstyler.conditioning import Conditioning
from diffstyler.errors import UserError, config_error
from diffstyler.injection import InjectionConfig, Injector, ReferenceMode
from diffstyler.methods import DiffStylerMethod, Method, StyleIDConfig, StyleIDMethod
from diffstyler.rows import JobRows, RowLayout
from diffstyler.sampling import INVERSION_SOLVERS, Schedule
from diffstyler.quantization import is_quantized
from diffstyler.torch_utils import float32_model

DEFAULT_NEGATIVE_PROMPT = "ugly, blurry, black, low res, unrealistic"


@dataclass
class SamplingConfig:
    """Denoising and inversion settings; defaults from the paper and its public code (SD 2.1-base).

    Args:
        steps: sampling steps (the paper: 50; the injection windows may be fractions of them).
        guidance_scale: classifier-free guidance scale (the paper's code: 10.5); on FLUX.1-dev the
            distilled guidance embedding's scale instead (no negative rows).
        negative_prompt: the unconditional prompt of classifier-free guidance.
        inversion_prompt: the prompt the content is inverted with (and the reference rows run with).
        inversion_substeps: denoiser evaluations per sampler step during inversion (20 with 50 steps
            is the paper's 1000-step inversion; 1 inverts at exactly the sampler's timesteps).
        inversion_solver: how flow-matching models (SD 3.5, FLUX.1) integrate the inversion: "euler",
            "midpoint" (RF-Solver's second-order step) or "fireflow" (the midpoint, reusing the last
            velocity: second order at one evaluation per step). None: the model's default (fireflow
            on SD 3.5 and FLUX.1; DDIM's own first-order step, "euler", on SD 1.x / 2.x / SDXL).
        reference: "batch" runs reference and style rows in one call; "separate" runs the reference
            alone first (lower peak memory, more calls, same result).
    """

    steps: int = 50
    guidance_scale: float = 10.5
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    inversion_prompt: str = ""
    inversion_substeps: int = 1
    inversion_solver: Optional[Literal["euler", "midpoint", "fireflow"]] = None
    reference: Literal["batch", "separate"] = "batch"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise config_error("model.sampling.steps", f"must be >= 1, got {self.steps}")
        if not math.isfinite(self.guidance_scale):
            raise config_error("model.sampling.guidance_scale", f"must be a finite number, got {self.guidance_scale}")
        if self.inversion_substeps < 1:
            raise config_error("model.sampling.inversion_substeps", f"must be >= 1, got {self.inversion_substeps}")
        if self.reference not in ("batch", "separate"):
            raise config_error("model.sampling.reference", f"must be 'batch' or 'separate', got {self.reference!r}")
        if self.inversion_solver is not None and self.inversion_solver not in INVERSION_SOLVERS:
            raise config_error("model.sampling.inversion_solver", f"must be one of {', '.join(INVERSION_SOLVERS)}, "
                                                                  f"got {self.inversion_solver!r}")

    def fingerprint(self) -> dict:
        """The settings for hashes and cache keys. Settings added later appear only when they differ
        from their default, so that adding them changed the hash of no existing output."""
        fields = asdict(self)
        if fields["inversion_solver"] is None:
            del fields["inversion_solver"]
        return fields


@dataclass
class StyleRows:
    """What one style contributes to a job's rows: its adapter, prompt conditionings and latent mask.

    `name` identifies the style in error messages (default: the adapter's name). `method`: how the
    style acts ("diffstyler": its LoRA with the content's features and attention injected;
    "styleid": the style image's keys and values, from `style_trajectory`, its inversion).
    """

    adapter: str
    cond: Conditioning  # one row
    uncond: Conditioning  # one row
    mask: Optional[torch.Tensor] = None  # [1, 1, h, w], 1 inside the style's region
    name: Optional[str] = None
    method: Literal["diffstyler", "styleid"] = "diffstyler"
    style_trajectory: Optional[torch.Tensor] = None  # StyleID: the style image's trajectory [N + 1, C, h, w]

    @property
    def label(self) -> str:
        return self.name or self.adapter


@dataclass
class DenoiseJob:
    """One content image to stylize: its inversion trajectory [N + 1, C, h, w], the inversion
    prompt's conditioning (one row) and its styles; `id` names it in `StepState.job`."""

    trajectory: torch.Tensor
    reference: Conditioning
    styles: list[StyleRows]
    id: Optional[str] = None

    def rows(self, latents: list[torch.Tensor], methods: dict[str, Method]) -> JobRows:
        return JobRows(self.trajectory, self.reference, tuple(self.styles), tuple(methods[s.method] for s in self.styles),
                       tuple(latents))


@dataclass
class StepState:
    """Passed to the per-step callback after step `step` (of `num_steps`) moved a job's style latents."""

    step: int
    timestep: int
    reference_output: Optional[torch.Tensor]  # the job's reference rows' UNet output on z_t, None once dropped
    style_outputs: list[torch.Tensor]  # per style: guided UNet output
    latents: list[torch.Tensor]  # per style: latent after the step (and mask fusion)
    job: Optional[str] = None  # the `DenoiseJob.id` these rows belong to
    num_steps: int = 0


StepCallback = Callable[[StepState], None]


@torch.no_grad()
def denoise_jobs(
    backbone: Backbone,
    jobs: list[DenoiseJob],
    schedule: Schedule,
    injection: InjectionConfig,
    sampling: SamplingConfig,
    callback: Optional[StepCallback] = None,
    progress: bool = True,
    styleid: Optional[StyleIDConfig] = None,
) -> list[list[torch.Tensor]]:
    """Denoise jobs of one latent size together from their styles' first latents, every step in
    ONE denoiser call; per job, each style's final latent [1, C, h, w].

    Each style row reads its own job's reference rows only, and is fused with its own job's
    trajectory, so a job's result does not depend on the jobs it shares the call with. LoRA styles
    follow `injection` (DiffStyler), image styles `styleid` (StyleID; default: the authors' settings).
    The denoiser's adapters must be active (`lora.set_adapter_scales`) for the styles' adapters.
    """
    if not jobs or any(not job.styles for job in jobs):
        raise ValueError("at least one style per job is needed")
    methods = call_methods(backbone, injection, styleid or StyleIDConfig(), schedule.num_steps)
    latents = [[methods[style.method].initial_latent(job.trajectory, style) for style in job.styles] for job in jobs]
    injector = Injector(backbone, [methods[style.method] for job in jobs for style in job.styles])
    injector.image_tokens = backbone.image_tokens(*jobs[0].trajectory.shape[-2:])
    with_uncond = backbone.negative_rows(sampling.guidance_scale)
    with injector.installed():
        for i in tqdm(range(schedule.num_steps), desc="Stylizing", disable=not progress, leave=False):
            t = schedule.timesteps[i]
            # Eq. 4-5 (or StyleID's injection): one call; the reference rows' activations go into the style rows.
            layout = RowLayout.for_step([job.rows(job_latents, methods) for job, job_latents in zip(jobs, latents)], i, with_uncond)
            reference_output, style_output = finite_outputs(backbone, injector, layout, sampling, i, t)
            for index, (job, guided) in enumerate(zip(jobs, layout.guided(style_output, sampling.guidance_scale))):
                # A step per style, then eq. 6: outside its mask the latent is the content's trajectory.
                latents[index] = denoised(latents[index], guided, job, schedule, i)
                if callback is not None:
                    reference = layout.job_reference_output(reference_output, index)
                    callback(StepState(i, int(t), reference, guided, latents[index], job.id, schedule.num_steps))
    return latents


def call_methods(backbone: Backbone, injection: InjectionConfig, styleid: StyleIDConfig, steps: int) -> dict[str, Method]:
    """The methods of a call by name, their layers resolved on the backbone's map and windows in steps."""
    layers = backbone.layer_map()
    styleid = replace(styleid, layers=layers.attention_layer_numbers(styleid.layers, "model.styleid.layers"))
    return {"diffstyler": DiffStylerMethod(injection.resolved(layers, steps)),
            "styleid": StyleIDMethod(styleid, backbone.inversion_level(0))}


def outputs(backbone: Backbone, injector: Injector, layout: RowLayout, sampling: SamplingConfig, step: int,
            t: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """The outputs of the reference rows (None when there are none) and of the style rows, the
    reference injected into the style rows: in one call (`sampling.reference` "batch"), or
    recorded by a call of the reference rows first ("separate": less peak memory, same result)."""
    guidance = sampling.guidance_scale
    if sampling.reference == "batch" or not layout.references:
        injector.set_step(step, t, ReferenceMode.BATCH_ROW, layout)
        return layout.split_references(layout.run(backbone, t, guidance=guidance))
    injector.set_step(step, t, ReferenceMode.RECORD, layout)
    reference_output = layout.run(backbone, t, "references", guidance)
    injector.set_step(step, t, ReferenceMode.REPLAY, layout)
    return reference_output, layout.run(backbone, t, "styles", guidance)


def finite_outputs(backbone: Backbone, injector: Injector, layout: RowLayout, sampling: SamplingConfig, step: int, t: torch.Tensor):
    """`outputs`, run again in float32 when a half-precision call gives NaN or inf."""
    result = outputs(backbone, injector, layout, sampling, step, t)
    # A quantized denoiser has no float32 weights to retry with.
    if all_finite(result) or backbone.dtype == torch.float32 or is_quantized(backbone.denoiser):
        return result
    with float32_model(backbone.denoiser):
        result = outputs(backbone, injector, layout.as_float(), sampling, step, t)
    dtype = layout.styles[0].latent.dtype
    return tuple(None if o is None else o.to(dtype) for o in result)


def all_finite(outputs) -> bool:
    return all(o is None or bool(torch.isfinite(o).all()) for o in outputs)


def denoised(latents: list[torch.Tensor], guided: list[torch.Tensor], job: DenoiseJob, schedule: Schedule, i: int) -> list[torch.Tensor]:
    """Each style latent one step further, set back to the content outside its mask (eq. 6)."""
    content_next = job.trajectory[i + 1 : i + 2]
    moved = [fuse_with_content(schedule.step(x, out, i), content_next, style.mask)
             for x, out, style in zip(latents, guided, job.styles)]
    for latent, style in zip(moved, job.styles):
        check_finite(latent, style.label, i)
    return moved


def check_finite(values: torch.Tensor, style: str, step: Optional[int] = None, what: str = "latent") -> None:
    """Fail the job, naming the style, when its values hold NaN or inf (so no black image is written)."""
    if not torch.isfinite(values).all():
        where = f"style {style!r}" + (f", denoising step {step}" if step is not None else "")
        raise UserError(
            f"stylization gave non-finite values (NaN or inf) in the {what}", where,
            "the LoRA may be broken (NaN or huge weights) or its scale too large",
        )


def fuse_with_content(latent: torch.Tensor, content: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Eq. 6: the style latent inside the mask, the content's trajectory outside."""
    if mask is None:
        return latent
    return torch.where(mask.bool(), latent, content)


def exclusive_masks(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Overlap rule: a later mask wins, so every point belongs to at most one style."""
    taken = torch.zeros_like(masks[-1], dtype=torch.bool)
    exclusive = []
    for mask in reversed(masks):
        own = mask.bool() & ~taken
        exclusive.append(own)
        taken |= own
    return exclusive[::-1]


def fuse_styles(latents: list[torch.Tensor], masks: list[torch.Tensor], content: torch.Tensor) -> torch.Tensor:
    """Eq. 7 in latent space: each style inside its (exclusive) mask, the content elsewhere."""
    fused = content.clone()
    for latent, mask in zip(latents, exclusive_masks(masks)):
        fused = torch.where(mask, latent, fused)
    return fused
