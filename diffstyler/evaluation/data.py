"""What `diffstyler test` scores: (content, style image, result) triples, from the output folders of
`diffstyler predict` runs or from a CSV.

- A predict run's folder: its `results.jsonl` names each job's content, styles and outputs. The
  style image of a result is its style's `image` where the style entry gave one (a StyleID style is
  that image; a LoRA style may name it), else the image its LoRA was trained on, recorded in the
  LoRA's `diffstyler_lora.json` (`style_images`, written by `diffstyler fit`). Jobs that did not
  finish (`failed`) are left out, and so are jobs with several styles in one fused image (no single
  style to compare with).
- A CSV with the columns `content,style,result` (paths relative to the CSV's folder).

A triple whose file is missing is reported (one warning line naming the file) and skipped; the
summary says how many were scored.

Each metric sees the images as in StyleID's evaluation by default: LPIPS and FID at shorter side 512
with the aspect kept, CFSD at the result's own size (`styleid_images`). `data.size: N` stretches every
image to N x N instead (`stretched_images`), a deliberate deviation for speed whose numbers are not
comparable with StyleID's. CSD always sees its authors' input, a 224 x 224 center crop of each image
(`csd.csd_input`), whatever `data.size` says: its network takes no other size. Images of different
sizes travel as lists (`collate_triples`) and are stacked where their sizes agree (`same_size_groups`).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import InterpolationMode, resize

from diffstyler.errors import MissingFileError, UserError, config_error
from diffstyler.evaluation.csd import CSD_INPUT_SIZE, csd_input
from diffstyler.images import load_image
from diffstyler.lora import read_lora_info
from diffstyler.outputs import pil_to_unit
from diffstyler.results import DONE, RESULTS_NAME, SKIPPED, read_json_lines

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredTriple:
    """One result to score: its content, the style image it should look like, and the run it is from."""

    content: str
    style: str
    result: str
    style_name: str
    run: str


def triples_from_results(folder: str) -> list[ScoredTriple]:
    """The finished single-style jobs of a predict run's output folder."""
    results = Path(folder) / RESULTS_NAME
    if not results.is_file():
        raise MissingFileError("no results.jsonl", f"data.results ({folder})",
                               f"{results} does not exist; give the output folder of a `diffstyler predict` run")
    triples = []
    for line in read_json_lines(results):
        styles, outputs = line.get("styles") or [], line.get("outputs") or []
        if line.get("status") not in (DONE, SKIPPED) or len(styles) != 1 or len(outputs) != 1:
            continue
        style = style_image_of(line)
        if style is None:
            log.warning("not scored: %s (no style image: its style entry names none, nor does its LoRA %s)",
                        line["id"], (line.get("loras") or [None])[0])
            continue
        triples.append(ScoredTriple(line["content"], style, str(Path(folder) / outputs[0]), styles[0], folder))
    return triples


def style_image_of(line: dict[str, Any]) -> Optional[str]:
    """The style image of a single-style job's line of results.jsonl: the image its style entry
    gave (a StyleID style's own; lines of runs before `images` was recorded have none), else the
    one its LoRA records."""
    image = (line.get("images") or [None])[0]
    if image is not None:
        return str(image)
    lora = (line.get("loras") or [None])[0]
    return None if lora is None else recorded_style_image(lora)


def recorded_style_image(lora: str) -> Optional[str]:
    """The first style image recorded in the LoRA's `diffstyler_lora.json` (`diffstyler fit` writes
    `{path, sha256, size}` per image, the path as given to fit: relative to where it ran), or None."""
    try:
        info = read_lora_info(lora)
    except UserError as error:
        log.warning("%s", error)
        return None
    images = (info or {}).get("style_images") or []
    if not images:
        return None
    return str(images[0]["path"] if isinstance(images[0], dict) else images[0])


