"""Stylization jobs for Lightning's predict loop.

A job is one content image with its style entries, a seed, an output name and the names of every
file it writes (`job_output_files`). The job id travels inside the batch (never rely on Lightning's
batch indices: DDP splits the items by stride), and the seed is derived from (base seed, job id) so
a job gives the same result whichever process or run handles it.

Output file names are checked when the data module is built, before any model loads: every name
part is a plain file name, no file name exceeds 255 bytes, and no two files of the run share a name.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
MAX_FILE_NAME_BYTES = 255  # the file name limit of ext4, XFS, APFS, NTFS...


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
    return distinct_style_names(styles, [entry.resolved() for entry in styles])


def style_name_key(given: list[StyleEntry], index: int) -> str:
    """The config key a style's name comes from: its `name`, or its `lora` when the name is derived."""
    return f"data.styles[{index}].{'name' if given[index].name else 'lora'}"


def distinct_style_names(given: list[StyleEntry], resolved: list[StyleEntry]) -> list[StyleEntry]:
    """Check every style name, and make derived names distinct (the same LoRA twice, e.g. at two
    scales, would otherwise write both results to one file) by appending the style's index.

    Names given in the config are the user's choice: a repeated one is refused, not renamed.
    """
    derived = [entry.name for entry in resolved]
    named = []
    for index, entry in enumerate(resolved):
        name = entry.name
        if not given[index].name and derived.count(name) > 1:
            name = f"{name}-{index}"
        check_name_part(name, style_name_key(given, index))
        earlier = [k for k, other in enumerate(named) if other.name == name]
        if earlier:
            raise UserError(f"style name {name!r} is used twice", style_name_key(given, index),
                            f"data.styles[{earlier[0]}] has it too; give each style its own name")
        named.append(dataclasses.replace(entry, name=name))
    return named


def check_name_part(name: str, key: str) -> str:
    """Refuse a name that goes into output file names unless it is a plain file name: no separator,
    no `.`/`..`, no leading dot (hidden files, and our temporary files' prefix), no control characters."""
    unsafe = (
        not name
        or name.startswith(".")
        or any(separator in name for separator in ("/", "\\"))
        or any(ord(character) < 32 or ord(character) == 127 for character in name)
    )
    if unsafe:
        raise UserError(f"unusable output name {name!r}", key,
                        "names used in output file names must be plain file names (no '/', '\\', "
                        "leading '.' or control characters)")
    return name


def output_names(paths: list[str]) -> list[str]:
    """File stems as output names; a stem that occurs twice gets the job id appended every time."""
    stems = [Path(path).stem for path in paths]
    return [stem if stems.count(stem) == 1 else f"{stem}-{index}" for index, stem in enumerate(stems)]


def job_output_files(name: str, styles: list[StyleEntry]) -> dict[str, Any]:
    """Every file a job writes, relative to the output folder. The ONE place output names are made.

    results: `<name>.png`, or `<name>_<style>.png` per style when several styles have no masks.
    grid: `<name>_grid.png` (written only with `model.output.grid`, but always reserved).
    masks: `<name>_mask<k>_<style>.png` per style, None for styles without a mask.
    """
    if styles[0].mask is not None or len(styles) == 1:
        results = [f"{name}.png"]
    else:
        results = [f"{name}_{entry.name}.png" for entry in styles]
    masks = [f"{name}_mask{k}_{entry.name}.png" if entry.mask is not None else None for k, entry in enumerate(styles)]
    return {"results": results, "grid": f"{name}_grid.png", "masks": masks}


def labelled_files(files: dict[str, Any]) -> list[tuple[str, str]]:
    """(what it is, file name) for each file of `job_output_files`."""
    labelled = [(f"result {k}", name) for k, name in enumerate(files["results"])]
    labelled.append(("grid", files["grid"]))
    labelled += [(f"mask {k}", name) for k, name in enumerate(files["masks"]) if name is not None]
    return labelled


def distinct_job_outputs(contents: list[str], styles: list[StyleEntry]) -> list[tuple[str, dict[str, Any]]]:
    """Each job's output name and files, no file name shared in the whole run (results, grids and
    masks alike), so no job overwrites another's file or is skipped because of it.

    A job whose files would meet an earlier job's (content `x_grid.png` after `x.png`) gets its id
    appended; a clash inside one job (a style named `grid`) is refused. Names are compared
    case-folded because on macOS and Windows `X.png` and `x.png` are one file.
    """
    taken: dict[str, tuple[int, str]] = {}  # case-folded file name -> (job id, which output it is)
    jobs = []
    for job_id, name in enumerate(output_names(contents)):
        key = f"data.content[{job_id}]"
        check_name_part(name, key)
        files = job_output_files(name, styles)
        if any(file.casefold() in taken for _, file in labelled_files(files)):
            name = f"{name}-{job_id}"
            files = job_output_files(name, styles)
        for what, file in labelled_files(files):
            label = f"the {what} of {key}"
            if len(file.encode()) > MAX_FILE_NAME_BYTES:
                raise UserError(f"output file name too long ({len(file.encode())} bytes)", key,
                                f"{label} would be {file!r}, over {MAX_FILE_NAME_BYTES} bytes; "
                                "shorten the content's file name or the style names")
            if file.casefold() in taken:
                other_job, other_label = taken[file.casefold()]
                # inside one job only a style name can cause it; across jobs, the content names
                where = "data.styles" if other_job == job_id else key
                raise UserError("two outputs would have the same file name", where,
                                f"{file} would be both {other_label} and {label}; rename one")
            taken[file.casefold()] = (job_id, label)
        jobs.append((name, files))
    return jobs


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
        self.outputs = distinct_job_outputs(self.content, self.styles)
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
                "files": files,
                "resolution": self.resolution,
            }
            for index, (path, (name, files)) in enumerate(zip(self.content, self.outputs))
        ]

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            JobDataset(self.jobs()),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_as_list,
        )
