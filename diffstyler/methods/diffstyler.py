"""DiffStyler (the paper): a LoRA per style, the content's features and attention injected.

Per step, a style row reads one reference row: the content's inverted latent z_t = trajectory[i]
with the inversion prompt, run by the base model (`reference_model: base`, the paper's text) or
through the style's own LoRA (`style`, the paper's code), while an injection window is open. Its
hooks (`injection.InjectionConfig`: layers, sites, windows) give the style rows the reference
row's features (eq. 4) and attention queries and keys (eq. 5); the style rows keep their own
uncond / cond rows for classifier-free guidance.
"""

from __future__ import annotations

from typing import Any

import torch

from diffstyler.backbones import Backbone, Site
from diffstyler.injection import InjectionConfig
from diffstyler.lora import BASE_ROW
from diffstyler.methods.base import Method, RowsOfMethod, Source, rows_of, sources_of


class DiffStylerMethod(Method):
    """The paper's method with `injection` (resolved: layer numbers, windows in steps)."""

    name = "diffstyler"
    guided = True

    def __init__(self, injection: InjectionConfig):
        self.injection = injection

    def sources(self, trajectory: torch.Tensor, style: Any, step: int) -> list[Source]:
        if not self.injection.needs_reference(step):
            return []
        adapter = BASE_ROW if self.injection.reference_model == "base" else style.adapter
        return [Source("reference", trajectory, step, adapter)]

    def sites(self, backbone: Backbone) -> list[Site]:
        config = self.injection
        sites = [backbone.feature_site(layer, config.feature_site) for layer in config.feature_layers] if config.features else []
        switches = {"self": config.self_attention, "cross": config.cross_attention}
        for kind in backbone.attention_kinds():
            if switches[kind]:
                sites += [site for layer in config.attention_layers for site in backbone.attention_sites(layer, kind)]
        return sites

    def active(self, site: Site, step: int) -> bool:
        return self.injection.features_on(step) if site.kind == "feature" else self.injection.attention_on(step)

    def rewrite(self, site: Site, values: torch.Tensor, references: torch.Tensor, first_style_row: int,
                rows: RowsOfMethod, timestep: float) -> torch.Tensor:
        rate = 1.0 if site.kind == "feature" else self.qk_rate(timestep)
        # A row of a tensor cannot be written from a view of the same tensor: copy first.
        injected = values.clone()
        source = references[sources_of(values, rows, "reference")]
        if len(rows.rows) == values.shape[0] - first_style_row:  # every style row: one slice
            style = injected[first_style_row:]
            style.copy_(source) if rate >= 1.0 else style.lerp_(source, rate)
            return injected
        index = rows_of(values, first_style_row, rows)
        injected[index] = source if rate >= 1.0 else torch.lerp(injected[index], source, rate)
        return injected

    def qk_rate(self, timestep: float) -> float:
        """1, or the paper code's blend rate min(1, 2t/1000) (`qk_mix: timestep_rate`)."""
        if self.injection.qk_mix == "replace":
            return 1.0
        return min(1.0, 2.0 * timestep / 1000.0)
