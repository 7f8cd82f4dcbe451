"""The rows of one denoiser call during stylization: built, run, sliced and counted in one place.

At every denoising step the denoiser (a UNet, a transformer) runs ONE batch:

    reference rows   the content's inversion latent z_t = trajectory[i] with the inversion prompt:
                     one row run by the base model (`reference_model: base`), or one row per style
                     run through that style's LoRA (`reference_model: style`, the paper's code)
    style rows       for each job, for each style: [uncond row,] cond row: the style's own latent,
                     its adapter, the negative / style prompt

Jobs of one content (the same trajectory tensor and inversion prompt) share their reference rows.
Style row j is injected from reference row `sources[j]` (`injection.Injector` reads the layout).
Once no injection window is open, a call has no reference rows at all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from diffstyler.backbones import Backbone
from diffstyler.conditioning import Conditioning
from diffstyler.lora import BASE_ROW, route_adapters
from diffstyler.sampling import classifier_free_guidance


@dataclass(frozen=True)
class Row:
    """One row of a denoiser call: its latent [1, C, h, w], its conditioning (one row) and its adapter."""

    latent: torch.Tensor
    conditioning: Conditioning
    adapter: str

    def as_float(self) -> "Row":
        return Row(self.latent.float(), self.conditioning.to(torch.float32), self.adapter)


@dataclass(frozen=True)
class JobRows:
    """What one job brings to the call: its trajectory (for its reference rows), its inversion
    prompt's conditioning, and per style the adapter, the cond / uncond conditionings and the
    style's current latent."""

    trajectory: torch.Tensor
    reference: Conditioning
    adapters: tuple[str, ...]
    cond: tuple[Conditioning, ...]
    uncond: tuple[Conditioning, ...]
    latents: tuple[torch.Tensor, ...]


def rows_per_job(num_styles: int, reference_model: str, with_uncond: bool) -> int:
    """A job's rows in one denoiser call while the reference runs: its reference rows (one, or one per
    style with `reference_model: style`), then each style's (uncond and) cond row."""
    references = 1 if reference_model == "base" else num_styles
    return references + (2 if with_uncond else 1) * num_styles


@dataclass(frozen=True)
class RowLayout:
    references: tuple[Row, ...]
    styles: tuple[Row, ...]
    sources: tuple[int, ...]  # style row j is injected from reference row sources[j]
    job_references: tuple[tuple[int, ...], ...]  # per job: the indices of its reference rows
    job_styles: tuple[int, ...]  # per job: its number of styles
    with_uncond: bool

    @classmethod
    def for_step(cls, jobs: Sequence[JobRows], step: int, reference_model: str, with_uncond: bool,
                 with_references: bool) -> "RowLayout":
        """The rows of step `step` (reference rows only when an injection window is open)."""
        styles = [row for job in jobs for row in _style_rows(job, with_uncond)]
        references: list[Row] = []
        sources: list[int] = []
        job_references: list[tuple[int, ...]] = []
        if with_references:
            known: dict[tuple[int, str], int] = {}  # (trajectory, adapter) -> its reference row
            for job in jobs:
                rows = []
                for adapter in _reference_adapters(job, reference_model):
                    row = Row(job.trajectory[step : step + 1], job.reference, adapter)
                    shared = known.get((id(job.trajectory), adapter))
                    # A reference row depends only on (trajectory, prompt, adapter): sharing changes no value.
                    if shared is None or not references[shared].conditioning.equals(row.conditioning):
                        shared = known[(id(job.trajectory), adapter)] = len(references)
                        references.append(row)
                    rows.append(shared)
                per_style = [rows[0]] * len(job.adapters) if reference_model == "base" else rows
                sources += [source for source in per_style for _ in range(2 if with_uncond else 1)]
                job_references.append(tuple(rows))
        else:
            job_references = [() for _ in jobs]
        return cls(tuple(references), tuple(styles), tuple(sources), tuple(job_references),
                   tuple(len(job.adapters) for job in jobs), with_uncond)

    @property
    def num_references(self) -> int:
        return len(self.references)

    @property
    def rows_per_style(self) -> int:
        return 2 if self.with_uncond else 1

    def as_float(self) -> "RowLayout":
        return replace(self, references=tuple(r.as_float() for r in self.references),
                       styles=tuple(r.as_float() for r in self.styles))

    def run(self, backbone: Backbone, timestep: torch.Tensor, rows: str = "all", guidance: Optional[float] = None) -> torch.Tensor:
        """The denoiser's output on `rows`: "all" (reference rows first), "references" or "styles"."""
        chosen = {"all": self.references + self.styles, "references": self.references, "styles": self.styles}[rows]
        with route_adapters(backbone.denoiser, [row.adapter for row in chosen]):
            return backbone.predict(torch.cat([row.latent for row in chosen]), timestep,
                                    Conditioning.cat([row.conditioning for row in chosen]), guidance)

    def split_references(self, output: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """An "all" output as (reference rows' output or None, style rows' output)."""
        if not self.references:
            return None, output
        return output[: self.num_references], output[self.num_references :]

    def guided(self, style_output: torch.Tensor, guidance_scale: float) -> list[list[torch.Tensor]]:
        """Per job, per style: the guided output (classifier-free guidance of its uncond and cond rows)."""
        per_job = style_output.split([self.rows_per_style * count for count in self.job_styles])
        guided = []
        for count, outputs in zip(self.job_styles, per_job):
            if not self.with_uncond:
                guided.append(list(outputs.split(1)))
                continue
            pairs = outputs.view(count, 2, *outputs.shape[1:])
            guided.append([classifier_free_guidance(pair[0:1], pair[1:2], guidance_scale) for pair in pairs])
        return guided

    def job_reference_output(self, reference_output: Optional[torch.Tensor], job: int) -> Optional[torch.Tensor]:
        """The output of job `job`'s own reference rows (None when the call had none)."""
        if reference_output is None:
            return None
        return reference_output[list(self.job_references[job])]


def _style_rows(job: JobRows, with_uncond: bool) -> list[Row]:
    rows = []
    for adapter, cond, uncond, latent in zip(job.adapters, job.cond, job.uncond, job.latents):
        if with_uncond:
            rows.append(Row(latent, uncond, adapter))
        rows.append(Row(latent, cond, adapter))
    return rows


def _reference_adapters(job: JobRows, reference_model: str) -> list[str]:
    """The adapters of a job's reference rows: the base model once, or each style's own."""
    return [BASE_ROW] if reference_model == "base" else list(job.adapters)
