"""The stylization loop: DDIM denoising with the LoRA-integrated UNet guided by the content pass.

At step i the UNet runs ONE batch:
    [reference rows: inversion latent z_t = trajectory[i], inversion prompt]
    + for each style k: [uncond row, cond row]: adapter k, the style's latent, negative / style prompt
with per-row adapter routing (`lora.route_adapters`) and the reference rows' decoder features and
attention injected into the style rows (`injection.Injector`). With `reference_model: base` one
reference row runs the base model and feeds every style row; with `reference_model: style` style
k has its own reference row run through adapter k (the paper's public code). Once no injection
window is open the reference rows are dropped from the batch.

Every step's outputs are checked for NaN and inf: a half-precision UNet call that overflows is
run again in float32; what is still not finite fails the job, naming the style.

Masks (paper section III-D): style k denoises its own latent, which outside its mask M_k is set
back to the content's inversion trajectory after every step (eq. 6). The fused latent takes each
style's latent inside its mask and the trajectory outside all masks (eq. 7); where masks overlap
the later style wins. Without masks every style produces its own full image.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Optional

import torch
from tqdm.auto import tqdm

from diffstyler.errors import UserError, config_error
from diffstyler.injection import InjectionConfig, Injector, ReferenceMode
from diffstyler.lora import BASE_ROW, route_adapters
from diffstyler.sampling import DDIMSchedule, classifier_free_guidance, ddim_step

DEFAULT_NEGATIVE_PROMPT = "ugly, blurry, black, low res, unrealistic"


@dataclass
class SamplingConfig:
    """Denoising and inversion settings; defaults from the paper and its public code.

    inversion_substeps: UNet evaluations per sampler step during inversion (20 with 50 steps is
      the paper's 1000-step inversion; 1 inverts at exactly the sampler's timesteps).
    reference: "batch" runs reference and style rows in one UNet call; "separate" runs the
      reference alone first (lower peak memory, more calls, same result).
    """

    steps: int = 50
    guidance_scale: float = 10.5
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    inversion_prompt: str = ""
    inversion_substeps: int = 1
    reference: Literal["batch", "separate"] = "batch"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise config_error("model.sampling.steps", f"must be >= 1, got {self.steps}")
        if self.inversion_substeps < 1:
            raise config_error("model.sampling.inversion_substeps", f"must be >= 1, got {self.inversion_substeps}")
        if self.reference not in ("batch", "separate"):
            raise config_error("model.sampling.reference", f"must be 'batch' or 'separate', got {self.reference!r}")

    @property
    def uses_uncond(self) -> bool:
        return self.guidance_scale != 1.0


@dataclass
class StyleRows:
    """What one style contributes to the batch: its adapter, prompt embeddings and latent mask.

    `name` identifies the style in error messages (default: the adapter's name).
    """

    adapter: str
    cond: torch.Tensor  # [1, 77, dim]
    uncond: torch.Tensor  # [1, 77, dim]
    mask: Optional[torch.Tensor] = None  # [1, 1, h, w], 1 inside the style's region
    name: Optional[str] = None

    @property
    def label(self) -> str:
        return self.name or self.adapter


@dataclass
class StepState:
    """Passed to the per-step callback after step `step` moved every style latent."""

    step: int
    timestep: int
    reference_output: Optional[torch.Tensor]  # reference rows' UNet output on z_t, None once dropped
    style_outputs: list[torch.Tensor]  # per style: guided UNet output
    latents: list[torch.Tensor]  # per style: latent after the step (and mask fusion)
    job: Optional[str] = None  # the `DenoiseJob.id` these rows belong to


StepCallback = Callable[[StepState], None]


@dataclass
class DenoiseJob:
    """One content image to stylize: its inversion trajectory [N + 1, C, h, w], the inversion
    prompt's embedding [1, 77, d] and its styles; `id` names it in `StepState.job`."""

    trajectory: torch.Tensor
    reference_embedding: torch.Tensor
    styles: list[StyleRows]
    id: Optional[str] = None


@dataclass
class BatchLayout:
    """Row bookkeeping for one UNet call."""

    latents: list[torch.Tensor] = field(default_factory=list)
    embeddings: list[torch.Tensor] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)

    def add(self, latent: torch.Tensor, embedding: torch.Tensor, adapter: str) -> None:
        self.latents.append(latent)
        self.embeddings.append(embedding)
        self.adapters.append(adapter)

    def __add__(self, other: "BatchLayout") -> "BatchLayout":
        return BatchLayout(self.latents + other.latents, self.embeddings + other.embeddings, self.adapters + other.adapters)


def _style_layout(styles: list[StyleRows], latents: list[torch.Tensor], with_uncond: bool) -> BatchLayout:
    layout = BatchLayout()
    for style, latent in zip(styles, latents):
        if with_uncond:
            layout.add(latent, style.uncond, style.adapter)
        layout.add(latent, style.cond, style.adapter)
    return layout


