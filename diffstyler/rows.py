"""The rows of one denoiser call during stylization: built, run, sliced and counted in one place.

At every denoising step the denoiser (a UNet, a transformer) runs ONE batch:

    reference rows   what the styles' methods read (`methods.base.Method.sources`): for DiffStyler
                     the content's inversion latent z_t = trajectory[i] with the inversion prompt,
                     run by the base model (`reference_model: base`) or through the style's LoRA
                     (`style`, the paper's code); for StyleID the content's and the style image's
                     trajectories at the level the inversion evaluated t_i at
    style rows       for each job, for each style: [uncond row,] cond row: the style's own latent,
                     its adapter, the negative / style prompt (a method that does not guide, as
                     StyleID, runs its cond row only)

Reference rows are shared wherever they are the same row (trajectory, level, prompt, adapter): the
jobs of one content share the content's rows. Style row j reads reference row `roles[j][role]`
(`injection.Injector` hands each method its rows). Once no method needs a reference at a step, a
call has no reference rows at all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch

from diffstyler.backbones import Backbone
from diffstyler.conditioning import Conditioning
from diffstyler.lora import route_adapters
from diffstyler.methods.base import Method, RowsOfMethod
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
    prompt's conditioning, its styles (`stylize.StyleRows`: adapter, cond / uncond conditionings),
    each style's method and current latent."""

    trajectory: torch.Tensor
    reference: Conditioning
    styles: tuple[Any, ...]
    methods: tuple[Method, ...]
    latents: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class RowLayout:
    references: tuple[Row, ...]
    styles: tuple[Row, ...]
    roles: tuple[dict[str, int], ...]  # per style row: the reference row of each role it reads
    row_methods: tuple[Method, ...]  # per style row: its method
    job_references: tuple[tuple[int, ...], ...]  # per job: the indices of its reference rows
    job_styles: tuple[tuple[int, ...], ...]  # per job, per style: its number of rows (2 with an uncond row)

    @classmethod
    def for_step(cls, jobs: Sequence[JobRows], step: int, with_uncond: bool) -> "RowLayout":
        """The rows of step `step`; `with_uncond`: the guided methods' styles run a negative row."""
        references: list[Row] = []
        known: dict[tuple[int, int, str], int] = {}  # (trajectory, level, adapter) -> its reference row
        styles: list[Row] = []
        roles: list[dict[str, int]] = []
        row_methods: list[Method] = []
        job_references: list[tuple[int, ...]] = []
        job_styles: list[tuple[int, ...]] = []
        for job in jobs:
            used: list[int] = []
            counts = []
            for style, method, latent in zip(job.styles, job.methods, job.latents):
                style_roles = {}
                for source in method.sources(job.trajectory, style, step):
                    row = Row(source.trajectory[source.level : source.level + 1], job.reference, source.adapter)
                    key = (id(source.trajectory), source.level, source.adapter)
                    shared = known.get(key)
                    # A reference row depends only on (trajectory, level, prompt, adapter): sharing changes no value.
                    if shared is None or not references[shared].conditioning.equals(row.conditioning):
                        shared = known[key] = len(references)
                        references.append(row)
                    style_roles[source.role] = shared
                    used += [] if shared in used else [shared]
                rows = ([Row(latent, style.uncond, style.adapter)] if with_uncond and method.guided else []) + \
                    [Row(latent, style.cond, style.adapter)]
                styles += rows
                roles += [style_roles] * len(rows)
                row_methods += [method] * len(rows)
                counts.append(len(rows))
            job_references.append(tuple(used))
            job_styles.append(tuple(counts))
        return cls(tuple(references), tuple(styles), tuple(roles), tuple(row_methods), tuple(job_references), tuple(job_styles))

    @property
    def sources(self) -> tuple[int, ...]:
        """DiffStyler's: the reference row of each style row that reads one."""
        return tuple(roles["reference"] for roles in self.roles if "reference" in roles)

    def rows_of(self, method: Method) -> RowsOfMethod:
        """The style rows of `method` and the reference rows each reads."""
        rows = tuple(index for index, row_method in enumerate(self.row_methods) if row_method is method)
        return RowsOfMethod(rows, tuple(self.roles[index] for index in rows))

    @property
    def num_references(self) -> int:
        return len(self.references)

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
        """Per job, per style: the guided output (classifier-free guidance of its uncond and cond
        rows; a style with one row: that row's output)."""
        per_style = style_output.split([count for counts in self.job_styles for count in counts])
        guided, index = [], 0
        for counts in self.job_styles:
            outputs = per_style[index : index + len(counts)]
            index += len(counts)
            guided.append([classifier_free_guidance(rows[0:1], rows[1:2], guidance_scale) if len(rows) == 2 else rows
                           for rows in outputs])
        return guided

    def job_reference_output(self, reference_output: Optional[torch.Tensor], job: int) -> Optional[torch.Tensor]:
        """The output of job `job`'s own reference rows (None when the call had none)."""
        if reference_output is None:
            return None
        return reference_output[list(self.job_references[job])]


def rows_per_job(job: JobRows, with_uncond: bool) -> int:
    """A job's rows in one call at its first step (every window open): what the predictor's
    `max_unet_rows` cap counts."""
    layout = RowLayout.for_step([job], 0, with_uncond)
    return len(layout.references) + len(layout.styles)
