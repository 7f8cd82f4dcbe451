"""One LoRA per style image (`data.one_lora_per_image`): what a `diffstyler fit` over a folder trains.

Each style image gets its own LoRA in `<model.output_dir>/<image stem>`, trained as a `diffstyler
fit` of that image alone would train it: `diffstyler fit` builds a fresh data module, model,
optimizer, trainer and logger from the same config for each image (`cli.fit_one_lora_per_image`),
so nothing of one image's training reaches the next.

Resuming: a LoRA folder whose weights exist and whose `diffstyler_lora.json` records the same image
(by sha256) and the same recipe (base model, LoRA settings, learning rate, seed, steps, prompt,
resolution) is already trained and skipped. One that records anything else is refused before
anything trains: retraining would overwrite a LoRA the user made with other settings.

Sharing: with `data.num_processes` N, process `data.process_index` i takes images i, i+N, ... of
the sorted list (the data module keeps only those), so N processes train every image exactly once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffstyler.errors import UserError
from diffstyler.lora import LORA_INFO_NAME, LORA_WEIGHTS_NAME

# The recorded settings that must match for a LoRA to count as already trained.
RECIPE_KEYS = ("base_model", "adapter_name", "rank", "alpha", "target_modules", "dropout", "learning_rate", "seed", "steps",
               "prompt", "resolution")


@dataclass(frozen=True)
class ImageLoRA:
    """A style image and the folder its LoRA goes to."""

    image: str
    name: str
    sha256: str
    folder: Path


def image_loras(images: list[str], digests: list[str], output_dir: str) -> list[ImageLoRA]:
    """Each image with its LoRA folder, `<output_dir>/<image stem>` (the data module has checked
    that no two stems are the same)."""
    return [ImageLoRA(image, Path(image).stem, digest, Path(output_dir) / Path(image).stem) for image, digest in zip(images, digests)]


def expected_record(recipe: dict[str, Any], steps: int, prompt: str, resolution: int) -> dict[str, Any]:
    """What `diffstyler_lora.json` of a LoRA trained by this run will hold, for the keys compared."""
    return {**recipe, "steps": steps, "prompt": prompt, "resolution": resolution}


def already_trained(lora: ImageLoRA, expected: dict[str, Any]) -> bool:
    """True when `lora.folder` holds this image's LoRA with the expected recipe; False when there is
    no finished LoRA there (no info file, or no weights); UserError when there is a different one."""
    info = lora.folder / LORA_INFO_NAME
    if not info.is_file() or not (lora.folder / LORA_WEIGHTS_NAME).is_file():
        return False
    recorded = read_record(info)
    images = [entry.get("sha256") for entry in recorded.get("style_images") or [] if isinstance(entry, dict)]
    if images != [lora.sha256]:
        raise UserError("a LoRA of another image is there", str(info),
                        f"it was trained on {describe_images(recorded)}, not on {lora.image} (its content changed?); "
                        "delete the folder to train it again, or choose another model.output_dir")
    differing = [key for key in RECIPE_KEYS if recorded.get(key) != expected[key]]
    if differing:
        key = differing[0]
        raise UserError("a LoRA with other settings is there", str(info),
                        f"it records {key} {recorded.get(key)!r}, this run {expected[key]!r}"
                        f"{f' (and {len(differing) - 1} more)' if len(differing) > 1 else ''}; "
                        "delete the folder to train it again, or choose another model.output_dir")
    return True


def read_record(info: Path) -> dict[str, Any]:
    try:
        recorded = json.loads(info.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError("unreadable LoRA info file", str(info), f"{error}; delete the folder to train it again") from error
    if not isinstance(recorded, dict):
        raise UserError("unreadable LoRA info file", str(info), "not a JSON object; delete the folder to train it again")
    return recorded


def describe_images(recorded: dict[str, Any]) -> str:
    paths = [str(entry.get("path")) for entry in recorded.get("style_images") or [] if isinstance(entry, dict)]
    return ", ".join(paths) or "no recorded image"
