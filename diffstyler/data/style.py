"""Style images for LoRA training (paper section III-C): one or a few images and one prompt.

`data.images` takes files, folders (recursive), glob patterns and `.txt` lists, as `data.content`
of predict does (`data.sources.expand_content`). All the images train one LoRA, or with
`data.one_lora_per_image` each image its own (`diffstyler.cli.lora_per_image`; `diffstyler fit` runs
the loop). Every image is checked when the data module is built, i.e. while the CLI parses its
config and before any model is loaded, so a wrong path fails in seconds with the file's name.

One epoch is exactly one batch. The `OneBatchPerEpochSampler` picks the batch's images from the epoch
number, so a run resumed from a checkpoint sees the same images at each step as the uninterrupted
run (Lightning restarts a dataloader from its beginning on resume; with one-batch epochs that
beginning is the right place). Consequence: `accumulate_grad_batches` must stay 1; use
`batch_size` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from diffstyler.checks import check_resolution
from diffstyler.data.sources import expand_content
from diffstyler.errors import UserError, config_error
from diffstyler.images import load_image, resize_to_multiple, sha256_file, to_tensor

# The paper's own training command uses "painting of <sss>, girl": a rare token marks the style.
DEFAULT_STYLE_PROMPT = "painting of <sss>"


class StyleDataset(Dataset):
    """Items are dicts: `index` (which style image), `pixel_values` [3, H, W] in [-1, 1], `prompt`,
    and the augmentation switches `flip` / `crop` that the training module applies to latents."""

    def __init__(self, pixel_values: list[torch.Tensor], prompt: str, flip: bool, crop: bool) -> None:
        self.pixel_values = pixel_values
        self.prompt = prompt
        self.flip = flip
        self.crop = crop

    def __len__(self) -> int:
        return len(self.pixel_values)

    def __getitem__(self, index: int) -> dict:
        return {
            "index": index,
            "pixel_values": self.pixel_values[index],
            "prompt": self.prompt,
            "flip": self.flip,
            "crop": self.crop,
        }


class OneBatchPerEpochSampler(Sampler[int]):
    """Yields `batch_size` indices per epoch: epoch e takes images e·B, e·B+1, ... modulo their number.

    Lightning calls `set_epoch` before each epoch (also through its distributed wrapper).
    """

    def __init__(self, num_images: int, batch_size: int) -> None:
        self.num_images = num_images
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batch_size

    def __iter__(self) -> Iterator[int]:
        first = self.epoch * self.batch_size
        return iter([(first + offset) % self.num_images for offset in range(self.batch_size)])


class StyleDataModule(LightningDataModule):
    """Style image(s) and the prompt that names the style.

    Args:
        images: style images: files, folders (recursive), glob patterns, `.txt` lists of paths.
        prompt: text paired with every style image; default like the paper's "painting of <sss>".
        resolution: the longer side after resizing; both sides become multiples of 8, aspect kept
            (see `diffstyler.images.resize_to_multiple`).
        batch_size: images per step. Above 1, all images must resize to the same size.
        num_workers: DataLoader workers (the images are already in memory; 0 is fine).
        flip: randomly mirror the cached latents left-right (off by default, as in the paper).
        crop: random crops of 3/4 of each latent side (off by default, as in the paper).
        one_lora_per_image: train one LoRA per image, each into `<model.output_dir>/<image stem>`,
            instead of one LoRA from all images (`diffstyler fit` runs the loop; see
            `diffstyler.cli.lora_per_image`).
        process_index: with `one_lora_per_image`, this process trains images process_index,
            process_index + num_processes, ... of the sorted list (0 .. num_processes - 1).
        num_processes: how many processes (one per GPU, or the tasks of a job array) share the
            images with `one_lora_per_image`; each starts with its own process_index.
    """

    def __init__(
        self,
        images: list[str],
        prompt: str = DEFAULT_STYLE_PROMPT,
        resolution: int = 512,
        batch_size: int = 1,
        num_workers: int = 0,
        flip: bool = False,
        crop: bool = False,
        one_lora_per_image: bool = False,
        process_index: int = 0,
        num_processes: int = 1,
    ) -> None:
        super().__init__()
        if not images:
            raise config_error("data.images", "must name at least one style image")
        if batch_size < 1:
            raise config_error("data.batch_size", f"must be >= 1, got {batch_size}")
        check_resolution(resolution, "data.resolution")
        check_process_share(process_index, num_processes, one_lora_per_image)
        found = expand_content([str(entry) for entry in images], "data.images")
        self.one_lora_per_image = one_lora_per_image
        self.process_index = process_index
        self.num_processes = num_processes
        if one_lora_per_image:
            check_distinct_stems([file.path for file in found])
            found = found[process_index::num_processes]  # this process's share; only these are read
        self.images = [file.path for file in found]
        self.prompt = prompt
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.flip = flip
        self.crop = crop
        # Read everything now: a missing or broken file fails here, before any model is loaded.
        self.pixel_values = [to_tensor(resize_to_multiple(load_image(path), resolution)) for path in self.images]
        self.sha256 = [sha256_file(path) for path in self.images]
        self._check_batchable()
        self.dataset = StyleDataset(self.pixel_values, prompt, flip, crop)

    def _check_batchable(self) -> None:
        sizes = {tuple(pixels.shape[1:]) for pixels in self.pixel_values}
        # one LoRA per image: each batch repeats one image
        if self.batch_size > 1 and len(sizes) > 1 and not self.one_lora_per_image:
            listing = ", ".join(
                f"{path}: {p.shape[2]}x{p.shape[1]}" for path, p in zip(self.images, self.pixel_values)
            )
            raise config_error(
                "data.batch_size",
                f"{self.batch_size} needs style images of one size after resizing, got {listing}; "
                "use batch_size 1 or images of the same aspect ratio",
            )

    def train_dataloader(self) -> DataLoader:
        if self.one_lora_per_image:
            raise UserError("one LoRA per image is trained by `diffstyler fit`", "data.one_lora_per_image",
                            "a plain Trainer.fit would train one LoRA from all the images; run `diffstyler fit`, "
                            "or give the data module one image at a time")
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=OneBatchPerEpochSampler(len(self.dataset), self.batch_size),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,  # one-batch epochs would respawn workers each step
        )

    def style_metadata(self) -> dict:
        """What the exported LoRA was trained on: prompt, resolution, and each image's path and hash."""
        return {
            "prompt": self.prompt,
            "resolution": self.resolution,
            "style_images": [
                {"path": path, "sha256": digest, "size": [int(p.shape[2]), int(p.shape[1])]}
                for path, digest, p in zip(self.images, self.sha256, self.pixel_values)
            ],
        }


def check_process_share(process_index: int, num_processes: int, one_lora_per_image: bool) -> None:
    if num_processes < 1:
        raise config_error("data.num_processes", f"must be >= 1, got {num_processes}")
    if not 0 <= process_index < num_processes:
        raise config_error("data.process_index", f"must be in [0, data.num_processes={num_processes}), got {process_index}")
    if num_processes > 1 and not one_lora_per_image:
        raise config_error("data.num_processes", "shares images between processes only with data.one_lora_per_image "
                           "(for one LoRA from all images on several GPUs, use trainer.devices)")


def check_distinct_stems(paths: list[str]) -> None:
    """Refuse two images with one file stem: the stem names the image's LoRA folder. Compared
    case-folded: on macOS and Windows `A` and `a` are one folder."""
    seen: dict[str, str] = {}
    for path in paths:
        name = Path(path).stem
        if name.casefold() in seen:
            raise UserError(f"two style images named {name!r}", "data.images",
                            f"{seen[name.casefold()]} and {path} would both train into <model.output_dir>/{name}; rename one")
        seen[name.casefold()] = path
