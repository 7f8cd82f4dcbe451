"""Cross-LoRA feature and attention injection (paper section III-C, eq. 4 and 5).

Decoder layer i of SD's UNet is `up_blocks[i // 3]`, resnet and attention `i % 3`: 12 layers, the
first three (up_blocks[0]) without attention. The paper injects features in layers 4-11 and
self- and cross-attention in all decoder layers.

Everything is done with forward hooks, installed for a run and removed afterwards:
- feature injection: a hook on the layer's resnet replaces the style rows' output with the
  reference row's;
- attention injection: hooks on the attention's `to_q` and `to_k` give the style rows the
  reference row's queries and keys. softmax(Q K^T) is then the reference's attention
  probabilities while V stays the style row's own, which is the paper's attention injection
  without materialising the probability matrices (scaled-dot-product attention stays usable).

Where the reference comes from:
- `ReferenceMode.BATCH_ROW`: row 0 of the same UNet call (one forward for reference and styles);
- `ReferenceMode.RECORD` / `REPLAY`: a separate base-model forward records row 0, a later
  forward injects the recording into every row (same result, two calls; used to check the one).
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional

import torch
from diffusers import UNet2DConditionModel

NUM_DECODER_LAYERS = 12
ATTENTION_DECODER_LAYERS = list(range(3, 12))  # up_blocks[0] has no attention in SD


@dataclass
class InjectionConfig:
    """Which activations of the reference (content) pass are injected, where and when.

    Steps count from the start of denoising: `feature_steps` 30 means steps 0-29 of 50.
    qk_mix "replace" gives the style rows the reference's Q and K; "timestep_rate" blends them with
    rate min(1, 2t/1000) as the paper's public code does.
    feature_site "output" injects the resnet's output (the paper's text); "residual" injects its
    residual branch (conv2, before the skip connection is added), as the paper's public code and
    Plug-and-Play do, so the style rows keep their own skip path.
    """

    features: bool = True
    self_attention: bool = True
    cross_attention: bool = True
    feature_layers: list[int] = field(default_factory=lambda: list(range(4, 12)))
    attention_layers: list[int] = field(default_factory=lambda: list(ATTENTION_DECODER_LAYERS))
    feature_steps: int = 30
    attention_steps: int = 25
    qk_mix: Literal["replace", "timestep_rate"] = "replace"
    feature_site: Literal["output", "residual"] = "output"

    def __post_init__(self) -> None:
        for layer in self.feature_layers:
            if not 0 <= layer < NUM_DECODER_LAYERS:
                raise ValueError(f"injection.feature_layers: decoder layer {layer} does not exist (0-11)")
        for layer in self.attention_layers:
            if layer not in ATTENTION_DECODER_LAYERS:
                raise ValueError(
                    f"injection.attention_layers: decoder layer {layer} has no attention "
                    f"(layers with attention: {ATTENTION_DECODER_LAYERS[0]}-{ATTENTION_DECODER_LAYERS[-1]})"
                )
        if self.feature_steps < 0 or self.attention_steps < 0:
            raise ValueError("injection.feature_steps and injection.attention_steps must be >= 0")
        if self.qk_mix not in ("replace", "timestep_rate"):
            raise ValueError(f"injection.qk_mix must be 'replace' or 'timestep_rate', got {self.qk_mix!r}")
        if self.feature_site not in ("output", "residual"):
            raise ValueError(f"injection.feature_site must be 'output' or 'residual', got {self.feature_site!r}")

    def features_on(self, step: int) -> bool:
        return self.features and bool(self.feature_layers) and step < self.feature_steps

    def attention_on(self, step: int) -> bool:
        attention = self.self_attention or self.cross_attention
        return attention and bool(self.attention_layers) and step < self.attention_steps

    def needs_reference(self, step: int) -> bool:
        return self.features_on(step) or self.attention_on(step)


def decoder_resnet(unet: UNet2DConditionModel, layer: int) -> torch.nn.Module:
    return unet.up_blocks[layer // 3].resnets[layer % 3]


def decoder_attentions(unet: UNet2DConditionModel, layer: int, kind: Literal["self", "cross"]) -> list[torch.nn.Module]:
    """The attention modules (attn1 = self, attn2 = cross) of every transformer block of a layer."""
    block = unet.up_blocks[layer // 3]
    attentions = getattr(block, "attentions", None)
    if not attentions:
        raise ValueError(f"decoder layer {layer} has no attention")
    name = "attn1" if kind == "self" else "attn2"
    return [getattr(t, name) for t in attentions[layer % 3].transformer_blocks]


class ReferenceMode(enum.Enum):
    BATCH_ROW = "batch_row"
    RECORD = "record"
    REPLAY = "replay"


class Injector:
    """Holds the per-step state the hooks read; install it with `installed()`."""

    def __init__(self, unet: UNet2DConditionModel, config: InjectionConfig):
        self.unet = unet
        self.config = config
        self.step = 0
        self.timestep = 0
        self.mode = ReferenceMode.BATCH_ROW
        self.recorded: dict[str, torch.Tensor] = {}

    def set_step(self, step: int, timestep: int, mode: ReferenceMode = ReferenceMode.BATCH_ROW) -> None:
        self.step, self.timestep, self.mode = step, int(timestep), mode
        if mode is ReferenceMode.RECORD:
            self.recorded = {}

    # -- hooks ---------------------------------------------------------------------------------

    def _sites(self) -> Iterator[tuple[str, str, torch.nn.Module]]:
        """(key, kind, module) for every module whose output may be injected."""
        config = self.config
        if config.features:
            for layer in config.feature_layers:
                resnet = decoder_resnet(self.unet, layer)
                yield f"feature.{layer}", "feature", resnet if config.feature_site == "output" else resnet.conv2
        kinds = [k for k, on in (("self", config.self_attention), ("cross", config.cross_attention)) if on]
        for kind in kinds:
            for layer in config.attention_layers:
                for block, attention in enumerate(decoder_attentions(self.unet, layer, kind)):
                    for projection in ("to_q", "to_k"):
                        key = f"{kind}.{layer}.{block}.{projection}"
                        yield key, "attention", getattr(attention, projection)

    @contextlib.contextmanager
    def installed(self) -> Iterator["Injector"]:
        handles = [module.register_forward_hook(self._hook(key, kind)) for key, kind, module in self._sites()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, key: str, kind: str):
        def hook(module, args, output):
            active = self.config.features_on(self.step) if kind == "feature" else self.config.attention_on(self.step)
            if not active:
                return None
            rate = 1.0 if kind == "feature" else self._qk_rate()
            return self._inject(key, output, rate)

        return hook

    def _qk_rate(self) -> float:
        if self.config.qk_mix == "replace":
            return 1.0
        return min(1.0, 2.0 * self.timestep / 1000.0)

    def _inject(self, key: str, output: torch.Tensor, rate: float) -> Optional[torch.Tensor]:
        if self.mode is ReferenceMode.RECORD:
            self.recorded[key] = output[:1].detach().clone()
            return None
        if self.mode is ReferenceMode.BATCH_ROW:
            reference, first_style_row = output[:1], 1
        else:
            reference, first_style_row = self.recorded[key], 0
        # A row of a tensor cannot be written from a view of the same tensor: copy first.
        injected = output.clone()
        style = injected[first_style_row:]
        if rate >= 1.0:
            style.copy_(reference.expand_as(style))
        else:
            style.mul_(1.0 - rate).add_(rate * reference)
        return injected
