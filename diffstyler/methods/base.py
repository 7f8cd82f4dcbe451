"""How a style acts on the shared denoising: the method slot.

The pipeline's steps (inputs, masks, prompts, inversion, denoise, fuse, decode, composite) are
the same for every style. What a method changes is this interface, one module per method:

- `sources`: the reference rows a style row reads at a step (a trajectory at a level, run with an
  adapter and the job's reference prompt), by role ("reference" for DiffStyler; "content" and
  "style" for StyleID). Rows of one call are shared where they are the same latent and model.
- `negative_rows`: whether its style rows run a negative-prompt row for classifier-free guidance.
- `initial_latent`: where a style row starts (the content's inverted latent, or StyleID's AdaIN).
- `sites` and `rewrite`: where its hooks rewrite the style rows' activations, and how, from the
  reference rows of the call (`injection.Injector` installs them).
- `active` and `settings`: the steps it acts at, and what of it changes the pixels (recorded).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Optional

import torch

from diffstyler.backbones import Backbone, Site


@dataclass(frozen=True)
class Source:
    """A reference row a style row reads: `trajectory[level]`, run through `adapter` with the job's
    reference prompt; `role` is what the method calls it."""

    role: str
    trajectory: torch.Tensor
    level: int
    adapter: str


@dataclass(frozen=True)
class RowsOfMethod:
    """The style rows of one method in a call: their indices among the style rows, and for each
    the reference row (index among the call's reference rows) of every role it reads."""

    rows: tuple[int, ...]
    roles: tuple[dict[str, int], ...]


class Method(abc.ABC):
    """One way of applying a style (`methods.DiffStylerMethod`, `methods.StyleIDMethod`)."""

    name: str = ""

    @abc.abstractmethod
    def sources(self, trajectory: torch.Tensor, style: Any, step: int) -> list[Source]:
        """The reference rows style `style` of a job with content `trajectory` reads at `step` ([]: none)."""

    def negative_rows(self, backbone: Backbone, guidance_scale: float) -> bool:
        return backbone.negative_rows(guidance_scale)

    def initial_latent(self, trajectory: torch.Tensor, style: Any) -> torch.Tensor:
        """The style row's latent at the first step: the content's inverted z_T."""
        return trajectory[0:1].clone()

    @abc.abstractmethod
    def sites(self, backbone: Backbone) -> list[Site]:
        """The modules whose outputs the method rewrites."""

    @abc.abstractmethod
    def active(self, site: Site, step: int) -> bool:
        """Whether the method rewrites `site` at `step`."""

    @abc.abstractmethod
    def rewrite(self, site: Site, values: torch.Tensor, references: torch.Tensor, first_style_row: int,
                rows: RowsOfMethod, timestep: float) -> torch.Tensor:
        """`values` (every row of the call at `site`) with this method's style rows rewritten from
        `references` (the reference rows' values at the site); the other rows unchanged."""

    def settings(self) -> Optional[dict[str, Any]]:
        """What of the method changes the pixels, for the outputs' settings (None: nothing)."""
        return None


def rows_of(values: torch.Tensor, first_style_row: int, rows: RowsOfMethod) -> torch.Tensor:
    """The indices of the method's rows in `values` (reference rows lead the call)."""
    return torch.tensor([first_style_row + row for row in rows.rows], device=values.device)


def sources_of(values: torch.Tensor, rows: RowsOfMethod, role: str) -> torch.Tensor:
    """For each of the method's rows, the index of its `role` reference row."""
    return torch.tensor([roles[role] for roles in rows.roles], device=values.device)