def _run_unet(unet, layout: BatchLayout, timestep: torch.Tensor) -> torch.Tensor:
    with route_adapters(unet, layout.adapters):
        return unet(
            torch.cat(layout.latents),
            timestep,
            encoder_hidden_states=torch.cat(layout.embeddings),
        ).sample


def _guided_outputs(outputs: torch.Tensor, num_styles: int, with_uncond: bool, guidance_scale: float) -> list[torch.Tensor]:
    if not with_uncond:
        return list(outputs.split(1))
    pairs = outputs.view(num_styles, 2, *outputs.shape[1:])
    return [classifier_free_guidance(p[0:1], p[1:2], guidance_scale) for p in pairs]


def unet_rows(num_styles: int, reference_model: str, with_uncond: bool) -> int:
    """A job's rows in one UNet call while the reference runs: its reference rows (one, or one per
    style with `reference_model: style`), then each style's (uncond and) cond row."""
    references = 1 if reference_model == "base" else num_styles
    return references + (2 if with_uncond else 1) * num_styles


def _reference_layout(
    styles: list[StyleRows], latent: torch.Tensor, embedding: torch.Tensor, reference_model: str, with_uncond: bool,
) -> tuple[BatchLayout, list[int]]:
    """The reference rows (all on z_t with the inversion prompt) and, per style row, its reference."""
    rows_per_style = 2 if with_uncond else 1
    if reference_model == "base":
        return BatchLayout([latent], [embedding], [BASE_ROW]), [0] * (rows_per_style * len(styles))
    layout = BatchLayout()
    for style in styles:
        layout.add(latent, embedding, style.adapter)
    sources = [k for k in range(len(styles)) for _ in range(rows_per_style)]
    return layout, sources


