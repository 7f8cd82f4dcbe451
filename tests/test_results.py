"""Resume rules: a job is done only when all its outputs exist, decode and carry the current settings hash."""

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffstyler.data.jobs import StyleEntry
from diffstyler.masks import MaskSpec
from diffstyler.outputs import SETTINGS_HASH_KEY, save_result, temporary_path
from diffstyler.results import (
    DONE,
    FAILED,
    PARTS_FOLDER,
    RESULTS_NAME,
    SKIPPED,
    ResultsLog,
    job_is_done,
    merge_results,
    read_json_lines,
    settings_hash,
)
from diffstyler.stylize import SamplingConfig
from tests.helpers import MASK, make_job as _job, make_predictor as _predictor, stylize_one, write_random_lora


def _outputs(tmp_path) -> list[Path]:
    """The output folder's files, without results.jsonl's part files (`.diffstyler-results`)."""
    return sorted(p for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))


def test_the_settings_hash_depends_on_values_not_on_key_order():
    assert settings_hash({"a": 1, "b": [1, 2]}) == settings_hash({"b": [1, 2], "a": 1})
    assert settings_hash({"a": 1}) != settings_hash({"a": 2})


@pytest.mark.slow
def test_every_output_png_carries_the_same_settings_hash(tmp_path, loras):
    predictor = _predictor(tmp_path)
    stylize_one(predictor, _job([StyleEntry(lora=str(loras[0]), mask=MaskSpec(file=str(MASK)))]))
    names = [p.name for p in _outputs(tmp_path)]
    assert names == ["content_shapes.png", "content_shapes_grid.png", "content_shapes_mask0_first.png"]
    hashes = {Image.open(p).text.get(SETTINGS_HASH_KEY) for p in _outputs(tmp_path)}
    assert len(hashes) == 1 and len(hashes.pop()) == 64


