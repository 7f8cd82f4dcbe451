"""Stylization jobs for Lightning's predict loop.

A job is one content image with its style entries, a seed and an output name. The job id travels
inside the batch (never rely on Lightning's batch indices: DDP splits the items by stride), and the
seed is derived from (base seed, job id) so a job gives the same result whichever process or run
handles it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from diffstyler.checks import check_resolution
from diffstyler.errors import UserError, config_error
from diffstyler.images import LATENT_FACTOR, load_image
from diffstyler.lora import read_recorded_prompt, resolve_lora_file
from diffstyler.masks import MaskSpec, load_mask_file

LORA_INFO_NAME = "diffstyler_lora.json"


@dataclass
class StyleEntry:
    """One style of a job.

    lora: a LoRA `.safetensors` file or a folder holding `pytorch_lora_weights.safetensors`
      (ours from `diffstyler fit`, or a community LoRA in a format diffusers reads).
    prompt: the style prompt; None takes the prompt recorded in the LoRA's `diffstyler_lora.json`.
    scale: LoRA scale (0 = base model).
    mask: where the style goes; None styles the whole image.
    name: used in output file names (default: the LoRA's folder or file name).
    image: the style image, shown in the result grid when given.
    """

    lora: str
    prompt: Optional[str] = None
    scale: float = 1.0
    mask: Optional[MaskSpec] = None
    name: Optional[str] = None
    image: Optional[str] = None

    def resolved(self) -> "StyleEntry":
        """A copy with the LoRA file checked and prompt and name filled in."""
        file = resolve_lora_file(self.lora)
        prompt = self.prompt if self.prompt is not None else _recorded_prompt(file)
        name = self.name or (file.parent.name if file.name == "pytorch_lora_weights.safetensors" else file.stem)
        return dataclasses.replace(self, lora=str(file), prompt=prompt, name=name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StyleEntry":
        mask = data.get("mask")
        return cls(**{**data, "mask": MaskSpec(**mask) if isinstance(mask, dict) else mask})


def _recorded_prompt(lora_file: Path) -> str:
    info = lora_file.parent / LORA_INFO_NAME
    if not info.is_file():
        raise UserError("style has no prompt", str(lora_file), f"give the style entry a prompt: there is no {info} to take it from")
    return read_recorded_prompt(info)


def job_seed(base_seed: int, job_id: int) -> int:
    """A 63-bit seed that depends on both numbers and is the same on every machine."""
    digest = hashlib.sha256(f"{base_seed}:{job_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def check_styles(styles: list[StyleEntry]) -> list[StyleEntry]:
    if not styles:
        raise config_error("data.styles", "give at least one style entry")
    masked = [s.mask is not None for s in styles]
    if any(masked) and not all(masked):
        raise config_error("data.styles", "either every style entry has a mask (localized transfer) or none has (one image per style)")
    for entry in styles:
        if entry.mask is not None and entry.mask.file is not None:
            load_mask_file(entry.mask.file, (LATENT_FACTOR, LATENT_FACTOR))  # read now: a bad file fails before any model loads
        if entry.image is not None:
            load_image(entry.image)
    return [entry.resolved() for entry in styles]


def output_names(paths: list[str]) -> list[str]:
    """File stems as output names; a stem that occurs twice gets the job id appended every time."""
    stems = [Path(path).stem for path in paths]
    return [stem if stems.count(stem) == 1 else f"{stem}-{index}" for index, stem in enumerate(stems)]


class JobDataset(Dataset):
    def __init__(self, jobs: list[dict[str, Any]]):
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.jobs[index]


def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


class StylizeDataModule(LightningDataModule):
    """Every content image stylized with the same style entries.

    content: content image files. styles: style entries (see `StyleEntry`). seed: base seed.
    resolution: the content's longer side is resized to this (sides rounded to multiples of 8).
    """

    def __init__(
        self,
        content: list[str],
        styles: list[StyleEntry],
        seed: int = 0,
        resolution: int = 512,
        batch_size: int = 1,
        num_workers: int = 0,
    ):
        super().__init__()
        if not content:
            raise config_error("data.content", "give at least one content image")
        check_resolution(resolution, "data.resolution")
        for path in content:
            load_image(path)  # fails early, naming the file
        self.styles = check_styles(list(styles))
        self.content = list(content)
        self.seed = seed
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers

    def jobs(self) -> list[dict[str, Any]]:
        return [
            {
                "id": index,
                "content": path,
                "styles": [entry.to_dict() for entry in self.styles],
                "seed": job_seed(self.seed, index),
                "output_name": name,
                "resolution": self.resolution,
            }
            for index, (path, name) in enumerate(zip(self.content, output_names(self.content)))
        ]

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            JobDataset(self.jobs()),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_as_list,
        )
