"""Ablation grids (paper Fig. 6 and 7): `model.sweep` cells, their layout and their images."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import diffstyler.pipeline as pipeline_module
import diffstyler.sweep as sweep_module
from diffstyler.data.jobs import StyleEntry, StylizeDataModule
from diffstyler.errors import UserError
from diffstyler.injection import InjectionConfig
from diffstyler.models import ModelSpec
from diffstyler.outputs import read_settings
from diffstyler.predictor import OutputConfig, StylizePredictor
from diffstyler.stylize import SamplingConfig
from diffstyler.sweep import SweepConfig, labelled_grid, sweep_cells
from tests.helpers import stylize_one, write_random_lora

CONTENT = Path(__file__).resolve().parents[1] / "data" / "content_shapes.png"
BASE = InjectionConfig(feature_steps=4, attention_steps=3)


def test_cells_are_every_combination_rows_from_the_first_swept_field():
    cells = sweep_cells(SweepConfig(feature_steps=[0, 2, 4], attention_steps=[0, 3], cross_attention=[True, False]), BASE)
    assert len(cells) == 3 * 4
    assert [(c.row, c.column) for c in cells[:4]] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert cells[5].settings == {"feature_steps": 2, "attention_steps": 0, "cross_attention": False}
    assert cells[5].injection == replace(BASE, feature_steps=2, attention_steps=0, cross_attention=False)


def test_the_grid_puts_each_image_in_its_row_and_column():
    cells = sweep_cells(SweepConfig(feature_steps=[0, 4], attention_steps=[0, 3, 5]), BASE)
    colours = [(10 * k, 0, 200) for k in range(len(cells))]
    grid = np.array(labelled_grid(cells, [Image.new("RGB", (8, 6), c) for c in colours]))
    for cell, colour in zip(cells, colours):
        found = np.argwhere((grid == colour).all(axis=-1))
        assert len(found) == 8 * 6, cell
        (y0, x0), (y1, x1) = found.min(0), found.max(0)
        assert (y1 - y0, x1 - x0) == (5, 7)
    rows = sorted({int(np.argwhere((grid == c).all(-1))[:, 0].min()) for c in colours})
    assert len(rows) == 2  # two rows, three columns


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return write_random_lora(tmp_path_factory.mktemp("lora") / "style", seed=1)


def _predictor(folder: Path, injection=BASE, sweep=SweepConfig()) -> StylizePredictor:
    predictor = StylizePredictor(model=ModelSpec(name="tiny"), injection=injection, sampling=SamplingConfig(steps=6),
                                 output=OutputConfig(folder=str(folder), grid=False, overwrite=True),
                                 inversion_cache=None, progress=False, sweep=sweep)
    predictor.configure_model()
    return predictor


def _job(styles):
    return StylizeDataModule(content=[str(CONTENT)], styles=styles, seed=3, resolution=64).jobs()[0]


@pytest.mark.slow
def test_each_cell_is_the_run_with_that_setting_and_the_content_is_inverted_once(tmp_path, lora, monkeypatch):
    """Catches a cell run with the base settings, cells in the wrong place, or one inversion per cell."""
    grids, inversions = [], []
    real_grid, real_invert = sweep_module.labelled_grid, pipeline_module.invert_batch
    monkeypatch.setattr(sweep_module, "labelled_grid", lambda cells, images: grids.append((cells, images)) or real_grid(cells, images))
    monkeypatch.setattr(pipeline_module, "invert_batch", lambda *a, **k: inversions.append(1) or real_invert(*a, **k))
    sweep = SweepConfig(feature_steps=[0, 4], attention_steps=[0, 3])
    job = _job([StyleEntry(lora=str(lora))])
    result = stylize_one(_predictor(tmp_path / "sweep", sweep=sweep), job)
    assert len(inversions) == 1
    (cells, images), = grids
    assert [c.settings for c in cells] == [{"feature_steps": f, "attention_steps": a} for f in (0, 4) for a in (0, 3)]
    for cell, image in zip(cells, images):
        alone = stylize_one(_predictor(tmp_path / f"cell{cell.row}{cell.column}", injection=cell.injection), job)
        assert np.array_equal(np.array(image), np.array(Image.open(alone.outputs[0]))), cell.settings
    assert not np.array_equal(np.array(images[0]), np.array(images[-1]))
    settings = read_settings(result.outputs[0])
    assert settings["Sweep"]["feature_steps"] == [0, 4] and len(settings["Sweep cells"]) == 4


@pytest.mark.slow
def test_a_sweep_over_several_unmasked_styles_is_refused(tmp_path, lora):
    predictor = _predictor(tmp_path, sweep=SweepConfig(feature_steps=[0, 4]))
    job = _job([StyleEntry(lora=str(lora), name="a"), StyleEntry(lora=str(lora), name="b", scale=0.5)])
    with pytest.raises(UserError, match=r"model\.sweep"):
        stylize_one(predictor, job)


def test_sweep_values_are_checked_with_their_key():
    with pytest.raises(UserError, match=r"model\.sweep\.attention_steps.*repeat"):
        SweepConfig(attention_steps=[5, 5])