@pytest.mark.slow
def test_a_truncated_result_is_removed_and_the_job_redone(tmp_path, loras):
    """Mistake caught: "done" meaning "the file exists" (a crash mid-write on a full disk leaves half a PNG)."""
    predictor = _predictor(tmp_path)
    job = _job([StyleEntry(lora=str(loras[0]))])
    result = Path(stylize_one(predictor, job).outputs[0])
    pixels = np.array(Image.open(result))
    result.write_bytes(result.read_bytes()[: result.stat().st_size // 2])
    again = stylize_one(predictor, job)
    assert not again.status == "skipped"
    assert np.array_equal(np.array(Image.open(result)), pixels)


@pytest.mark.slow
def test_leftover_temporary_files_are_removed(tmp_path, loras):
    """Mistake caught: temporaries of interrupted writes left in the output folder forever."""
    predictor = _predictor(tmp_path)
    job = _job([StyleEntry(lora=str(loras[0]))])
    stylize_one(predictor, job)
    out = tmp_path / "out"
    leftovers = [
        temporary_path(out / "content_shapes.png"),
        out / ".content_shapes-k2j_9xq0.png",  # the names older versions used: atomic_save
        out / f".content_shapes_grid.png.1234.{'ab' * 16}.tmp",  # and save_mask_png
    ]
    for leftover in leftovers:
        leftover.write_bytes(b"half a png")
    unrelated = out / ".keep-me.png"
    unrelated.write_bytes(b"not ours")
    assert stylize_one(predictor, job).status == "skipped"
    assert not any(leftover.exists() for leftover in leftovers)
    assert unrelated.exists()


@pytest.mark.slow
def test_a_rerun_with_other_settings_redoes_the_job_and_says_so(tmp_path, loras, caplog):
    """Mistake caught: a rerun after a config change keeps the old result without a word."""
    job = _job([StyleEntry(lora=str(loras[0]))])
    result = Path(stylize_one(_predictor(tmp_path), job).outputs[0])
    changed = _predictor(tmp_path)
    changed.sampling = SamplingConfig(steps=6, guidance_scale=5.0)
    with caplog.at_level(logging.WARNING, logger="diffstyler.results"):
        assert not stylize_one(changed, job).status == "skipped"
    assert "content_shapes.png was made with other settings" in caplog.text
    assert Image.open(result).text[SETTINGS_HASH_KEY] == changed.settings_hash(job)


@pytest.mark.slow
def test_a_retrained_lora_at_the_same_path_redoes_the_job(tmp_path, loras):
    """Mistake caught: settings compared by LoRA path instead of the LoRA's content (sha256)."""
    lora = write_random_lora(tmp_path / "lora", seed=1)
    job = _job([StyleEntry(lora=str(lora))])
    predictor = _predictor(tmp_path)
    stylize_one(predictor, job)
    write_random_lora(tmp_path / "lora", seed=3)
    assert not stylize_one(predictor, job).status == "skipped"


@pytest.mark.slow
def test_a_missing_mask_file_output_makes_the_job_unfinished(tmp_path, loras):
    """Mistake caught: only the results checked, so a job interrupted before its mask PNG counts as done."""
    predictor = _predictor(tmp_path)
    job = _job([StyleEntry(lora=str(loras[0]), mask=MaskSpec(file=str(MASK)))])
    stylize_one(predictor, job)
    (tmp_path / "out" / "content_shapes_mask0_first.png").unlink()
    assert not stylize_one(predictor, job).status == "skipped"
    assert (tmp_path / "out" / "content_shapes_mask0_first.png").is_file()


def test_files_without_the_settings_hash_or_missing_do_not_count_as_done(tmp_path):
    path = tmp_path / "x.png"
    assert not job_is_done([path], "h")  # missing
    Image.new("RGB", (4, 4)).save(path)  # some other tool's PNG at that name
    assert not job_is_done([path], "h")
    save_result(Image.new("RGB", (4, 4)), path, "p", "n", {}, settings_hash="h")
    assert job_is_done([path], "h") and not job_is_done([path], "other")


@pytest.mark.slow
def test_overwrite_redoes_a_finished_job(tmp_path, loras):
    predictor = _predictor(tmp_path, overwrite=True)
    job = _job([StyleEntry(lora=str(loras[0]))])
    stylize_one(predictor, job)
    assert not stylize_one(predictor, job).status == "skipped"


# -- results.jsonl ---------------------------------------------------------------------------------

def _line(job_id: str, status: str, **extra) -> dict:
    return {"id": job_id, "content": f"{job_id}.png", "styles": ["s"], "outputs": [], "status": status,
            "seconds": 1.0, "error": None, **extra}


def test_results_of_every_process_merge_into_one_line_per_job_in_job_order(tmp_path):
    """Catches lines lost from a part file, duplicates, and the order of finishing kept instead of the jobs'."""
    first, second = ResultsLog(tmp_path), ResultsLog(tmp_path)
    second.path = second.path.with_name("other-process.jsonl")
    first.record(_line("b", DONE))
    second.record(_line("a", FAILED, error="not a readable image (a.png): ..."))
    second.record(_line("c", DONE))
    lines = merge_results(tmp_path, ["a", "b", "c", "never-run"])
    assert [(line["id"], line["status"]) for line in lines] == [("a", FAILED), ("b", DONE), ("c", DONE)]
    assert read_json_lines(tmp_path / RESULTS_NAME) == lines
    assert not (tmp_path / PARTS_FOLDER).exists()  # merged part files are removed


def test_a_rerun_replaces_failed_lines_and_skipped_jobs_keep_the_line_of_the_run_that_made_them(tmp_path):
    ResultsLog(tmp_path).record(_line("a", DONE, seconds=7.5))
    ResultsLog(tmp_path).record(_line("b", FAILED, error="boom"))
    merge_results(tmp_path, ["a", "b"])
    log = ResultsLog(tmp_path)
    log.record(_line("a", SKIPPED, seconds=0.01))
    log.record(_line("b", DONE))
    lines = merge_results(tmp_path, ["a", "b"])
    assert [(line["status"], line["seconds"]) for line in lines] == [(DONE, 7.5), (DONE, 1.0)]
    assert lines[1]["error"] is None


def test_a_torn_last_line_of_a_killed_process_is_left_out_and_the_parts_of_a_killed_run_are_merged_later(tmp_path):
    log = ResultsLog(tmp_path)
    log.record(_line("a", DONE))
    with open(log.path, "a") as handle:
        handle.write('{"id": "b", "sta')  # killed while writing
    lines = merge_results(tmp_path, ["a", "b"])
    assert [line["id"] for line in lines] == ["a"]
