"""The report of `diffstyler compare` from the files the stages write (no model): the table's scores
are metrics.json's, any further metric of `diffstyler test` becomes a column, the costs come from
results.jsonl and the LoRAs' fit seconds, and the grid shows the pairs every method has."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from diffstyler.errors import UserError
from diffstyler.evaluation.comparison import GRID_CELL, LABEL_HEIGHT, MethodRun, sample, write_comparison


def image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return str(path)


def write_run(folder: Path, lines: list[dict]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(folder)


def lora(folder: Path, style_image: str, fit_seconds) -> str:
    folder.mkdir(parents=True)
    info = {"prompt": "painting of sss", "style_images": [{"path": style_image}], **({"fit_seconds": fit_seconds} if fit_seconds else {})}
    (folder / "diffstyler_lora.json").write_text(json.dumps(info))
    return str(folder / "pytorch_lora_weights.safetensors")


@pytest.fixture
def runs(tmp_path):
    """2 contents x 2 styles by DiffStyler (two LoRAs, fits of 30 s and 50 s) and by StyleID (the
    same style images), where StyleID's content b with style y failed; the scores of both runs,
    with a metric `csd` that this code does not know of."""
    contents = [image(tmp_path / "content" / f"{name}.png", colour) for name, colour in (("a", (200, 0, 0)), ("b", (0, 200, 0)))]
    styles = [image(tmp_path / "style" / f"{name}.png", colour, (40, 40)) for name, colour in (("x", (0, 0, 200)), ("y", (200, 200, 0)))]
    loras = [lora(tmp_path / "loras" / name, style, seconds) for name, style, seconds in (("x", styles[0], 30.0), ("y", styles[1], 50.0))]
    diffstyler, styleid = [], []
    for c, content in enumerate(contents):
        for s, (style, lora_file) in enumerate(zip(styles, loras)):
            name = f"{'ab'[c]}_{'xy'[s]}"
            image(tmp_path / "ds" / f"{name}.png", (10 * c, 10 * s, 100))
            diffstyler.append({"id": name, "content": content, "styles": ["xy"[s]], "loras": [lora_file], "methods": ["diffstyler"],
                               "images": [None], "outputs": [f"{name}.png"], "status": "done", "seconds": 1.0 + c + s})
            failed = (c, s) == (1, 1)
            if not failed:
                image(tmp_path / "sid" / f"{name}.png", (100, 10 * c, 10 * s))
            styleid.append({"id": name, "content": content, "styles": ["xy"[s]], "loras": [None], "methods": ["styleid"],
                            "images": [style], "outputs": [] if failed else [f"{name}.png"], "status": "failed" if failed else "done",
                            "seconds": 0.5})
    runs = [MethodRun("diffstyler", write_run(tmp_path / "ds", diffstyler)), MethodRun("styleid", write_run(tmp_path / "sid", styleid))]
    scores = {"lpips": 0.5, "fid": 18.0, "artfid": 28.5, "cfsd": 0.25, "csd": 0.6, "count": 4, "listed": 4}
    metrics = {"runs": {runs[0].folder: scores, runs[1].folder: {**scores, "lpips": 0.4, "csd": 0.7, "count": 3}},
               "networks": {}, "preprocessing": "StyleID's"}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    return runs, contents, styles


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "comparison.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_the_table_has_every_score_of_metrics_json_and_each_methods_costs(tmp_path, runs):
    """Catches: a metric column hard-coded (CSD from `diffstyler test` would need code here), a count
    shown as a score, one run's scores under the other's name, failed jobs counted as images, and
    a preparation time for StyleID (or none for DiffStyler)."""
    method_runs, _, _ = runs
    table = write_comparison(str(tmp_path / "out"), method_runs, str(tmp_path / "metrics.json"), grid_pairs=2)
    rows = read_rows(tmp_path / "out")
    assert list(rows[0])[:10] == ["method", "styles", "results", "scored", "listed", "lpips", "fid", "artfid", "cfsd", "csd"]
    assert [(row["method"], row["styles"], row["lpips"], row["csd"], row["scored"]) for row in rows] == [
        ("DiffStyler", "LoRA", "0.5", "0.6", "4"), ("StyleID", "image", "0.4", "0.7", "3")]
    diffstyler, styleid = rows
    assert float(diffstyler["seconds_per_image"]) == (1 + 2 + 2 + 3) / 4
    assert float(styleid["seconds_per_image"]) == 0.5  # 3 images in 3 x 0.5 s: the failed job makes none
    assert (float(diffstyler["style_preparation_seconds"]), diffstyler["lora_count"]) == (40.0, "2")
    assert (float(styleid["style_preparation_seconds"]), styleid["lora_count"]) == (0.0, "0")
    assert float(diffstyler["total_seconds"]) == 2 * 40.0 + 8.0 and float(styleid["total_seconds"]) == 1.5
    assert table.splitlines()[0].split(" | ")[3:8] == ["LPIPS", "FID", "ArtFID", "CFSD", "CSD"]
    assert "| StyleID | image | 3 of 4 | 0.4 | 18 | 28.5 | 0.25 | 0.7 | 0.5 | none | 1.5 |" in table
    page = (tmp_path / "out" / "comparison.md").read_text()
    assert page.startswith(table) and "StyleID: 0 pairs" not in page and "DiffStyler: 1 pairs that another method lacks" in page


def test_the_grid_shows_a_sample_of_the_pairs_every_method_has(tmp_path, runs):
    """Catches: a pair only one method has in the grid (an empty tile), a method's result in
    another's column, and rows not in the order of the sample."""
    method_runs, contents, styles = runs
    write_comparison(str(tmp_path / "out"), method_runs, str(tmp_path / "metrics.json"), grid_pairs=2)
    grid = np.asarray(Image.open(tmp_path / "out" / "comparison_grid.png"))
    cell = 48  # the largest image's longest side (below GRID_CELL)
    column = max(cell, grid.shape[1] // 4)
    assert grid.shape[0] == LABEL_HEIGHT + 2 * cell and cell < GRID_CELL
    # the pairs both have, sorted: (a, x), (a, y), (b, x); two of them evenly spaced: (a, x) and (b, x)
    shown = [("a", "x", (0, 0)), ("b", "x", (1, 0))]
    for row, (content, style, (c, s)) in enumerate(shown):
        expected = [Path(contents[c]), Path(styles[s]), Path(method_runs[0].folder) / f"{content}_{style}.png",
                    Path(method_runs[1].folder) / f"{content}_{style}.png"]
        for k, path in enumerate(expected):
            tile = grid[LABEL_HEIGHT + row * cell: LABEL_HEIGHT + (row + 1) * cell, k * column + (column - cell) // 2:][:, :cell]
            padded = ImageOps.pad(Image.open(path).convert("RGB"), (cell, cell), Image.Resampling.LANCZOS, color="white")
            assert np.array_equal(tile, np.asarray(padded)), (row, k, path)


def test_sample_is_evenly_spaced_with_both_ends():
    assert sample(list(range(10)), 3) == [0, 4, 9] and sample(list(range(10)), 1) == [0]
    assert sample([1, 2], 5) == [1, 2] and sample([1, 2], 0) == []


def test_a_run_missing_from_metrics_json_is_named(tmp_path, runs):
    method_runs, _, _ = runs
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    del metrics["runs"][method_runs[1].folder]
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(UserError, match="no scores of StyleID's results") as caught:
        write_comparison(str(tmp_path / "out"), method_runs, str(tmp_path / "metrics.json"), grid_pairs=2)
    assert caught.value.where == str(tmp_path / "metrics.json")
    assert not (tmp_path / "out").exists()  # nothing half written
