"""Ablation grids (paper Fig. 6 and 7): one content and one style under several injection settings.

`SweepConfig` lists values for injection fields; every combination is one cell. The first swept
field (in the order of the dataclass) varies down the rows, the product of the others along the
columns, so `feature_steps` x `attention_steps` gives the layout of Fig. 7 and `features` x
`self_attention` x `cross_attention` that of Fig. 6. The content is inverted once for all cells.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Optional

from PIL import Image, ImageDraw, ImageFont

from diffstyler.errors import config_error
from diffstyler.injection import InjectionConfig

LABEL_HEIGHT = 14
LABEL_COLOUR = (0, 0, 0)


@dataclass
class SweepConfig:
    """Values to sweep, per `InjectionConfig` field (None: not swept). Example (Fig. 7):
    `--model.sweep.feature_steps '[0,10,20,30,40,50]' --model.sweep.attention_steps '[0,25]'`.

    Args:
        feature_steps: feature injection windows, one grid row or column each.
        attention_steps: attention injection windows.
        features: feature injection on / off.
        self_attention: self-attention injection on / off.
        cross_attention: cross-attention injection on / off.
    """

    feature_steps: Optional[list[int]] = None
    attention_steps: Optional[list[int]] = None
    features: Optional[list[bool]] = None
    self_attention: Optional[list[bool]] = None
    cross_attention: Optional[list[bool]] = None

    def __post_init__(self) -> None:
        for name, values in self.axes():
            if not values:
                raise config_error(f"model.sweep.{name}", "give at least one value, or leave it unset")
            if len(set(values)) != len(values):
                raise config_error(f"model.sweep.{name}", f"values repeat: {values}")

    def axes(self) -> list[tuple[str, list[Any]]]:
        """(field, values) of every swept field, in the dataclass's order."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    @property
    def active(self) -> bool:
        return bool(self.axes())


@dataclass(frozen=True)
class SweepCell:
    row: int
    column: int
    settings: dict[str, Any]  # the swept fields' values in this cell
    injection: InjectionConfig


def sweep_cells(sweep: SweepConfig, base: InjectionConfig) -> list[SweepCell]:
    """Every combination of the swept values applied to `base`, row by row."""
    axes = sweep.axes()
    (row_name, row_values), columns = axes[0], axes[1:]
    column_names = [name for name, _ in columns]
    column_combinations = list(itertools.product(*[values for _, values in columns]))
    cells = []
    for row, row_value in enumerate(row_values):
        for column, combination in enumerate(column_combinations):
            settings = {row_name: row_value, **dict(zip(column_names, combination))}
            cells.append(SweepCell(row, column, settings, dataclasses.replace(base, **settings)))
    return cells


def _label(settings: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value}" for name, value in settings.items())


def labelled_grid(cells: list[SweepCell], images: list[Image.Image]) -> Image.Image:
    """The cells' images in rows and columns, each row named on the left and each column on top.

    Columns are widened to their label where the images are narrower (smoke runs are 64 px).
    """
    rows = 1 + max(cell.row for cell in cells)
    columns = 1 + max(cell.column for cell in cells)
    width, height = images[0].size
    font = ImageFont.load_default()
    row_names = {cell.row: _label(dict(list(cell.settings.items())[:1])) for cell in cells}
    column_names = {cell.column: _label(dict(list(cell.settings.items())[1:])) for cell in cells}
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    left = 6 + int(max(measure(name, font=font) for name in row_names.values()))
    column_width = max(width, 6 + int(max(measure(name, font=font) for name in column_names.values())))
    top = LABEL_HEIGHT if any(column_names.values()) else 0
    grid = Image.new("RGB", (left + columns * column_width, top + rows * height), "white")
    draw = ImageDraw.Draw(grid)
    for column, name in column_names.items():
        draw.text((left + column * column_width + 3, 1), name, fill=LABEL_COLOUR, font=font)
    for row, name in row_names.items():
        draw.text((3, top + row * height + (height - LABEL_HEIGHT) // 2), name, fill=LABEL_COLOUR, font=font)
    for cell, image in zip(cells, images):
        x = left + cell.column * column_width + (column_width - width) // 2
        grid.paste(image.convert("RGB"), (x, top + cell.row * height))
    return grid


def ablation_grid(sweep: SweepConfig, base: InjectionConfig, stylize: Callable[[InjectionConfig], Image.Image],
                  similarity: Callable[[Image.Image], float]) -> tuple[Image.Image, list[dict[str, Any]]]:
    """The labelled grid of `stylize` under every cell of the sweep, and each cell's settings with
    its `Content SSIM` (`similarity` of its image to the content)."""
    cells = sweep_cells(sweep, base)
    images = [stylize(cell.injection) for cell in cells]
    summaries = [{**cell.settings, "Content SSIM": round(similarity(image), 4)} for cell, image in zip(cells, images)]
    return labelled_grid(cells, images), summaries