def _unet_outputs(
    unet, injector: Injector, reference_mode: str, step: int, t: torch.Tensor,
    reference: Optional[tuple[BatchLayout, list[int]]], styles: BatchLayout,
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """The UNet outputs of the reference rows (None when they are not run) and of the style rows."""
    timestep = t.to(styles.latents[0].device)
    if reference is None:
        injector.set_step(step, t, ReferenceMode.BATCH_ROW)
        return None, _run_unet(unet, styles, timestep)
    layout, sources = reference
    if reference_mode == "batch":
        injector.set_step(step, t, ReferenceMode.BATCH_ROW, sources)
        outputs = _run_unet(unet, layout + styles, timestep)
        return outputs[: len(layout.latents)], outputs[len(layout.latents) :]
    injector.set_step(step, t, ReferenceMode.RECORD, sources)
    reference_output = _run_unet(unet, layout, timestep)
    injector.set_step(step, t, ReferenceMode.REPLAY, sources)
    return reference_output, _run_unet(unet, styles, timestep)


def _finite_unet_outputs(unet, injector: Injector, reference_mode: str, step: int, t: torch.Tensor, reference, styles):
    """`_unet_outputs`, run again in float32 when a half-precision call gives NaN or inf."""
    outputs = _unet_outputs(unet, injector, reference_mode, step, t, reference, styles)
    if _all_finite(outputs) or unet.dtype == torch.float32:
        return outputs
    reference_float = (_as_float(reference[0]), reference[1]) if reference else None
    with float32_model(unet):
        outputs = _unet_outputs(unet, injector, reference_mode, step, t, reference_float, _as_float(styles))
    return tuple(None if o is None else o.to(styles.latents[0].dtype) for o in outputs)


def _all_finite(outputs) -> bool:
    return all(o is None or bool(torch.isfinite(o).all()) for o in outputs)


def _as_float(layout: BatchLayout) -> BatchLayout:
    return BatchLayout([x.float() for x in layout.latents], [e.float() for e in layout.embeddings], list(layout.adapters))


@contextlib.contextmanager
def float32_model(model: torch.nn.Module) -> Iterator[None]:
    """The model in float32 inside the block; every parameter and buffer gets its own dtype back."""
    tensors = list(model.parameters()) + list(model.buffers())
    dtypes = [t.dtype for t in tensors]
    for tensor in tensors:
        tensor.data = tensor.data.float()
    try:
        yield
    finally:
        for tensor, dtype in zip(tensors, dtypes):
            tensor.data = tensor.data.to(dtype)


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


@torch.no_grad()
def denoise_with_injection(
    unet: torch.nn.Module,
    trajectory: torch.Tensor,
    reference_embedding: torch.Tensor,
    styles: list[StyleRows],
    schedule: DDIMSchedule,
    injection: InjectionConfig,
    sampling: SamplingConfig,
    callback: Optional[StepCallback] = None,
    progress: bool = True,
) -> list[torch.Tensor]:
    """Denoise every style from z_T = trajectory[0]; returns each style's final latent [1, C, h, w].

    The UNet's adapters must be set (`lora.set_adapter_scales`) to those named by `styles`.
    """
    job = DenoiseJob(trajectory, reference_embedding, styles)
    return denoise_jobs(unet, [job], schedule, injection, sampling, callback, progress)[0]


def _joint_reference_layout(
    jobs: list[DenoiseJob], step: int, reference_model: str, with_uncond: bool,
) -> tuple[BatchLayout, list[int], list[list[int]]]:
    """The reference rows of all jobs, for every style row (in job order) the index of its
    reference row among them, and each job's reference rows.

    Jobs of one content (the same trajectory tensor and inversion prompt) share their reference
    rows: with `reference_model: base` a content's styles in product pairing need one row, not
    one per job. A row depends only on (trajectory, prompt, adapter), so sharing changes no value.
    """
    layout, sources, job_rows = BatchLayout(), [], []
    known: dict[tuple[int, str], int] = {}  # (trajectory, adapter) -> its row in `layout`
    for job in jobs:
        job_layout, job_sources = _reference_layout(
            job.styles, job.trajectory[step : step + 1], job.reference_embedding, reference_model, with_uncond
        )
        rows = []
        for latent, embedding, adapter in zip(job_layout.latents, job_layout.embeddings, job_layout.adapters):
            key = (id(job.trajectory), adapter)
            shared = known.get(key)
            if shared is None or not torch.equal(layout.embeddings[shared], embedding):
                shared = known[key] = len(layout.latents)
                layout.add(latent, embedding, adapter)
            rows.append(shared)
        sources += [rows[source] for source in job_sources]
        job_rows.append(rows)
    return layout, sources, job_rows


@torch.no_grad()
def denoise_jobs(
    unet: torch.nn.Module,
    jobs: list[DenoiseJob],
    schedule: DDIMSchedule,
    injection: InjectionConfig,
    sampling: SamplingConfig,
    callback: Optional[StepCallback] = None,
    progress: bool = True,
) -> list[list[torch.Tensor]]:
    """Denoise several jobs of one latent size together, every step in ONE UNet call (rows of
    different contents and styles side by side); per job, each style's final latent [1, C, h, w].

    Each style row is injected from its own job's reference rows only, and fused with its own
    job's trajectory, so a job's result does not depend on the jobs it shares the call with.
    """
    if not jobs or any(not job.styles for job in jobs):
        raise ValueError("at least one style per job is needed")
    with_uncond = sampling.uses_uncond
    rows_per_style = 2 if with_uncond else 1
    latents = [[job.trajectory[0:1].clone() for _ in job.styles] for job in jobs]
    injector = Injector(unet, injection)
    with injector.installed():
        for i in tqdm(range(schedule.num_steps), desc="Stylizing", disable=not progress, leave=False):
            t = schedule.timesteps[i]
            style_layout = BatchLayout()
            for job, job_latents in zip(jobs, latents):
                style_layout = style_layout + _style_layout(job.styles, job_latents, with_uncond)
            reference, job_rows = None, [[] for _ in jobs]
            if injection.needs_reference(i):
                layout, sources, job_rows = _joint_reference_layout(jobs, i, injection.reference_model, with_uncond)
                reference = (layout, sources)
            reference_output, style_outputs = _finite_unet_outputs(
                unet, injector, sampling.reference, i, t, reference, style_layout
            )
            job_outputs = style_outputs.split([rows_per_style * len(job.styles) for job in jobs])
            for index, (job, outputs) in enumerate(zip(jobs, job_outputs)):
                guided = _guided_outputs(outputs, len(job.styles), with_uncond, sampling.guidance_scale)
                latents[index] = _denoised(latents[index], guided, job, schedule, i)
                if callback is not None:
                    job_reference = None if reference_output is None else reference_output[job_rows[index]]
                    callback(StepState(i, int(t), job_reference, guided, latents[index], job.id))
    return latents


def _denoised(latents: list[torch.Tensor], guided: list[torch.Tensor], job: DenoiseJob, schedule: DDIMSchedule, i: int) -> list[torch.Tensor]:
    """Each style latent one DDIM step further, set back to the content outside its mask (eq. 6)."""
    content_next = job.trajectory[i + 1 : i + 2]
    moved = [
        fuse_with_content(
            ddim_step(x, out, schedule.alphas[i], schedule.alphas[i + 1], schedule.prediction_type),
            content_next,
            style.mask,
        )
        for x, out, style in zip(latents, guided, job.styles)
    ]
    for latent, style in zip(moved, job.styles):
        check_finite(latent, style.label, i)
    return moved
