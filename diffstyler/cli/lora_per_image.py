"""One LoRA per style image (`data.one_lora_per_image`): what a `diffstyler fit` over a folder trains.

Each style image gets its own LoRA in `<model.output_dir>/<image stem>`, trained as a `diffstyler
fit` of that image alone would train it: `diffstyler fit` builds a fresh data module, model,
optimizer, trainer and logger from the same config for each image (`fit_one_lora_per_image`),
so nothing of one image's training reaches the next.

Resuming: a LoRA folder whose weights exist and whose `diffstyler_lora.json` records the same image
(by sha256) and the same recipe (base model, LoRA settings, learning rate, seed, steps, prompt,
resolution) is already trained and skipped. One that records anything else is refused before
anything trains: retraining would overwrite a LoRA the user made with other settings.

Sharing: with `data.num_processes` N, process `data.process_index` i takes images i, i+N, ... of
the sorted list (the data module keeps only those), so N processes train every image exactly once.
"""

from __future__ import annotations

import copy
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from jsonargparse import Namespace
from lightning.pytorch import Trainer, seed_everything

from diffstyler.callbacks.interrupt import SaveOnInterrupt, fit_until_interrupted
from diffstyler.cli.reporting import lora_written_line
from diffstyler.errors import UserError, config_error
from diffstyler.lora import LORA_WEIGHTS_NAME, lora_info_path, read_lora_info

if TYPE_CHECKING:
    from diffstyler.cli.app import DiffStylerCLI

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


# --- the fit over a folder (`diffstyler fit` with data.one_lora_per_image) --------------------

def fit_one_lora_per_image(cli: DiffStylerCLI, ckpt_path: Optional[str]) -> None:
    """Train this process's style images one LoRA each: for each image not trained yet, the fit
    config with `data.images` that one image and `model.output_dir` its folder is instantiated
    again (data module, model, trainer, callbacks, logger: nothing carries over from the previous
    image) and fitted.

    Every image's LoRA folder is checked before the first training starts, so a rerun with other
    settings is refused before it spends any time.
    """
    data, model, trainer = cli.datamodule, cli.model, cli.trainer
    if ckpt_path:
        raise config_error("ckpt_path", "not with data.one_lora_per_image: a rerun resumes by skipping the LoRAs already trained")
    if trainer.world_size > 1:
        raise config_error("trainer.devices", f"data.one_lora_per_image trains each LoRA in one process, got {trainer.world_size} "
                           "processes; use trainer.devices 1 and share the images with data.num_processes and data.process_index")
    loras = image_loras(data.images, data.sha256, model.output_dir)
    expected = expected_record(model.recipe(), planned_steps(trainer), data.prompt, data.resolution)
    todo = [lora for lora in loras if not already_trained(lora, expected)]
    share = f" (process {data.process_index} of {data.num_processes})" if data.num_processes > 1 else ""
    print(f"diffstyler fit: {len(loras)} style images{share}: {len(loras) - len(todo)} already trained, "
          f"{len(todo)} to train, one LoRA each in {model.output_dir}/<image stem>", file=sys.stderr)
    whole_config = cli.config
    for number, lora in enumerate(todo, start=1):
        cli.config = config_for_image(whole_config, cli.subcommand, lora)  # also what SaveConfigCallback saves
        # The LoRA's initial weights come from the global RNG: seeded again, each image starts as
        # it would in a fit of its own, wherever it is in the list.
        seed = cli.config[cli.subcommand].get("seed_everything")
        if seed is not False and seed is not None:
            seed_everything(seed, workers=True, verbose=False)
        cli.instantiate_classes()  # LightningCLI's own: data module, model and trainer from cli.config
        # Stopped by a signal, a rerun continues (the finished LoRAs are skipped); --ckpt_path is
        # refused in this mode, so a checkpoint of the image's fit would be of no use.
        for callback in cli.trainer.callbacks:
            if isinstance(callback, SaveOnInterrupt):
                callback.save_checkpoint = False
        gc.collect()  # the previous image's model (trainer and module refer to each other) before this one loads
        started = time.perf_counter()
        fit_until_interrupted(cli.trainer, cli.model, datamodule=cli.datamodule)
        print(lora_written_line(str(lora.folder), cli.trainer.global_step, time.perf_counter() - started, (number, len(todo))),
              file=sys.stderr)
    cli.config = whole_config
    if todo:
        print(f"diffstyler fit: {len(todo)} LoRA{'' if len(todo) == 1 else 's'} trained, "
              f"{len(loras) - len(todo)} already there; in {model.output_dir}", file=sys.stderr)


def planned_steps(trainer: Trainer) -> int:
    """The optimizer steps each LoRA gets: one batch per epoch (`data.style`), so the smaller of
    max_steps and max_epochs."""
    limits = [limit for limit in (trainer.max_steps, trainer.max_epochs) if limit is not None and limit > 0]
    if not limits:
        raise config_error("trainer.max_steps", "data.one_lora_per_image needs a number of steps (trainer.max_steps)")
    return min(limits)


def config_for_image(config: Namespace, subcommand: str, lora: ImageLoRA) -> Namespace:
    """The fit config of one style image: its image, its output folder, its own logger folder."""
    config = copy.deepcopy(config)
    section = config[subcommand]
    section.data.images = [lora.image]
    section.data.one_lora_per_image = False
    section.data.process_index, section.data.num_processes = 0, 1
    section.model.output_dir = str(lora.folder)
    logger = section.trainer.get("logger")
    # A logger folder per image, so that checkpoints of two images never share a folder.
    if isinstance(logger, Namespace) and isinstance(logger.get("init_args"), Namespace) and "name" in logger.init_args:
        logger.init_args.name = f"{logger.init_args.name or 'lightning_logs'}/{lora.name}"
    return config


# --- which LoRAs are trained already -------------------------------------------------------

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
    info = lora_info_path(lora.folder)
    recorded = read_lora_info(lora.folder) if (lora.folder / LORA_WEIGHTS_NAME).is_file() else None
    if recorded is None:
        return False
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


def describe_images(recorded: dict[str, Any]) -> str:
    paths = [str(entry.get("path")) for entry in recorded.get("style_images") or [] if isinstance(entry, dict)]
    return ", ".join(paths) or "no recorded image"
