"""The report of `diffstyler compare`: methods run on the same pairs, in one table and one grid.

Each method is a finished `diffstyler predict` run (its output folder: the images and
`results.jsonl`); the scores are those `diffstyler test` wrote for every run in one `metrics.json`
(an entry per run under `runs`). Written into the output folder (atomically):

- `comparison.csv` and `comparison.md`: one row per method: the results scored, every score
  `metrics.json` gives a run (LPIPS, FID, ArtFID, CFSD, CSD, and any metric `diffstyler test` adds: a
  column per number, in its order), seconds per image, the style preparation's seconds per style
  and the total;
- `comparison_grid.png`: content | style | each method's result, one row per pair, for a sample of
  the pairs every method has (evenly spaced over them in sorted order).

Seconds per image: the `seconds` results.jsonl records for each finished job (its inputs read, its
share of the inversions and of the denoising calls it was batched in, decoding; model loading not),
summed over the run's jobs and divided by its images: on several processes, device-seconds.
Style preparation: for a LoRA style, the fit's training loop (`fit_seconds` in the LoRA's
`diffstyler_lora.json`, recorded by `diffstyler fit`), averaged over the run's LoRAs; an image style
(StyleID) needs none (its inversion is in its results' seconds).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from PIL import Image, ImageDraw, ImageFont, ImageOps

from diffstyler.errors import MissingFileError, UserError
from diffstyler.evaluation.data import ScoredTriple, triples_from_results
from diffstyler.evaluation.report import write_csv
from diffstyler.images import load_image
from diffstyler.lora import read_lora_info
from diffstyler.outputs import atomic_save, atomic_write
from diffstyler.results import DONE, RESULTS_NAME, read_json_lines

log = logging.getLogger(__name__)

TABLE_NAME, CSV_NAME, GRID_NAME = "comparison.md", "comparison.csv", "comparison_grid.png"
# Columns of metrics.json's entry of a run that are counts, not scores.
COUNT_KEYS = ("count", "listed")
METRIC_NAMES = {"lpips": "LPIPS", "fid": "FID", "artfid": "ArtFID", "cfsd": "CFSD", "csd": "CSD"}  # others: upper case
METHOD_NAMES = {"diffstyler": "DiffStyler", "styleid": "StyleID"}
GRID_CELL = 256  # the longest side of a grid tile, at most
LABEL_HEIGHT = 14


@dataclass(frozen=True)
class MethodRun:
    """A method's run: its name in the protocol and its predict output folder (as the protocol
    gives it: the key of its entry in metrics.json)."""

    method: str
    folder: str

    @property
    def label(self) -> str:
        return METHOD_NAMES.get(self.method, self.method)


@dataclass(frozen=True)
class RunCost:
    """What a run cost: `images` made by its finished jobs in `seconds` (summed); its `styles`
    (distinct), of which `loras` are LoRAs whose fits took `fit_seconds` each (None: not
    recorded); `methods`: how its styles were given ("diffstyler": a LoRA, "styleid": an image)."""

    images: int
    seconds: float
    styles: int
    loras: int
    fit_seconds: list[Optional[float]]
    methods: frozenset[str]

    @property
    def seconds_per_image(self) -> Optional[float]:
        return self.seconds / self.images if self.images else None

    @property
    def preparation(self) -> Optional[float]:
        """Seconds of preparation per style: the mean fit of its LoRAs, 0 with none (image styles)."""
        if not self.loras:
            return 0.0
        recorded = [seconds for seconds in self.fit_seconds if seconds is not None]
        return sum(recorded) / len(recorded) if len(recorded) == len(self.fit_seconds) else None

    @property
    def total(self) -> Optional[float]:
        if self.preparation is None or self.seconds_per_image is None:
            return None
        return self.preparation * self.loras + self.seconds

    @property
    def styles_given_as(self) -> str:
        return " + ".join(name for method, name in (("diffstyler", "LoRA"), ("styleid", "image")) if method in self.methods)


def run_cost(folder: str) -> RunCost:
    """The cost of a predict run from its results.jsonl and its LoRAs' info files."""
    lines = [line for line in results_lines(folder) if line.get("status") == DONE]
    styles = set()
    for line in lines:
        names, loras = line.get("styles") or [], line.get("loras") or []
        images, methods = line.get("images") or [None] * len(names), line.get("methods") or ["diffstyler"] * len(names)
        styles.update(zip(names, loras, images, methods))
    loras = sorted({lora for _, lora, _, _ in styles if lora is not None})
    return RunCost(images=sum(len(line.get("outputs") or []) for line in lines),
                   seconds=sum(float(line.get("seconds") or 0) for line in lines), styles=len(styles), loras=len(loras),
                   fit_seconds=[fit_seconds(lora) for lora in loras], methods=frozenset(method for *_, method in styles))


