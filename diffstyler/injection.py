"""Cross-LoRA feature and attention injection (paper section III-C, eq. 4 and 5), on any backbone.

The backbone maps the model's layers (`Backbone.layer_map`: a UNet's decoder layers, a
transformer's blocks) and says where a layer's features and attention are (`feature_site`,
`attention_sites`). SD 1.x and 2.x have 12 decoder layers (the first three without attention),
SDXL 9 (the last three without attention). The paper injects features in layers 4-11 and self-
and cross-attention in all decoder layers; `InjectionConfig`'s defaults are these as rules over
the map (`paper`, `all`), which give the paper's numbers on SD 1.x / 2.x, layers 1-8 / 0-5 on
SDXL, and each transformer family's documented blocks (docs: model families).

Everything is done with forward hooks, installed for a run and removed afterwards:
- feature injection: a hook on the layer's feature site replaces the style rows' activations
  with their reference row's (site "output": the layer's output; site "residual": its residual
  branch, before the skip connection is added, as Plug-and-Play and the paper's code do);
- attention injection: hooks on the attention's query and key projections give the style rows'
  image tokens their reference row's queries and keys. softmax(Q K^T) is then the reference's
  attention probabilities while V stays the style row's own, which is the paper's attention
  injection without materialising the probability matrices (scaled-dot-product attention stays
  usable). Text tokens are never injected.

Which reference row feeds which style row comes from the call's `rows.RowLayout` (style row j
receives reference row `sources[j]`): one base-model reference row for every style
(`reference_model: base`, the paper's text), or one reference row per style run through that
style's LoRA (`reference_model: style`, the paper's public code).

Where the reference rows come from:
- `ReferenceMode.BATCH_ROW`: the first `layout.num_references` rows of the same call (one forward for all);
- `ReferenceMode.RECORD` / `REPLAY`: a separate forward records the reference rows, a later
  forward injects the recording into the style rows (same result, two calls).

Windows: `feature_steps` and `attention_steps` count steps from the start of denoising, given as a
number of steps or as a fraction of the sampling's steps (the paper's 30 of 50 is 0.6), so the
defaults fit any number of steps on every family.

Dominated settings: replacing a UNet decoder resnet's whole *output* erases everything the style
rows computed before it in the decoder (the decoder is a chain: apart from the encoder's skip
connections, a decoder module's only input is the hidden state of the module before it).
`ineffective_sites` derives, from the map's execution order, which configured sites then have no
effect at all.
"""

from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterator, Literal, Optional, Sequence, Union

import torch

from diffstyler.backbones import ATTENTION_RULES, FEATURE_RULES, Backbone, LayerMap, Site, check_layer_selection
from diffstyler.errors import config_error
if TYPE_CHECKING:
    from diffstyler.methods.base import Method
    from diffstyler.rows import RowLayout

FeatureSite = Literal["output", "residual"]
ReferenceModel = Literal["base", "style"]
Window = Union[int, float]  # a number of steps, or a fraction of the sampling's steps


