"""What `diffstyler test` scores: (content, style image, result) triples, from the output folders of
`diffstyler predict` runs or from a CSV.

- A predict run's folder: its `results.jsonl` names each job's content, LoRAs and outputs; the style
  image of a LoRA is the one it was trained on, recorded in its `diffstyler_lora.json`
  (`style_images`, written by `diffstyler fit`). Jobs that did not finish (`failed`) are left out,
  and so are jobs with several styles in one fused image (no single style to compare with).
- A CSV with the columns `content,style,result` (paths relative to the CSV's folder).

A triple whose file is missing is reported (one warning line naming the file) and skipped; the
summary says how many were scored.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from diffstyler.errors import MissingFileError, UserError, config_error
from diffstyler.images import load_image
from diffstyler.lora import LORA_INFO_NAME
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
        loras, outputs = line.get("loras") or [], line.get("outputs") or []
        if line.get("status") not in (DONE, SKIPPED) or len(loras) != 1 or len(outputs) != 1:
            continue
        style = recorded_style_image(loras[0])
        if style is None:
            log.warning("not scored: %s (its LoRA %s records no style image)", line["id"], loras[0])
            continue
        triples.append(ScoredTriple(line["content"], style, str(Path(folder) / outputs[0]), line["styles"][0], folder))
    return triples


def recorded_style_image(lora: str) -> Optional[str]:
    """The first style image recorded in the LoRA's `diffstyler_lora.json` (`diffstyler fit` writes
    `{path, sha256, size}` per image, the path as given to fit: relative to where it ran), or None."""
    folder = Path(lora).parent if Path(lora).suffix == ".safetensors" else Path(lora)
    info = folder / LORA_INFO_NAME
    try:
        images = json.loads(info.read_text()).get("style_images") or []
    except (OSError, ValueError, AttributeError):
        return None
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


def square_image(path: str, size: int) -> torch.Tensor:
    """[3, size, size] in [0, 1]: the image resized (not cropped) to the metrics' input size."""
    return pil_to_unit(load_image(path).resize((size, size), Image.Resampling.BICUBIC))


class TripleDataset(Dataset):
    def __init__(self, triples: list[ScoredTriple], runs: list[str], size: int):
        self.triples, self.runs, self.size = triples, runs, size

    def __len__(self) -> int:
        return len(self.triples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        triple = self.triples[index]
        return {
            "index": index,
            "run": self.runs.index(triple.run),
            "content": square_image(triple.content, self.size),
            "style": square_image(triple.style, self.size),
            "result": square_image(triple.result, self.size),
        }


class EvaluationDataModule(LightningDataModule):
    """results: output folders of predict runs (several: a comparison of runs); pairs: a CSV
    `content,style,result` instead. size: every image is resized to size x size for the metrics."""

    def __init__(self, results: Optional[list[str]] = None, pairs: Optional[str] = None, size: int = 256,
                 batch_size: int = 8, num_workers: int = 0):
        super().__init__()
        if bool(results) == (pairs is not None):
            raise config_error("data.results", "give data.results (predict output folders) or data.pairs (a CSV), one of them")
        if size < 16:
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
                          shuffle=False, num_workers=self.num_workers)
