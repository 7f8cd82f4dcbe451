"""Cross-LoRA feature and attention injection (paper section III-C, eq. 4 and 5).

Decoder layer i is the i-th resnet of the UNet's up blocks in execution order, an attention layer
one followed by a transformer (`families.decoder_layers`, derived from the loaded UNet). SD 1.x and
2.x have 12 (up_blocks[i // 3].resnets[i % 3]; the first three without attention), SDXL 9 (the last
three without attention). The paper injects features in layers 4-11 and self- and cross-attention
in all decoder layers; `InjectionConfig`'s defaults are these as rules over the map (`paper`, `all`),
which give the paper's numbers on SD 1.x / 2.x and layers 1-8 / 0-5 on SDXL.

Everything is done with forward hooks, installed for a run and removed afterwards:
- feature injection: a hook on the layer's resnet (site "output") or on its last convolution
  (site "residual": the residual branch before the skip connection is added, as Plug-and-Play
  and the paper's code do) replaces the style rows' activations with their reference row's;
- attention injection: hooks on the attention's `to_q` and `to_k` give the style rows their
  reference row's queries and keys. softmax(Q K^T) is then the reference's attention
  probabilities while V stays the style row's own, which is the paper's attention injection
  without materialising the probability matrices (scaled-dot-product attention stays usable).

Which reference row feeds which style row comes from the call's `rows.RowLayout` (style row j
receives reference row `sources[j]`): one base-model reference row for every style
(`reference_model: base`, the paper's text), or one reference row per style run through that
style's LoRA (`reference_model: style`, the paper's public code).

Where the reference rows come from:
- `ReferenceMode.BATCH_ROW`: the first `layout.num_references` rows of the same UNet call (one forward for all);
- `ReferenceMode.RECORD` / `REPLAY`: a separate forward records the reference rows, a later
  forward injects the recording into the style rows (same result, two calls).

Dominated settings: replacing a resnet's whole *output* erases everything the style rows computed
before it in the decoder (the decoder is a chain: apart from the encoder's skip connections, a
decoder module's only input is the hidden state of the module before it). `ineffective_sites`
derives, from the map's execution order, which configured sites then have no effect at all.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass, field, replace
from typing import Iterator, Literal, Optional, Union

import torch
from diffusers import UNet2DConditionModel

from diffstyler.errors import config_error
from diffstyler.families import ATTENTION_RULES, FEATURE_RULES, DecoderLayers, check_layer_selection, decoder_layers
from diffstyler.rows import RowLayout

FeatureSite = Literal["output", "residual"]
ReferenceModel = Literal["base", "style"]


@dataclass
class InjectionConfig:
    """Which activations of the reference (content) pass are injected, where and when.

    Steps count from the start of denoising: `feature_steps` 30 means steps 0-29 of 50. Layer
    numbers are checked against the UNet when it is loaded (`resolved`).

    Args:
        features: inject the reference's decoder resnet features (paper eq. 4; Fig. 6 ablation).
        self_attention: inject the reference's self-attention queries and keys (eq. 5).
        cross_attention: inject the reference's cross-attention queries and keys.
        feature_layers: decoder layer numbers, or one rule of the loaded UNet's map
            (`families.DecoderLayers`): `paper` (default; SD 1.x / 2.x: 4-11, SDXL: 1-8) or `pnp`
            (Plug-and-Play's layer; SD: 4, SDXL: 1).
        attention_layers: decoder layer numbers, or a rule: `all` (default: every decoder layer
            with attention; SD: 3-11, SDXL: 0-5) or `from_pnp` (SD: 4-11, SDXL: 1-5).
        feature_steps: the first denoising steps that get features injected (paper Fig. 7).
        attention_steps: the first denoising steps that get attention injected.
        qk_mix: "replace" gives the style rows the reference's Q and K; "timestep_rate" blends them
            with rate min(1, 2t/1000) as the paper's public code does.
        feature_site: "residual" (default) injects the resnet's residual branch (its conv2 output,
            before the skip connection is added), as Plug-and-Play, which the paper follows for its
            layers 4-11, and the paper's code do: the style rows keep their own skip path, so every
            injected layer counts. "output" replaces the resnet's whole output; then a later
            layer's injection erases every earlier one (`ineffective_sites` names them).
        reference_model: "base" runs the reference row with the base model (the paper's text:
            features "from the original model"); "style" gives each style its own reference row
            run through its own LoRA, as the paper's public code does.
    """

    features: bool = True
    self_attention: bool = True
    cross_attention: bool = True
    feature_layers: list[Union[int, str]] = field(default_factory=lambda: ["paper"])
    attention_layers: list[Union[int, str]] = field(default_factory=lambda: ["all"])
    feature_steps: int = 30
    attention_steps: int = 25
    qk_mix: Literal["replace", "timestep_rate"] = "replace"
    feature_site: FeatureSite = "residual"
    reference_model: ReferenceModel = "base"

    def __post_init__(self) -> None:
        # A single layer or rule name stands for a list of one, as on the command line.
        self.feature_layers = as_layer_list(self.feature_layers)
        self.attention_layers = as_layer_list(self.attention_layers)
        check_layer_selection(self.feature_layers, FEATURE_RULES, "model.injection.feature_layers")
        check_layer_selection(self.attention_layers, ATTENTION_RULES, "model.injection.attention_layers")
        for key in ("feature_steps", "attention_steps"):
            if getattr(self, key) < 0:
                raise config_error(f"model.injection.{key}", f"must be >= 0, got {getattr(self, key)}")
        choices = {"qk_mix": ("replace", "timestep_rate"), "feature_site": ("output", "residual"),
                   "reference_model": ("base", "style")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise config_error(f"model.injection.{key}", f"must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")

    def resolved(self, decoder: DecoderLayers) -> "InjectionConfig":
        """This config with layer numbers for the rules, every layer checked against `decoder` (a
        one-line error naming the valid range). A resolved config is what the run records."""
        return replace(self, feature_layers=decoder.feature_layers(self.feature_layers),
                       attention_layers=decoder.attention_layer_numbers(self.attention_layers))

    def features_on(self, step: int) -> bool:
        return self.features and bool(self.feature_layers) and step < self.feature_steps

    def attention_on(self, step: int) -> bool:
        attention = self.self_attention or self.cross_attention
        return attention and bool(self.attention_layers) and step < self.attention_steps

    def needs_reference(self, step: int) -> bool:
        return self.features_on(step) or self.attention_on(step)


def as_layer_list(selection: "list[Union[int, str]] | int | str | None") -> Optional[list[Union[int, str]]]:
    return [selection] if isinstance(selection, (int, str)) else None if selection is None else list(selection)


# Named injection settings for the Python API (`DiffStylerPipeline(..., injection="paper_code")`);
# the CLI's presets are YAML overlays (configs/presets/), tested equal to these.
INJECTION_PRESETS: dict[str, InjectionConfig] = {
    # the paper's text: features in decoder layers 4-11 for 30 of 50 steps, SA and CA everywhere for 25
    "paper": InjectionConfig(),
    # the paper's public code (configs/presets/paper_code.yaml; it also inverts with 1000 steps:
    # inversion_substeps 20): features in PnP's layer (SD: 4, SDXL: 1), self-attention from there on
    # (SD: 4-11, SDXL: 1-5)
    "paper_code": InjectionConfig(
        cross_attention=False, feature_layers=["pnp"], attention_layers=["from_pnp"], feature_steps=25,
        attention_steps=25, qk_mix="timestep_rate", reference_model="style",
    ),
}


def injection_config(value: "InjectionConfig | str", argument: str = "injection") -> InjectionConfig:
    """An `InjectionConfig`, or one of `INJECTION_PRESETS` by name."""
    if isinstance(value, InjectionConfig):
        return value
    if value not in INJECTION_PRESETS:
        raise config_error(argument, f"unknown preset {value!r}; give an InjectionConfig or one of {', '.join(INJECTION_PRESETS)}")
    return INJECTION_PRESETS[value]


INJECTION_WINDOWS = ("feature_steps", "attention_steps")


def check_injection_window(injection: InjectionConfig, steps: int, prefix: str = "model.injection.") -> None:
    """Refuse an injection window longer than the sampling (`feature_steps: 99` with 50 steps): the
    config only knows the window, the caller the number of steps. `prefix` names the keys."""
    for key in INJECTION_WINDOWS:
        check_window_steps(getattr(injection, key), steps, prefix + key)


def check_window_steps(window: int, steps: int, key: str) -> None:
    if window > steps:
        raise config_error(key, f"must be in 0..{steps} (the number of sampling steps), got {window}")


# --- which configured sites can have an effect ------------------------------------------------

def decoder_execution_order(unet: UNet2DConditionModel) -> list[tuple[int, str]]:
    """(layer, "resnet" | "attention") in the order the UNet's decoder runs them. The test suite
    checks this order against the hooks of a real forward pass."""
    return decoder_layers(unet).execution_order()


def ineffective_sites(config: InjectionConfig, decoder: DecoderLayers) -> dict[str, list[int]]:
    """Configured injection layers that cannot change the result, by kind ("features", "attention").

    Rule: while an output-site feature injection at decoder layer L is active, the style rows'
    hidden state after resnet L is the reference's, whatever they computed before. Every site that
    runs before resnet L in the decoder is then irrelevant during L's window. A site is listed
    when that holds for its whole window: features share one window, so every feature layer
    before the last one is listed; an attention layer before it is listed when its window ends no
    later than the feature window.
    """
    config = config.resolved(decoder)
    if not (config.features and config.feature_site == "output" and config.feature_layers and config.feature_steps > 0):
        return {}
    order = decoder.execution_order()
    last_output = order.index((max(config.feature_layers), "resnet"))
    before = set(order[:last_output])
    dominated = {"features": sorted(l for l in config.feature_layers if (l, "resnet") in before)}
    attention_on = (config.self_attention or config.cross_attention) and config.attention_steps > 0
    if attention_on and config.attention_steps <= config.feature_steps:
        dominated["attention"] = sorted(l for l in config.attention_layers if (l, "attention") in before)
    return {kind: layers for kind, layers in dominated.items() if layers}


def describe_ineffective_sites(config: InjectionConfig, decoder: DecoderLayers) -> Optional[str]:
    """A one-paragraph warning naming the layers that have no effect, or None."""
    dominated = ineffective_sites(config, decoder)
    if not dominated:
        return None
    kinds = {"features": "feature", "attention": "attention"}
    named = " and ".join(f"{kinds[kind]} layers {layers}" for kind, layers in dominated.items())
    return (
        f"injection: with feature_site 'output', decoder layer {max(config.resolved(decoder).feature_layers)}'s injected "
        f"output replaces everything the style rows computed before it, so {named} have no effect "
        "(use feature_site 'residual', or drop those layers)"
    )


def decoder_resnet(unet: UNet2DConditionModel, layer: int) -> torch.nn.Module:
    return decoder_layers(unet).resnet(unet, layer)


def decoder_attentions(unet: UNet2DConditionModel, layer: int, kind: Literal["self", "cross"]) -> list[torch.nn.Module]:
    """The attention modules (attn1 = self, attn2 = cross) of every transformer block of a layer."""
    return decoder_layers(unet).attentions(unet, layer, kind)


class ReferenceMode(enum.Enum):
    BATCH_ROW = "batch_row"
    RECORD = "record"
    REPLAY = "replay"


class Injector:
    """Holds the per-step state the hooks read; install it with `installed()`.

    `set_step` names the step, its timestep, where the reference rows are (`mode`) and the call's
    row layout: how many reference rows lead the batch and which one each style row receives.
    """

    def __init__(self, unet: UNet2DConditionModel, config: InjectionConfig):
        self.unet = unet
        self.decoder = decoder_layers(unet)
        self.config = config.resolved(self.decoder)
        self.step = 0
        self.timestep = 0
        self.mode = ReferenceMode.BATCH_ROW
        self.layout: Optional[RowLayout] = None
        self.recorded: dict[str, torch.Tensor] = {}

    def set_step(self, step: int, timestep: int, mode: ReferenceMode, layout: RowLayout) -> None:
        self.step, self.timestep, self.mode, self.layout = step, int(timestep), mode, layout
        if mode is ReferenceMode.RECORD:
            self.recorded = {}

    # -- hooks ---------------------------------------------------------------------------------

    def _sites(self) -> Iterator[tuple[str, str, torch.nn.Module]]:
        """(key, kind, module) for every module whose output may be injected."""
        config = self.config
        if config.features:
            for layer in config.feature_layers:
                resnet = self.decoder.resnet(self.unet, layer)
                yield f"feature.{layer}", "feature", resnet if config.feature_site == "output" else resnet.conv2
        kinds = [k for k, on in (("self", config.self_attention), ("cross", config.cross_attention)) if on]
        for kind in kinds:
            for layer in config.attention_layers:
                for block, attention in enumerate(self.decoder.attentions(self.unet, layer, kind)):
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
            if not active or self.layout is None or not self.layout.references:
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
            self.recorded[key] = output.detach().clone()
            return None
        if self.mode is ReferenceMode.BATCH_ROW:
            references, first_style_row = output[: self.layout.num_references], self.layout.num_references
        else:
            references, first_style_row = self.recorded[key], 0
        # A row of a tensor cannot be written from a view of the same tensor: copy first.
        injected = output.clone()
        style = injected[first_style_row:]
        source = references[torch.tensor(self.layout.sources, device=output.device)]
        if rate >= 1.0:
            style.copy_(source)
        else:
            style.lerp_(source, rate)
        return injected