def triples_from_csv(path: str) -> list[ScoredTriple]:
    """Rows `content,style,result` of a CSV; the style's name is its file stem."""
    if not os.path.isfile(path):
        raise MissingFileError("no such file", "data.pairs", f"{path} does not exist")
    folder = os.path.dirname(path)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"content", "style", "result"} - set(reader.fieldnames or [])
        if missing:
            raise UserError("missing columns", f"data.pairs ({path})", f"needs content,style,result; no {', '.join(sorted(missing))}")
        rows = list(reader)

    def joined(value: str) -> str:
        return value if os.path.isabs(value) else os.path.join(folder, value)

    return [ScoredTriple(joined(row["content"]), joined(row["style"]), joined(row["result"]),
                         Path(row["style"]).stem, path) for row in rows]


def existing(triples: list[ScoredTriple]) -> list[ScoredTriple]:
    """The triples whose three files exist; each one left out is reported with the missing file."""
    kept = []
    for triple in triples:
        absent = [path for path in (triple.content, triple.style, triple.result) if not os.path.isfile(path)]
        if absent:
            log.warning("not scored (%s): %s is missing", triple.run, absent[0])
            continue
        kept.append(triple)
    return kept


# --- what each metric sees ------------------------------------------------------------------
#
# StyleID's evaluation (github.com/jiwoogit/StyleID, evaluation/eval_artfid.py): LPIPS and FID read
# every image with `Compose([Resize(512), ToTensor()])`: the shorter side to 512, the aspect kept,
# torchvision's default interpolation (bilinear, on the PIL image); content and result are resized
# each on its own. CFSD reads them with `ToTensor()` only, at their own size, one pair per batch.
# DiffStyler's result is not always the content's size (its sides are rounded to multiples of 8),
# where StyleID's code would fail on the shapes; the content is then resized to the result's size.

STYLEID_SHORTER_SIDE = 512
IMAGE_KEYS = ("content", "style", "result", "cfsd_content", "cfsd_result", "csd_style", "csd_result")


def styleid_images(content: Image.Image, style: Image.Image, result: Image.Image) -> dict[str, torch.Tensor]:
    """The triple as StyleID's metrics see it (see above), [3, H, W] in [0, 1] each: `content` and
    `result` for LPIPS, `style` and `result` for FID, `cfsd_content` and `cfsd_result` for CFSD
    (and `csd_style` and `csd_result` for CSD, `csd_images`)."""
    scaled_result = shorter_side_to(result, STYLEID_SHORTER_SIDE)
    return {
        # for a content of the result's aspect this is Resize(512) of the content itself
        "content": pil_to_unit(content.resize(scaled_result.size, Image.Resampling.BILINEAR)),
        "style": pil_to_unit(shorter_side_to(style, STYLEID_SHORTER_SIDE)),
        "result": pil_to_unit(scaled_result),
        "cfsd_content": pil_to_unit(content.resize(result.size, Image.Resampling.BILINEAR)),  # unchanged at equal size
        "cfsd_result": pil_to_unit(result),
        **csd_images(style, result),
    }


def csd_images(style: Image.Image, result: Image.Image) -> dict[str, torch.Tensor]:
    """The style image and the result as CSD's authors read them (`csd.csd_input`), [3, 224, 224]."""
    return {"csd_style": csd_input(style), "csd_result": csd_input(result)}


def shorter_side_to(image: Image.Image, length: int) -> Image.Image:
    """torchvision's `Resize(length)` on a PIL image, as StyleID calls it: the shorter side to `length`,
    the longer one scaled and truncated to an integer, bilinear."""
    return resize(image, [length], interpolation=InterpolationMode.BILINEAR)


def stretched_images(content: Image.Image, style: Image.Image, result: Image.Image, size: int) -> dict[str, torch.Tensor]:
    """`data.size`, a deliberate deviation from StyleID: every image stretched (not cropped) to
    size x size, bicubic, and every metric on these, CFSD included; CSD still on its own input."""
    content_pixels, style_pixels, result_pixels = (pil_to_unit(image.resize((size, size), Image.Resampling.BICUBIC))
                                                   for image in (content, style, result))
    return {"content": content_pixels, "style": style_pixels, "result": result_pixels, "cfsd_content": content_pixels,
            "cfsd_result": result_pixels, **csd_images(style, result)}