def results_lines(folder: str) -> list[dict[str, Any]]:
    path = Path(folder) / RESULTS_NAME
    if not path.is_file():
        raise MissingFileError("no results.jsonl", folder, f"{path} does not exist: the method's predict has not run")
    return read_json_lines(path)


def fit_seconds(lora: str) -> Optional[float]:
    info = read_lora_info(lora) or {}
    seconds = info.get("fit_seconds")
    return float(seconds) if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else None


def run_scores(metrics: dict[str, Any], run: MethodRun, metrics_file: str) -> dict[str, Any]:
    """A run's entry of metrics.json (several runs: under `runs`, by folder)."""
    entry = metrics.get("runs", {}).get(run.folder)
    if entry is None:
        raise UserError(f"no scores of {run.label}'s results", metrics_file,
                        f"its runs are {', '.join(metrics.get('runs', {})) or 'none'}, not {run.folder}: run the comparison's test again")
    return entry


def metric_columns(entries: list[dict[str, Any]]) -> list[str]:
    """Every score the runs' entries give, in metrics.json's order: the numbers that are no counts."""
    columns: list[str] = []
    for entry in entries:
        columns += [key for key, value in entry.items() if key not in COUNT_KEYS and key not in columns
                    and isinstance(value, (int, float)) and not isinstance(value, bool)]
    return columns