@dataclass
class InjectionConfig:
    """Which activations of the reference (content) pass are injected, where and when.

    Args:
        features: inject the reference's features (eq. 4).
        self_attention: inject the reference's self-attention (eq. 5); on a transformer, its joint
            attention over image tokens (queries and keys of the image tokens).
        cross_attention: inject the reference's cross-attention (eq. 5; a UNet's attention over the
            text; a transformer has no separate one).
        feature_layers: layer numbers, or one rule of the loaded model's layer map: `paper`
            (default; SD 1.x / 2.x: decoder layers 4-11, SDXL: 1-8) or `pnp` (Plug-and-Play's layer;
            SD: 4, SDXL: 1). Transformers: see the docs' model families page.
        attention_layers: layer numbers, or one rule: `all` (default: every layer with attention; SD:
            3-11, SDXL: 0-5) or `from_pnp` (SD: 4-11, SDXL: 1-5).
        feature_steps: the feature window, from the first denoising step: a number of steps (30: steps
            0-29) or a fraction of the sampling's steps (0.6: the paper's 30 of 50; 12 of 20).
        attention_steps: the attention window, the same way (0.5: the paper's 25 of 50).
        qk_mix: "replace" gives the style rows the reference's Q and K; "timestep_rate" blends them
            with rate min(1, 2t/1000) as the paper's public code does.
        feature_site: "residual" (default) injects the layer's residual branch (a UNet resnet's conv2
            output before the skip connection is added, a transformer block's change of the image
            tokens), as Plug-and-Play and the paper's code do: the style rows keep their own skip
            path, so every injected layer counts. "output" replaces the layer's whole output; on a
            UNet a later layer's injection then erases every earlier one (`ineffective_sites`).
        reference_model: "base" runs the reference row with the base model (the paper's text:
            features "from the original model"); "style" gives each style its own reference row
            run through its own LoRA, as the paper's public code does.
    """

    features: bool = True
    self_attention: bool = True
    cross_attention: bool = True
    feature_layers: list[Union[int, str]] = field(default_factory=lambda: ["paper"])
    attention_layers: list[Union[int, str]] = field(default_factory=lambda: ["all"])
    feature_steps: Window = 0.6
    attention_steps: Window = 0.5
    qk_mix: Literal["replace", "timestep_rate"] = "replace"
    feature_site: FeatureSite = "residual"
    reference_model: ReferenceModel = "base"

    def __post_init__(self) -> None:
        # A single layer or rule name stands for a list of one, as on the command line.
        self.feature_layers = as_layer_list(self.feature_layers)
        self.attention_layers = as_layer_list(self.attention_layers)
        check_layer_selection(self.feature_layers, FEATURE_RULES, "model.injection.feature_layers")
        check_layer_selection(self.attention_layers, ATTENTION_RULES, "model.injection.attention_layers")
        for key in INJECTION_WINDOWS:
            check_window(getattr(self, key), f"model.injection.{key}")
        choices = {"qk_mix": ("replace", "timestep_rate"), "feature_site": ("output", "residual"),
                   "reference_model": ("base", "style")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise config_error(f"model.injection.{key}", f"must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")

    def resolved(self, layers: LayerMap, steps: Optional[int] = None) -> "InjectionConfig":
        """This config with the model's layer numbers for the rules, every layer checked against
        `layers` (a one-line error naming the valid range), and with `steps`, the windows as numbers
        of steps. A resolved config is what the run records."""
        windows = {key: window_steps(getattr(self, key), steps) for key in INJECTION_WINDOWS} if steps is not None else {}
        return replace(self, feature_layers=layers.feature_layers(self.feature_layers),
                       attention_layers=layers.attention_layer_numbers(self.attention_layers), **windows)

    def features_on(self, step: int) -> bool:
        return self.features and bool(self.feature_layers) and step < self.feature_steps

    def attention_on(self, step: int) -> bool:
        attention = self.self_attention or self.cross_attention
        return attention and bool(self.attention_layers) and step < self.attention_steps

    def needs_reference(self, step: int) -> bool:
        return self.features_on(step) or self.attention_on(step)


INJECTION_WINDOWS = ("feature_steps", "attention_steps")


def check_window(window: Window, key: str) -> None:
    """A window is a whole number of steps >= 0, or a fraction in [0, 1]."""
    if isinstance(window, bool) or not isinstance(window, (int, float)):
        raise config_error(key, f"must be a number of steps or a fraction of the steps, got {window!r}")
    if isinstance(window, int) and window < 0:
        raise config_error(key, f"must be >= 0, got {window}")
    if isinstance(window, float) and not 0.0 <= window <= 1.0:
        raise config_error(key, f"a fraction of the sampling steps must be in 0..1, got {window} "
                                "(give a whole number for a number of steps)")


def window_steps(window: Window, steps: int) -> int:
    """The window as a number of steps: a fraction of `steps` rounded to the nearest step (halves up)."""
    if isinstance(window, float):
        return int(math.floor(window * steps + 0.5 + 1e-9))
    return int(window)


def as_layer_list(selection: "list[Union[int, str]] | int | str | None") -> Optional[list[Union[int, str]]]:
    return [selection] if isinstance(selection, (int, str)) else None if selection is None else list(selection)


# Named injection settings for the Python API (`DiffStylerPipeline(..., injection="paper_code")`);
# the CLI's presets are YAML overlays (configs/presets/), tested equal to these.
INJECTION_PRESETS: dict[str, InjectionConfig] = {
    # the paper's text: features in decoder layers 4-11 for 30 of 50 steps (0.6), SA and CA
    # everywhere for 25 (0.5)
    "paper": InjectionConfig(),
    # the paper's public code (configs/presets/paper_code.yaml; it also inverts with 1000 steps:
    # inversion_substeps 20): features in PnP's layer (SD: 4, SDXL: 1), self-attention from there on
    # (SD: 4-11, SDXL: 1-5)
    "paper_code": InjectionConfig(
        cross_attention=False, feature_layers=["pnp"], attention_layers=["from_pnp"], feature_steps=0.5,
        attention_steps=0.5, qk_mix="timestep_rate", reference_model="style",
    ),
}


def injection_config(value: "InjectionConfig | str", argument: str = "injection") -> InjectionConfig:
    """An `InjectionConfig`, or one of `INJECTION_PRESETS` by name."""
    if isinstance(value, InjectionConfig):
        return value
    if value not in INJECTION_PRESETS:
        raise config_error(argument, f"unknown preset {value!r}; give an InjectionConfig or one of {', '.join(INJECTION_PRESETS)}")
    return INJECTION_PRESETS[value]


def check_injection_window(injection: InjectionConfig, steps: int, prefix: str = "model.injection.") -> None:
    """Refuse a window of more steps than the sampling (`feature_steps: 99` with 50 steps): the
    config only knows the window, the caller the number of steps. `prefix` names the keys."""
    for key in INJECTION_WINDOWS:
        check_window_steps(getattr(injection, key), steps, prefix + key)


def check_window_steps(window: Window, steps: int, key: str) -> None:
    if isinstance(window, int) and window > steps:
        raise config_error(key, f"must be in 0..{steps} (the number of sampling steps) or a fraction of them "
                                f"(e.g. 0.6), got {window}")


# --- which configured sites can have an effect ------------------------------------------------

def ineffective_sites(config: InjectionConfig, layers: LayerMap, steps: int) -> dict[str, list[int]]:
    """Configured injection layers that cannot change the result, by kind ("features", "attention").

    Rule: while an output-site feature injection at a layer L that replaces the whole state (a
    UNet decoder resnet) is active, the style rows' hidden state after L is the reference's,
    whatever they computed before. Every site that runs before L is then irrelevant during L's
    window. A site is listed when that holds for its whole window: features share one window, so
    every feature layer before the last one is listed; an attention layer before it is listed when
    its window ends no later than the feature window.
    """
    config = config.resolved(layers, steps)
    if not (config.features and config.feature_layers and config.feature_steps > 0):
        return {}
    inside = attention_inside_feature_blocks(config, layers)
    if inside:
        return {"attention": inside}
    last = max(config.feature_layers)
    if config.feature_site != "output" or not layers.layers[last].replaces_state:
        return {}
    order = layers.execution_order()
    before = set(order[: order.index((last, "feature"))])
    dominated = {"features": sorted(l for l in config.feature_layers if (l, "feature") in before)}
    attention_on = (config.self_attention or config.cross_attention) and config.attention_steps > 0
    if attention_on and config.attention_steps <= config.feature_steps:
        dominated["attention"] = sorted(l for l in config.attention_layers if (l, "attention") in before)
    return {kind: numbers for kind, numbers in dominated.items() if numbers}


def attention_inside_feature_blocks(config: InjectionConfig, layers: LayerMap) -> list[int]:
    """Attention layers that cannot act while the features are injected, in a map whose attention
    runs inside the block that carries the feature site (a transformer's): a block with a feature
    injection discards its own change of the image tokens (site "residual") or its whole image
    output ("output"), so its attention reaches the result only through the text tokens, and those
    only through later blocks that keep their own change. When the block and every block after it
    inject features, its attention has no effect (for a window no longer than the features')."""
    attention_on = (config.self_attention or config.cross_attention) and config.attention_steps > 0
    if not attention_on or config.attention_steps > config.feature_steps:
        return []
    features = set(config.feature_layers)
    return sorted(layer for layer in config.attention_layers
                  if layers.layers[layer].attention_first and all(later in features for later in range(layer, len(layers))))


def describe_ineffective_sites(config: InjectionConfig, layers: LayerMap, steps: int) -> Optional[str]:
    """A one-paragraph warning naming the layers that have no effect, or None."""
    dominated = ineffective_sites(config, layers, steps)
    if not dominated:
        return None
    inside = attention_inside_feature_blocks(config.resolved(layers, steps), layers)
    if inside:
        return (f"injection: attention layers {inside} inject into {layers.noun}s that also inject features, as every "
                f"{layers.noun} after them does: the feature injection discards what their attention does, so they "
                "have no effect (inject attention in earlier blocks, e.g. attention_layers: all)")
    kinds = {"features": "feature", "attention": "attention"}
    named = " and ".join(f"{kinds[kind]} layers {numbers}" for kind, numbers in dominated.items())
    return (
        f"injection: with feature_site 'output', {layers.noun} {max(config.resolved(layers).feature_layers)}'s injected "
        f"output replaces everything the style rows computed before it, so {named} have no effect "
        "(use feature_site 'residual', or drop those layers)"
    )


class ReferenceMode(enum.Enum):
    BATCH_ROW = "batch_row"
    RECORD = "record"
    REPLAY = "replay"


class Injector:
    """Installs the hooks of the methods of a call and holds the per-step state they read.

    `set_step` names the step, its timestep, where the reference rows are (`mode`) and the call's
    row layout: how many reference rows lead the batch, and which style rows are each method's and
    which reference rows they read. `image_tokens`: how many image tokens a row has (sites whose
    output also holds text tokens rewrite only the last `image_tokens`).
    """

    def __init__(self, backbone: Backbone, methods: Sequence["Method"]):
        self.backbone = backbone
        self.methods = list(dict.fromkeys(methods))
        self.step = 0
        self.timestep = 0.0
        self.image_tokens = 0
        self.mode = ReferenceMode.BATCH_ROW
        self.layout: Optional[RowLayout] = None
        self.recorded: dict[str, torch.Tensor] = {}

    def set_step(self, step: int, timestep: float, mode: ReferenceMode, layout: RowLayout) -> None:
        self.step, self.timestep, self.mode, self.layout = step, float(timestep), mode, layout
        if mode is ReferenceMode.RECORD:
            self.recorded = {}

    def sites(self) -> Iterator[tuple["Method", Site]]:
        """(method, site) for every site a method may rewrite."""
        for method in self.methods:
            for site in method.sites(self.backbone):
                yield method, site

    @contextlib.contextmanager
    def installed(self) -> Iterator["Injector"]:
        handles = [site.module.register_forward_hook(self._hook(method, site), with_kwargs=True) for method, site in self.sites()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, method: "Method", site: Site):
        key = f"{method.name}.{site.key}"

        def hook(module, args, kwargs, output):
            layout = self.layout
            if layout is None or not layout.references or not method.active(site, self.step):
                return None
            rows = layout.rows_of(method)
            if not rows.rows or not any(rows.roles):
                return None
            if self.mode is ReferenceMode.RECORD:
                self.recorded[key] = site.values(args, kwargs, output, self.image_tokens).detach().clone()
                return None
            return site.rewrite(args, kwargs, output, lambda values: self._rewrite(method, site, key, values, rows), self.image_tokens)

        return hook

    def _rewrite(self, method: "Method", site: Site, key: str, values: torch.Tensor, rows) -> torch.Tensor:
        if self.mode is ReferenceMode.BATCH_ROW:
            references, first_style_row = values[: self.layout.num_references], self.layout.num_references
        else:
            references, first_style_row = self.recorded[key], 0
        return method.rewrite(site, values, references, first_style_row, rows, self.timestep)
