"""Stylization jobs for Lightning's predict loop.

A job (`Job`, frozen) is one content image with its style entries, a seed, its output files
(`naming.JobFiles`) and the resolution. Jobs come from `data.content` (files, folders, patterns,
lists) paired with `data.styles` (`together` or `product`), or from the rows of `data.manifest`; see
`data.sources` for the inputs. The job id is the output name, made from the content's path relative
to its input root and the style names (`naming.default_output_name`), and the seed is derived from
(base seed, job id): a job gives the same result whichever process or run handles it, and adding
inputs renames nothing. The job travels inside the batch (never rely on Lightning's batch indices:
DDP splits the items by stride). The items are chunks of `batch_size` consecutive jobs, stylized
together. Output names are checked (`naming`) when the data module is built, before any model loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from diffstyler.checks import check_resolution
from diffstyler.errors import UserError, config_error
from diffstyler.data.sources import IMAGE_EXTENSIONS, ContentFile, ManifestRow, expand_content, expand_entry, read_manifest
from diffstyler.images import check_image_header, load_image
from diffstyler.data.naming import (
    JobFiles,
    check_output_name,
    default_output_name,
    distinct_job_outputs,
    distinct_style_names,
)
from diffstyler.lora import LORA_WEIGHTS_NAME, recorded_prompt, resolve_lora_file
from diffstyler.masks import MaskSpec, open_mask_file


@dataclass
class StyleEntry:
    """One style of a job: a LoRA (DiffStyler, the paper's method) or a style image alone (StyleID,
    training-free).

    Args:
        lora: a LoRA `.safetensors` file or a folder holding `pytorch_lora_weights.safetensors`
            (ours from `diffstyler fit`, or a community LoRA in a format diffusers reads), or a
            folder of such folders (what `diffstyler fit` with `data.one_lora_per_image` writes),
            which stands for one style per LoRA folder in it (`expand_style_folders`). None: the
            style is `image`, applied by StyleID (no training).
        prompt: the style prompt; None takes the prompt recorded in the LoRA's `diffstyler_lora.json`
            (an image style has none: StyleID uses no text).
        scale: LoRA scale (0 = base model).
        mask: where the style goes (a `MaskSpec`); None styles the whole image.
        name: used in output file names (default: the LoRA's folder or file name, or the image's).
        image: the style image: with `lora`, shown in the result grid and paired with the results
            by `diffstyler test`; without, the style itself (StyleID), where a folder, a glob
            pattern or a `.txt` list of images (as `data.content` reads them) stands for one
            StyleID style per image, named after its file (`expand_style_folders`).
    """

    lora: Optional[str] = None
    prompt: Optional[str] = None
    scale: float = 1.0
    mask: Optional[MaskSpec] = None
    name: Optional[str] = None
    image: Optional[str] = None

    @property
    def method(self) -> str:
        """"diffstyler" for a LoRA style, "styleid" for an image style."""
        return "diffstyler" if self.lora is not None else "styleid"

    def resolved(self) -> "StyleEntry":
        """A copy with the LoRA file (or the image) checked and prompt and name filled in."""
        if self.lora is None:
            if self.image is None:
                raise config_error("data.styles", "a style needs a `lora` (DiffStyler) or an `image` alone (StyleID)")
            return dataclasses.replace(self, prompt="", name=self.name or Path(self.image).stem)
        file = resolve_lora_file(self.lora)
        prompt = self.prompt if self.prompt is not None else recorded_prompt(file)
        name = self.name or (file.parent.name if file.name == LORA_WEIGHTS_NAME else file.stem)
        return dataclasses.replace(self, lora=str(file), prompt=prompt, name=name)


def job_seed(base_seed: int, job_id: int | str) -> int:
    """A 63-bit seed that depends on both numbers and is the same on every machine."""
    digest = hashlib.sha256(f"{base_seed}:{job_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def expand_style_folders(styles: list[StyleEntry]) -> list[StyleEntry]:
    """Each entry that stands for several styles replaced by one entry per style, with the entry's
    prompt, scale and mask: a `lora` that is a folder of LoRA folders by one per LoRA folder in it
    (sorted, each named after its folder); an `image` alone (StyleID) that is a folder, a glob
    pattern or a list of images by one per image (in `data.content`'s order, each named after its file)."""
    expanded = []
    for index, entry in enumerate(styles):
        if entry.lora is not None:
            parts = [dataclasses.replace(entry, lora=str(folder)) for folder in lora_folders_in(entry.lora)]
            what = f"{len(parts)} LoRAs", f"{entry.lora} is a folder of LoRA folders", "LoRA folder"
        else:
            parts = [dataclasses.replace(entry, image=file.path) for file in style_images_in(entry.image, index)]
            what = f"{len(parts)} style images", f"{entry.image} names several images", "image file"
        if not parts:
            expanded.append(entry)
            continue
        given = "name" if entry.name is not None else "image" if entry.lora is not None and entry.image is not None else None
        if given is not None:
            many, why, each = what
            raise UserError(f"{given} given for {many}", f"data.styles[{index}].{given}",
                            f"{why}; leave {given} out (each style is named after its {each}), or name them one by one")
        expanded += parts
    return expanded


def style_images_in(image: Optional[str], index: int) -> list[ContentFile]:
    """The images an image style's `image` names when it is a folder, a pattern or a list file;
    [] for one image file (or none)."""
    if image is None or (Path(image).is_file() and Path(image).suffix.lower() in IMAGE_EXTENSIONS):
        return []
    return expand_entry(image, f"data.styles[{index}].image")


def lora_folders_in(path: str) -> list[Path]:
    """The subfolders of `path` that hold a `pytorch_lora_weights.safetensors`, when `path` is a
    folder without one itself; [] otherwise."""
    folder = Path(path)
    if not folder.is_dir() or (folder / LORA_WEIGHTS_NAME).exists():
        return []
    return sorted(sub for sub in folder.iterdir() if not sub.name.startswith(".") and (sub / LORA_WEIGHTS_NAME).is_file())


def check_scales(styles: list[StyleEntry]) -> None:
    for index, entry in enumerate(styles):
        if not math.isfinite(entry.scale):
            raise config_error(f"data.styles[{index}].scale", f"must be a finite number, got {entry.scale}")


def check_styles(styles: list[StyleEntry]) -> list[StyleEntry]:
    if not styles:
        raise config_error("data.styles", "give at least one style entry")
    masked = [s.mask is not None for s in styles]
    if any(masked) and not all(masked):
        raise config_error("data.styles", "either every style entry has a mask (localized transfer) or none has (one image per style)")
    for entry in styles:
        if entry.mask is not None and entry.mask.file is not None:
            open_mask_file(entry.mask.file)  # read now: a bad file fails before any model loads
        if entry.image is not None:
            load_image(entry.image)
    return distinct_style_names(styles, [entry.resolved() for entry in styles])


# --- jobs from the inputs -----------------------------------------------------------------------

Pairing = Literal["together", "product"]
PAIRINGS = ("together", "product")


@dataclass(frozen=True)
class JobSpec:
    """One job before its output files are fixed.

    where: the input it came from, for messages (`data.content[2]`, `list.txt:4`, `jobs.csv:5`).
    name: the output name, a relative posix path without extension (see `default_output_name`).
    given: the user chose `name` (a manifest's `output`): a clash is refused, not renamed.
    """

    content: str
    where: str
    name: str
    styles: tuple[StyleEntry, ...]
    given: bool = False


@dataclass(frozen=True)
class Job:
    """One job as the predictor receives it.

    id: the output name (a relative posix path without extension), unique in the run.
    where: the input it came from, for messages.
    seed: derived from the base seed and `id` (`job_seed`).
    files: every file it writes, relative to the output folder.
    resolution: the content's longer side after resizing.
    """

    id: str
    content: str
    where: str
    styles: tuple[StyleEntry, ...]
    seed: int
    files: JobFiles
    resolution: int


def content_jobs(contents: list[ContentFile], styles: list[StyleEntry], pairing: str) -> list[JobSpec]:
    """`together`: one job per content with every style; `product`: one job per (content, style),
    content-major, so a content's styles run one after the other and share its inversion."""
    if pairing == "together":
        return [JobSpec(c.path, c.where, default_output_name(c.rel, styles, True), tuple(styles)) for c in contents]
    return [
        JobSpec(c.path, c.where, default_output_name(c.rel, [entry], False), (entry,))
        for c in contents
        for entry in styles
    ]


def manifest_jobs(rows: list[ManifestRow], styles: list[StyleEntry], manifest: str) -> list[JobSpec]:
    """One job per manifest row: its styles by name (from `data.styles`), LoRA path (DiffStyler) or
    style image path (StyleID), with the row's masks, prompt and scale; `output` is the output name
    (checked to stay inside the output folder)."""
    by_name = {entry.name: entry for entry in styles}
    folder = Path(manifest).parent
    paths: dict[str, StyleEntry] = {}  # LoRA or image path -> resolved entry, so each is resolved once
    specs = []
    for row in rows:
        where = f"data.manifest row {row.number} ({row.where})"
        entries = [_manifest_style(name, by_name, folder, paths, where) for name in row.styles] or list(styles)
        if not entries:
            raise UserError("row has no styles", where, "give the row's styles, or data.styles for rows without any")
        if row.masks and len(row.masks) != len(entries):
            raise UserError("masks do not match styles", where,
                            f"{len(row.masks)} masks for the {len(entries)} styles of data.styles; give one mask per style")
        entries = _with_row_settings(entries, row)
        entries = distinct_style_names(entries, entries, where)
        if row.output is not None:
            name = check_output_name(row.output.removesuffix(".png"), where)
            specs.append(JobSpec(row.content, where, name, tuple(entries), given=True))
        else:
            specs.append(JobSpec(row.content, where, default_output_name(row.rel, entries, False), tuple(entries)))
    return specs


def _manifest_style(name: str, by_name: dict[str, StyleEntry], folder: Path, paths: dict, where: str) -> StyleEntry:
    """A row's style: a name from `data.styles`, else a path (relative to the manifest's folder): a
    style image (StyleID, by its extension) or a LoRA file or folder (DiffStyler)."""
    if name in by_name:
        return by_name[name]
    path = name if Path(name).is_absolute() else str(folder / name)
    if path not in paths:
        if not Path(path).exists():
            known = ", ".join(sorted(by_name)) or "none"
            raise UserError(f"unknown style {name!r}", where,
                            f"neither a style name in data.styles ({known}) nor a LoRA file or folder nor a style image")
        is_image = Path(path).suffix.lower() in IMAGE_EXTENSIONS
        try:
            if is_image:
                check_image_header(path)  # decoded when its job runs, as contents are
            paths[path] = StyleEntry(image=path).resolved() if is_image else StyleEntry(lora=path).resolved()
        except UserError as error:
            raise UserError(error.what, where, f"{error.where}: {error.why}") from error
    return paths[path]


def _with_row_settings(entries: list[StyleEntry], row: ManifestRow) -> list[StyleEntry]:
    """The row's masks (one per style), prompt and scale applied to its styles."""
    changed = []
    for k, entry in enumerate(entries):
        updates: dict[str, Any] = {}
        if row.masks and row.masks[k] is not None:
            updates["mask"] = MaskSpec(file=row.masks[k])
        if row.prompt is not None:
            updates["prompt"] = row.prompt
        if row.scale is not None:
            updates["scale"] = row.scale
        changed.append(dataclasses.replace(entry, **updates))
    masked = [entry.mask is not None for entry in changed]
    if any(masked) and not all(masked):
        where = f"data.manifest row {row.number} ({row.where})"
        raise UserError("some styles of the row have a mask and some not", where, "give every style of a row a mask, or none")
    return changed


def chunked(items: list[Any], size: int) -> list[list[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


class ChunkDataset(Dataset):
    """Item i is chunk i: up to `data.batch_size` consecutive jobs, stylized together. Chunks, not
    jobs, are what DDP deals out to the processes, so a chunk's jobs (a content's styles in product
    pairing) share one process and one inversion."""

    def __init__(self, chunks: list[list[Job]]):
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> list[Job]:
        return self.chunks[index]


def _the_chunk(items: list[list[Job]]) -> list[Job]:
    return items[0]


OnError = Literal["continue", "stop"]


class StylizeDataModule(LightningDataModule):
    """Stylization jobs from content inputs and style entries, or from a manifest.

    Nothing is decoded here: the files named one by one in `content` are checked by their headers.
    Each job's own inputs are checked before the model loads (`data.inputs`, from
    `StylizePredictor.check_run`): the jobs that would fail are set in `failed_up_front`, left out
    of the chunks, and recorded as failed by the writer when the run starts.

    Args:
        content: image files, folders (recursive), glob patterns and `.txt` lists of paths
            (`data.sources.expand_content`).
        styles: style entries (`StyleEntry`: lora, prompt, scale, mask, name, image; see
            `--data.styles.help StyleEntry`), or a YAML file holding their list.
        manifest: instead of `content`: a CSV or JSONL file, one job per row
            (`data.sources.read_manifest`); a row's styles are names from `styles` or LoRA paths.
        pairing: `together` (every content with all styles: one fused image with masks, else one
            image per style) or `product` (one job and one output per content x style).
        seed: base seed; a job's seed is derived from it and the job's id (its output name).
        resolution: the content's longer side is resized to this (sides rounded to multiples of 8).
        batch_size: jobs per UNet call (jobs of one size share the call; see `model.max_unet_rows`).
        num_workers: DataLoader workers (jobs are small descriptions; images are read when a job runs).
        on_error: `continue` records a failing job in results.jsonl and goes on (the command exits
            with status 1 at the end); `stop` ends the run at the first failure.
    """

    def __init__(
        self,
        content: Optional[list[str]] = None,
        styles: Optional[list[StyleEntry]] = None,
        manifest: Optional[str] = None,
        pairing: Pairing = "together",
        seed: int = 0,
        resolution: int = 512,
        batch_size: int = 1,
        num_workers: int = 0,
        on_error: OnError = "continue",
    ):
        super().__init__()
        check_resolution(resolution, "data.resolution")
        if pairing not in PAIRINGS:
            raise config_error("data.pairing", f"must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
        if on_error not in ("continue", "stop"):
            raise config_error("data.on_error", f"must be 'continue' or 'stop', got {on_error!r}")
        if batch_size < 1:
            raise config_error("data.batch_size", f"must be >= 1, got {batch_size}")
        if manifest is not None and content:
            raise config_error("data.manifest", "give data.content or data.manifest, not both")
        content, styles = list(content or []), list(styles or [])
        check_scales(styles)
        self.styles = check_styles(expand_style_folders(styles)) if styles or manifest is None else []
        if manifest is not None:
            specs = manifest_jobs(read_manifest(manifest), self.styles, manifest)
        else:
            check_named_files(content)
            specs = content_jobs(expand_content(content), self.styles, pairing)
        if not specs:
            source = "data.manifest" if manifest is not None else "data.content"
            raise UserError("nothing to stylize", source, "it gives 0 jobs; name image files, folders, patterns or manifest rows")
        self.outputs = distinct_job_outputs(specs)
        self.seed = seed
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_error = on_error
        self.failed_up_front: list[tuple[Job, UserError]] = []  # set before the model loads (see above)

    def jobs(self) -> list[Job]:
        return [
            Job(spec.name, spec.content, spec.where, spec.styles, job_seed(self.seed, spec.name), files, self.resolution)
            for spec, files in self.outputs
        ]

    def transfer_batch_to_device(self, batch: list[Job], device, dataloader_idx: int) -> list[Job]:
        """A chunk of jobs names files (read when each job runs): nothing to move."""
        return batch

    def needs_segmenter(self) -> bool:
        """Whether any job's mask comes from FastSAM (a text, box or points prompt, not a file)."""
        return any(entry.mask is not None and entry.mask.file is None for entry in self._style_entries())

    def needs_text_prompts(self) -> bool:
        """Whether any job's mask is a text prompt (FastSAM then needs a CLIP model)."""
        return any(entry.mask is not None and entry.mask.text is not None for entry in self._style_entries())

    def _style_entries(self) -> list[StyleEntry]:
        return [entry for spec, _ in self.outputs for entry in spec.styles]

    def job_ids(self) -> list[str]:
        return [spec.name for spec, _ in self.outputs]

    def predict_dataloader(self) -> DataLoader:
        failed = {job.id for job, _ in self.failed_up_front}
        chunks = chunked([job for job in self.jobs() if job.id not in failed], self.batch_size)
        processes = self.trainer.world_size if self.trainer is not None else 1
        # Lightning's sampler needs an item per process: fewer chunks than processes get empty ones
        chunks += [[] for _ in range(processes - len(chunks))]
        return DataLoader(
            ChunkDataset(chunks),
            batch_size=1,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_the_chunk,
        )


def check_named_files(entries: list[str]) -> None:
    """Header check of the image files named one by one (few, and a typo there should fail in
    seconds); files found in folders, patterns and lists are read when their job runs."""
    for index, entry in enumerate(entries):
        if Path(entry).suffix.lower() in IMAGE_EXTENSIONS and Path(entry).is_file():
            try:
                check_image_header(entry)
            except UserError as error:
                raise UserError(error.what, f"data.content[{index}]", f"{error.where}: {error.why}") from error
