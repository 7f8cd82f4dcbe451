"""`DemoConfig`: what `diffstyler demo` serves, read from one small YAML file.

    model: tiny                      # or a hub id / local folder / single file, as `predict` takes
    resolution: 64                   # the longer side photos are stylized at
    segmenter: {weights: tiny, imgsz: 256, conf: 1.0e-06}
    loras: [outputs/smoke/lora]      # LoRA folders (or folders of LoRA folders) offered as styles

Every key is optional (the defaults are the paper's); an unknown key or a value of the wrong type is
one line naming the key and the file.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from diffstyler.cli.config_files import read_config_file
from diffstyler.demo.controls import ATTENTION_STEPS, FEATURE_STEPS, GUIDANCE, SEED, STEPS, STYLEID_GAMMA, STYLEID_TAU
from diffstyler.errors import MissingFileError, UserError, config_error
from diffstyler.images import DEFAULT_RESOLUTION
from diffstyler.injection import INJECTION_PRESETS, InjectionConfig, window_steps
from diffstyler.masks import SegmenterConfig
from diffstyler.methods import StyleIDConfig
from diffstyler.models import DEFAULT_MODEL
from diffstyler.stylize import SamplingConfig

PAPER_INJECTION = InjectionConfig()
STYLEID_AUTHORS = StyleIDConfig()


@dataclass
class DemoConfig:
    """The demo's model, styles, server and the page's defaults.

    model: the base model (a hub id, a local diffusers folder, a single file, or `tiny`).
    device: where it runs (None: cuda when there is one, else cpu); training in the page uses it too.
    resolution: the longer side a photo is resized to before anything else (clicks land on that image).
    segmenter: FastSAM's settings for clicked points, boxes and text (`SegmenterConfig`).
    loras: LoRA folders, LoRA files or folders of LoRA folders offered as styles, each named after
      its folder (as `pipe.load_style` names them).
    output_folder: where each run's PNGs and each LoRA trained in the page are written.
    host, port: where the page is served; 127.0.0.1 keeps it on this machine.
    max_upload_mb: the largest upload accepted.
    steps ... seed: the page's starting settings (the paper's: 50 steps, guidance 10.5, features
      injected for 30 steps and attention for 25, the "paper" preset).
    styleid_gamma, styleid_tau, styleid_adain: the page's starting settings for image styles
      (StyleID, no training; the authors': query preservation 0.75, temperature 1.5, AdaIN on).
    train_steps, train_rank, train_resolution: how a style uploaded in the page is learned (paper:
      200 steps, rank 16, 512 px).
    """

    model: str = DEFAULT_MODEL
    device: Optional[str] = None
    resolution: int = DEFAULT_RESOLUTION
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    loras: list[str] = field(default_factory=list)
    output_folder: str = "outputs/demo"
    host: str = "127.0.0.1"
    port: int = 7860
    max_upload_mb: int = 20
    max_queue: int = 8
    max_loaded_styles: int = 8
    max_sessions: int = 100
    steps: int = SamplingConfig.steps
    guidance_scale: float = SamplingConfig.guidance_scale
    # the page's sliders count steps: the paper's windows at the default number of steps (30, 25)
    feature_steps: int = window_steps(PAPER_INJECTION.feature_steps, SamplingConfig.steps)
    attention_steps: int = window_steps(PAPER_INJECTION.attention_steps, SamplingConfig.steps)
    preset: str = "paper"
    seed: int = 0
    styleid_gamma: float = STYLEID_AUTHORS.gamma
    styleid_tau: float = STYLEID_AUTHORS.tau
    styleid_adain: bool = STYLEID_AUTHORS.adain
    train_steps: int = 200
    train_rank: int = 16
    train_resolution: int = 512

    def __post_init__(self) -> None:
        for key in ("resolution", "train_resolution"):
            if getattr(self, key) < 8 or getattr(self, key) % 8:
                raise config_error(key, f"must be a positive multiple of 8, got {getattr(self, key)}")
        for key in ("train_steps", "train_rank", "max_upload_mb", "max_queue", "max_loaded_styles",
                    "max_sessions"):
            if getattr(self, key) < 1:
                raise config_error(key, f"must be >= 1, got {getattr(self, key)}")
        page = {"steps": STEPS, "guidance_scale": GUIDANCE, "seed": SEED, "feature_steps": FEATURE_STEPS,
                "attention_steps": ATTENTION_STEPS, "styleid_gamma": STYLEID_GAMMA, "styleid_tau": STYLEID_TAU}
        for key, control in page.items():
            refused = control.problem(getattr(self, key))
            if refused:
                raise config_error(key, f"{refused} (the page's {control.label})")
        for key in ("feature_steps", "attention_steps"):
            if getattr(self, key) > self.steps:
                raise config_error(key, f"must be at most steps ({self.steps}), got {getattr(self, key)}")
        if not 1 <= self.port <= 65535:
            raise config_error("port", f"must be a port number (1-65535), got {self.port}")
        if self.preset not in INJECTION_PRESETS:
            raise config_error("preset", f"must be one of {', '.join(INJECTION_PRESETS)}, got {self.preset!r}")
        for index, lora in enumerate(self.loras):
            if not Path(lora).exists():
                raise MissingFileError("LoRA not found", f"loras[{index}]",
                                       f"{lora} does not exist; train one (diffstyler fit) or remove it from the list")

    @property
    def training_accelerator(self) -> str:
        return "cpu" if self.device is not None and self.device.startswith("cpu") else "auto"


def read_demo_config(path: Optional[str], **overrides: Any) -> DemoConfig:
    """The `DemoConfig` of a YAML file (None: the defaults), with `overrides` (e.g. host, port from
    the command line) that are not None."""
    values: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise MissingFileError("config file not found", path, "it is a folder" if Path(path).is_dir() else "no such file")
        values = read_config_file(path)
    values.update({key: value for key, value in overrides.items() if value is not None})
    where = path or "the command line"
    check_keys(values, [f.name for f in fields(DemoConfig)], "", where)
    hints = typing.get_type_hints(DemoConfig)
    for key, value in values.items():
        if key != "segmenter":
            check_type(key, value, hints[key], where)
    if "segmenter" in values:
        values["segmenter"] = segmenter_config(values["segmenter"], where)
    return DemoConfig(**values)


def segmenter_config(values: Any, where: str) -> SegmenterConfig:
    if not isinstance(values, dict):
        raise UserError("segmenter must be a mapping of keys", where, f"got {type(values).__name__}")
    check_keys(values, [f.name for f in fields(SegmenterConfig)], "segmenter.", where)
    hints = typing.get_type_hints(SegmenterConfig)
    for key, value in values.items():
        check_type(f"segmenter.{key}", value, hints[key], where)
    return SegmenterConfig(**values)


def check_keys(values: dict[str, Any], known: list[str], prefix: str, where: str) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"unknown key '{prefix}{unknown[0]}'", where, f"known keys: {', '.join(prefix + key for key in known)}")


def check_type(key: str, value: Any, hint: Any, where: str) -> None:
    """The YAML value fits the field's type (str, int, float, bool, Optional[...], list[str])."""
    if not fits(value, hint):
        raise UserError(f"wrong type for {key}", where, f"expected {type_name(hint)}, got {value!r}")


def type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Union:
        return " or ".join(type_name(argument) for argument in typing.get_args(hint))
    if typing.get_origin(hint) is not None:
        return str(hint)  # e.g. list[str]
    return "null" if hint is type(None) else hint.__name__


def fits(value: Any, hint: Any) -> bool:
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(fits(value, argument) for argument in arguments)
    if origin is list:
        return isinstance(value, list) and all(fits(item, arguments[0]) for item in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)
