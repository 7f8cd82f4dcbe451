"""Backbones: one module per kind of denoiser (`base.Backbone` is the interface).

- `unet`: SD 1.x, SD 2.x (epsilon, v) and SDXL; a UNet sampled with DDIM.
- `mmdit`: SD 3.5 and FLUX.1; a multimodal diffusion transformer sampled by flow matching.

`backbone_for(pipe)` wraps a loaded diffusers pipeline in its kind's backbone; `KINDS` is what
`models.load_pipeline` asks to recognise and load a model.
"""

from __future__ import annotations

from typing import Any

import torch

from diffstyler.backbones.base import (
    ATTENTION_RULES,
    FEATURE_RULES,
    Backbone,
    BackboneKind,
    Layer,
    LayerMap,
    ModelFamily,
    Site,
    check_layer_selection,
)
from diffstyler.backbones.mmdit import MMDIT, MMDiTBackbone
from diffstyler.backbones.unet import UNET, UNetBackbone

KINDS: tuple[BackboneKind, ...] = (UNET, MMDIT)

_BACKBONE = "_diffstyler_backbone"  # (denoiser, its backbone), kept in the pipeline's __dict__


def kind_of(pipe: Any) -> BackboneKind | None:
    """The kind whose denoiser the pipeline holds, None for none we know."""
    for kind in KINDS:
        denoiser = getattr(pipe, kind.denoiser_subfolder, None)
        if isinstance(denoiser, kind.denoiser_classes):
            return kind
    return None


def kind_of_denoiser(denoiser: torch.nn.Module) -> BackboneKind:
    """The kind of a denoiser module (a UNet, a transformer)."""
    for kind in KINDS:
        if isinstance(denoiser, kind.denoiser_classes):
            return kind
    raise ValueError(f"no backbone kind for a {type(denoiser).__name__}")


def backbone_for(pipe: Any) -> Backbone:
    """The pipeline's backbone (made once per pipeline: it caches its layer map)."""
    cached = pipe.__dict__.get(_BACKBONE)
    kind = kind_of(pipe)
    if kind is None:
        raise ValueError(f"no backbone for a {type(pipe).__name__}: its denoiser is none of {'; '.join(k.families for k in KINDS)}")
    denoiser = getattr(pipe, kind.denoiser_subfolder)
    if cached is None or cached[0] is not denoiser:  # a replaced denoiser gets a new map
        cached = (denoiser, kind.backbone(pipe))
        pipe.__dict__[_BACKBONE] = cached
    return cached[1]


__all__ = [
    "ATTENTION_RULES", "FEATURE_RULES", "KINDS", "Backbone", "BackboneKind", "Layer", "LayerMap", "ModelFamily", "Site",
    "MMDiTBackbone", "UNetBackbone", "backbone_for", "check_layer_selection", "kind_of", "kind_of_denoiser",
]
