"""StyleID (Chung et al., "Style Injection in Diffusion", CVPR 2024): training-free, from the style image.

The style image is inverted like the content (DDIM at the sampler's timesteps, the empty prompt).
Then the stylized latent is denoised with the base model and no text and no guidance, starting from
the content's inverted latent AdaIN-ed to the style's (per channel: (z_c - mean_c) / (std_c + 1e-4)
* std_s + mean_s), and in the self-attention of the chosen layers:

    Q = tau * (gamma * Q_content + (1 - gamma) * Q_stylized)       query preservation, temperature
    K = K_style,  V = V_style                                       style injection

with gamma 0.75 and tau 1.5 (the authors' defaults) at every step. The authors record Q_content,
K_style and V_style during the two inversions (every layer, every step: gigabytes per image). Here
they are recomputed in the same denoiser call as the stylized row from the stored trajectories
(latents, as contents are stored): at step i the content and style rows are the trajectories at
the level the inversion evaluated at timestep t_i (DDIM: the level below, `Backbone.inversion_level`),
which gives the authors' values. Per step and style: one content row (shared by a job's styles), one
style row, one stylized row.

Layers (`StyleIDConfig.layers`, rule `styleid`): the authors' decoder layers 7-11 on SD 1.x / 2.x
(the self-attention of `up_blocks[2].attentions[1:]` and `up_blocks[3]`: from the second layer of the
second-finest attention level on); the same place on SDXL (layers 1-5); on a transformer the last
5/12 of the blocks (as 7-11 are the last 5 of SD's 12 decoder layers), its joint attention's image
tokens (text tokens never injected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from diffstyler.backbones import Backbone, Site
from diffstyler.backbones.base import STYLEID_RULES, check_layer_selection
from diffstyler.errors import config_error
from diffstyler.lora import BASE_ROW
from diffstyler.methods.base import Method, RowsOfMethod, Source, rows_of, sources_of

ADAIN_EPSILON = 1e-4  # the authors' code


@dataclass
class StyleIDConfig:
    """StyleID's training-free transfer from a style image (Chung et al., CVPR 2024).

    Args:
        gamma: query preservation: the stylized rows' queries are gamma times the content's plus
            (1 - gamma) times their own (the authors' 0.75; 1 keeps the content's layout, 0 none of it).
        tau: attention temperature: the queries are scaled by tau before the softmax (the authors'
            1.5; larger sharpens the attention to the style's keys).
        adain: start from the content's inverted latent AdaIN-ed to the style's (per channel mean
            and standard deviation), as the authors do; false starts from the content's.
        layers: the layers whose self-attention takes the style's keys and values: numbers, or the
            rule `styleid` (SD 1.x / 2.x: decoder layers 7-11, the authors'; SDXL: 1-5; SD 3.5 /
            FLUX.1: the last 5/12 of the blocks).
    """

    gamma: float = 0.75
    tau: float = 1.5
    adain: bool = True
    layers: list[Union[int, str]] = field(default_factory=lambda: ["styleid"])

    def __post_init__(self) -> None:
        self.layers = [self.layers] if isinstance(self.layers, (int, str)) else list(self.layers)
        check_layer_selection(self.layers, STYLEID_RULES, "model.styleid.layers")
        for key in ("gamma", "tau"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise config_error(f"model.styleid.{key}", f"must be a finite number, got {value!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise config_error("model.styleid.gamma", f"must be in 0..1, got {self.gamma}")
        if self.tau <= 0:
            raise config_error("model.styleid.tau", f"must be > 0, got {self.tau}")


def adain(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """The content latent with the style latent's per-channel mean and standard deviation."""
    dims = tuple(range(2, content.dim()))
    normalised = (content - content.mean(dim=dims, keepdim=True)) / (content.std(dim=dims, keepdim=True) + ADAIN_EPSILON)
    return normalised * style.std(dim=dims, keepdim=True) + style.mean(dim=dims, keepdim=True)


class StyleIDMethod(Method):
    """StyleID with `config` (layers resolved to numbers) on a backbone whose inversion evaluated
    timestep t_i at trajectory level i + `level_offset`."""

    name = "styleid"
    guided = False  # no text, no guidance

    def __init__(self, config: StyleIDConfig, level_offset: int):
        self.config = config
        self.level_offset = level_offset

    def sources(self, trajectory: torch.Tensor, style: Any, step: int) -> list[Source]:
        level = step + self.level_offset
        return [Source("content", trajectory, level, BASE_ROW), Source("style", style.style_trajectory, level, BASE_ROW)]

    def initial_latent(self, trajectory: torch.Tensor, style: Any) -> torch.Tensor:
        if not self.config.adain:
            return trajectory[0:1].clone()
        return adain(trajectory[0:1].float(), style.style_trajectory[0:1].float()).to(trajectory.dtype)

    def sites(self, backbone: Backbone) -> list[Site]:
        return [site for layer in self.config.layers for site in backbone.attention_sites(layer, "self", ("to_q", "to_k", "to_v"))]

    def active(self, site: Site, step: int) -> bool:
        return True

    def rewrite(self, site: Site, values: torch.Tensor, references: torch.Tensor, first_style_row: int,
                rows: RowsOfMethod, timestep: float) -> torch.Tensor:
        injected = values.clone()
        index = rows_of(values, first_style_row, rows)
        if site.key.endswith("to_q"):
            content = references[sources_of(values, rows, "content")]
            gamma, tau = self.config.gamma, self.config.tau
            injected[index] = tau * (gamma * content + (1 - gamma) * values[index])
        else:  # to_k, to_v: the style's
            injected[index] = references[sources_of(values, rows, "style")]
        return injected

    def settings(self) -> dict[str, Any]:
        return {"gamma": self.config.gamma, "tau": self.config.tau, "adain": self.config.adain, "layers": list(self.config.layers)}