def comparison_rows(runs: list[MethodRun], metrics: dict[str, Any], metrics_file: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The metric columns and one row per run: its scores, counts and costs."""
    entries = [run_scores(metrics, run, metrics_file) for run in runs]
    columns = metric_columns(entries)
    rows = []
    for run, entry in zip(runs, entries):
        cost = run_cost(run.folder)
        rows.append({"method": run.label, "styles": cost.styles_given_as, "results": run.folder,
                     "scored": entry.get("count"), "listed": entry.get("listed"),
                     **{column: entry.get(column) for column in columns},
                     "seconds_per_image": cost.seconds_per_image, "style_preparation_seconds": cost.preparation,
                     "style_count": cost.styles, "lora_count": cost.loras, "images": cost.images, "total_seconds": cost.total})
    return columns, rows


def number(value: Optional[float], digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def markdown_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    header = ["method", "style given as", "scored", *(METRIC_NAMES.get(c, c.upper()) for c in columns),
              "s per image", "style preparation, s per style", "total s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        preparation = f"{number(row['style_preparation_seconds'], 3)} (x {row['lora_count']})" if row["lora_count"] else "none"
        cells = [row["method"], row["styles"], f"{row['scored']} of {row['listed']}", *(number(row[c]) for c in columns),
                 number(row["seconds_per_image"], 3), preparation, number(row["total_seconds"], 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(folder: str, columns: list[str], rows: list[dict[str, Any]], notes: list[str]) -> str:
    """comparison.csv (full precision) and comparison.md (the table and its notes); returns the table."""
    fields = ["method", "styles", "results", "scored", "listed", *columns, "seconds_per_image", "style_preparation_seconds",
              "style_count", "lora_count", "images", "total_seconds"]
    write_csv(Path(folder) / CSV_NAME, rows, fields)
    table = markdown_table(columns, rows)
    page = table + "\n" + "".join(f"- {note}\n" for note in notes)
    atomic_write(Path(folder) / TABLE_NAME, lambda handle: handle.write(page.encode("utf-8")))
    return table


# --- the pairs and the grid -----------------------------------------------------------------------

def pair_key(triple: ScoredTriple) -> tuple[str, str]:
    return os.path.normpath(os.path.abspath(triple.content)), os.path.normpath(os.path.abspath(triple.style))


def common_pairs(runs: list[MethodRun]) -> tuple[list[tuple[str, str]], dict[str, dict[tuple[str, str], ScoredTriple]], list[str]]:
    """The (content, style image) pairs every run has a result for, sorted; each run's triples by
    pair; and a note per run with pairs the others lack."""
    by_run = {run.folder: {pair_key(triple): triple for triple in triples_from_results(run.folder)} for run in runs}
    common = sorted(set.intersection(*(set(triples) for triples in by_run.values())))
    notes = [f"{run.label}: {len(by_run[run.folder]) - len(common)} pairs that another method lacks (not in the grid)"
             for run in runs if len(by_run[run.folder]) > len(common)]
    return common, by_run, notes


def sample(items: list[Any], count: int) -> list[Any]:
    """`count` items evenly spaced over `items`, the first and the last included."""
    if count >= len(items):
        return list(items)
    if count <= 1:
        return items[:count]
    return [items[round(k * (len(items) - 1) / (count - 1))] for k in range(count)]


def side_by_side(rows: list[list[Image.Image]], labels: list[str]) -> Image.Image:
    """One row per pair, one column per label (content, style, each method), each image fitted into
    a square tile (aspect kept, white borders), the labels on top."""
    font = ImageFont.load_default()
    width_of = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    cell = min(GRID_CELL, max(max(image.size) for row in rows for image in row))
    column = max(cell, 6 + int(max(width_of(label, font=font) for label in labels)))
    grid = Image.new("RGB", (len(labels) * column, LABEL_HEIGHT + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for k, label in enumerate(labels):
        draw.text((k * column + 3, 1), label, fill="black", font=font)
    for r, images in enumerate(rows):
        for k, image in enumerate(images):
            tile = ImageOps.pad(image.convert("RGB"), (cell, cell), Image.Resampling.LANCZOS, color="white")
            grid.paste(tile, (k * column + (column - cell) // 2, LABEL_HEIGHT + r * cell))
    return grid


def write_grid(folder: str, runs: list[MethodRun], pairs: list[tuple[str, str]],
               by_run: dict[str, dict[tuple[str, str], ScoredTriple]]) -> Optional[Path]:
    """comparison_grid.png of `pairs` (None when there is none to show)."""
    if not pairs:
        return None
    rows = []
    for pair in pairs:
        first = by_run[runs[0].folder][pair]
        rows.append([load_image(first.content), load_image(first.style), *(load_image(by_run[run.folder][pair].result) for run in runs)])
    return atomic_save(side_by_side(rows, ["content", "style", *(run.label for run in runs)]), Path(folder) / GRID_NAME)


def write_comparison(folder: str, runs: list[MethodRun], metrics_file: str, grid_pairs: int) -> str:
    """The table and the grid of `runs` into `folder`; returns the markdown table."""
    path = Path(metrics_file)
    if not path.is_file():
        raise MissingFileError("no metrics.json", metrics_file, "the comparison's `diffstyler test` has not run")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    columns, rows = comparison_rows(runs, metrics, metrics_file)
    pairs, by_run, differences = common_pairs(runs)
    for difference in differences:
        log.warning("%s", difference)
    shown = sample(pairs, grid_pairs)
    write_grid(folder, runs, shown, by_run)
    notes = [
        *differences,
        f"scores: one `diffstyler test` of every run ({metrics_file}); {metrics.get('preprocessing', '')}",
        "s per image: the seconds results.jsonl records per finished job (inputs, its share of the inversions and "
        "denoising calls, decoding; not model loading), summed and divided by the images",
        "style preparation: a LoRA style's fit (`fit_seconds` in its diffstyler_lora.json), x the LoRAs used; "
        "an image style (StyleID) needs none",
        "total s: style preparation x LoRAs + s per image x images",
        f"grid: {GRID_NAME}, {len(shown)} of the {len(pairs)} pairs every method has",
    ]
    return write_table(folder, columns, rows, notes)