def describe_preprocessing(size: Optional[int]) -> str:
    """What the metrics saw, for metrics.json."""
    csd = f"; CSD on the authors' {CSD_INPUT_SIZE}x{CSD_INPUT_SIZE} center crop (shorter side resized, bicubic)"
    if size is None:
        return (f"StyleID's: LPIPS and FID at shorter side {STYLEID_SHORTER_SIDE} (aspect kept, bilinear), "
                f"CFSD at the result's own size{csd}")
    return (f"data.size {size}: every image stretched to {size}x{size} (bicubic), not comparable with StyleID's "
            f"numbers{csd}")


class TripleDataset(Dataset):
    """The triples' images as the metrics see them: `styleid_images`, or `stretched_images` when
    `size` is given."""

    def __init__(self, triples: list[ScoredTriple], runs: list[str], size: Optional[int]):
        self.triples, self.runs, self.size = triples, runs, size

    def __len__(self) -> int:
        return len(self.triples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        triple = self.triples[index]
        content, style, result = load_image(triple.content), load_image(triple.style), load_image(triple.result)
        if self.size is None:
            images = styleid_images(content, style, result)
        else:
            images = stretched_images(content, style, result, self.size)
        return {"index": index, "run": self.runs.index(triple.run), **images}


def collate_triples(items: list[dict[str, Any]]) -> dict[str, Any]:
    """`index` and `run` as tensors [B]; the images as lists of [3, H, W], since their sizes may
    differ from triple to triple (`same_size_groups` stacks those that can be)."""
    batch: dict[str, Any] = {key: torch.tensor([item[key] for item in items]) for key in ("index", "run")}
    batch.update({key: [item[key] for item in items] for key in IMAGE_KEYS})
    return batch


def same_size_groups(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The batch cut into groups of one run whose images have one size each, stacked [b, 3, H, W],
    in the order of their first triple (with `data.size` or images of one size: one group per run)."""
    positions: dict[tuple, list[int]] = {}
    for position, run in enumerate(batch["run"].tolist()):
        shapes = tuple(tuple(batch[key][position].shape) for key in IMAGE_KEYS)
        positions.setdefault((run, shapes), []).append(position)
    groups = []
    for (run, _), rows in positions.items():
        group: dict[str, Any] = {"run": run, "index": batch["index"][rows]}
        group.update({key: torch.stack([batch[key][row] for row in rows]) for key in IMAGE_KEYS})
        groups.append(group)
    return groups


class EvaluationDataModule(LightningDataModule):
    """The (content, style image, result) triples `diffstyler test` scores.

    Args:
        results: output folders of predict runs (several: a comparison of runs).
        pairs: a CSV `content,style,result` instead of `results`.
        size: None (default) for StyleID's preprocessing (LPIPS and FID at shorter side 512, aspect
            kept; CFSD at the result's own size); a number N stretches every image to N x N for
            LPIPS, FID and CFSD, a deliberate deviation (faster, not comparable with StyleID's
            numbers). CSD sees its authors' 224 x 224 center crop either way.
        batch_size: triples per batch of the metrics' networks.
        num_workers: DataLoader workers reading the images.
    """

    def __init__(self, results: Optional[list[str]] = None, pairs: Optional[str] = None, size: Optional[int] = None,
                 batch_size: int = 8, num_workers: int = 0):
        super().__init__()
        if bool(results) == (pairs is not None):
            raise config_error("data.results", "give data.results (predict output folders) or data.pairs (a CSV), one of them")
        if size is not None and size < 16:
            raise config_error("data.size", f"must be >= 16, got {size}")
        self.runs = list(results) if results else [pairs]
        listed = [t for folder in results for t in triples_from_results(folder)] if results else triples_from_csv(pairs)
        self.all_triples = listed
        self.triples = existing(listed)
        if not self.triples:
            raise UserError("nothing to score", "data.results" if results else "data.pairs",
                            f"{len(listed)} results listed, none with all its files")
        self.size, self.batch_size, self.num_workers = size, batch_size, num_workers

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TripleDataset(self.triples, self.runs, self.size), batch_size=self.batch_size,
                          shuffle=False, num_workers=self.num_workers, collate_fn=collate_triples)
