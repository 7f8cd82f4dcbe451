"""Each job's own inputs checked before the model loads (`data.inputs`): contents that do not decode,
mask files that leave nothing to style, boxes and points outside the content as it is stylized, a
manifest row's LoRA; a run whose every job would fail stops with one line per kind of failure
before any UNet is built, and a run where some would records them and runs the rest."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from diffstyler.cli import main
from diffstyler.data.inputs import EveryJobFails, job_input_failures, jobs_that_run
from diffstyler.data.jobs import StyleEntry, StylizeDataModule
from diffstyler.errors import UserError
from diffstyler.masks import MaskSpec
from tests.helpers import write_random_lora

ROOT = Path(__file__).resolve().parents[2]
CONTENT = ROOT / "data" / "content_shapes.png"  # 64 x 48
STYLIZE_CONFIG = str(ROOT / "configs" / "smoke" / "stylize.yaml")


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    return write_random_lora(tmp_path_factory.mktemp("inputs_lora") / "ink", seed=1).parent


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """good.png (64 x 48), big.png (128 x 96), turned.jpg (stored 64 x 48, EXIF: turned upright to
    48 x 64), a truncated PNG and JPEG, a text file named .png, and mask files."""
    folder = tmp_path_factory.mktemp("inputs")
    shutil.copy(CONTENT, folder / "good.png")
    Image.open(CONTENT).resize((128, 96)).save(folder / "big.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    Image.open(CONTENT).convert("RGB").save(folder / "turned.jpg", exif=exif)
    data = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    buffer = io.BytesIO()  # large enough for its header to survive the cut
    Image.open(CONTENT).convert("RGB").resize((512, 384)).save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "notes.png").write_text("not an image")
    Image.new("L", (64, 48)).save(folder / "black_mask.png")
    Image.new("L", (64, 48), 255).save(folder / "white_mask.png")
    square = Image.new("L", (64, 48))
    ImageDraw.Draw(square).rectangle([20, 16, 31, 27], fill=255)  # 12 x 12 pixels
    square.save(folder / "square_mask.png")
    return folder


def jobs_of(contents, styles, **data):
    """The jobs of these contents, given as a list file (files named one by one in data.content are
    refused by their headers when the data module is built, before any of this)."""
    listing = Path(contents[0]).parent / f"list{len(list(Path(contents[0]).parent.glob('list*.txt')))}.txt"
    listing.write_text("".join(f"{path}\n" for path in contents))
    return StylizeDataModule(content=[str(listing)], styles=styles, resolution=64, **data).jobs()


def failures_by_content(jobs, **kwargs) -> dict[str, str]:
    """{content file name: what failed} for the failing jobs."""
    by_id = {job.id: Path(job.content).name for job in jobs}
    return {by_id[job_id]: error.what for job_id, error in job_input_failures(jobs, **kwargs).items()}


def test_a_content_that_does_not_decode_fails_its_job(files, lora):
    """Caught: headers only (a truncated photo passes its header check and fails 12-22 s later,
    after the model is built), or a check that stops at the first bad file."""
    contents = [files / name for name in ("good.png", "truncated.png", "truncated.jpg", "notes.png", "big.png")]
    jobs = jobs_of(contents, [StyleEntry(lora=str(lora))])
    assert failures_by_content(jobs) == {name: "not a readable image" for name in ("truncated.png", "truncated.jpg", "notes.png")}
    error = job_input_failures(jobs)[jobs[1].id]
    assert error.where == str(files / "truncated.png") and "truncated" in error.why


def test_beyond_the_decode_budget_only_headers_are_read(files, lora):
    """Large datasets: files beyond the budget are checked by their headers, so a file that is not
    an image still fails, a truncated one fails when its job runs."""
    jobs = jobs_of([files / "truncated.png", files / "notes.png"], [StyleEntry(lora=str(lora))])
    assert failures_by_content(jobs, full_decode_pixels=0) == {"notes.png": "not a readable image"}
    assert failures_by_content(jobs, full_decode_pixels=64 * 48) == {"truncated.png": "not a readable image",
                                                                     "notes.png": "not a readable image"}


def test_boxes_and_points_are_checked_against_the_content_as_it_is_stylized(files, lora):
    """Boxes and points are in the pixels of the content resized to data.resolution (64: big.png is
    stylized at 64 x 48) and turned upright (turned.jpg is 48 x 64). Caught: the stored size (big.png
    passes a box that FastSAM would refuse), the EXIF orientation ignored, a point on the far edge
    (x == width) taken for inside."""
    contents = [files / name for name in ("good.png", "big.png", "turned.jpg")]

    def failing(mask: MaskSpec) -> dict[str, str]:
        return failures_by_content(jobs_of(contents, [StyleEntry(lora=str(lora), mask=mask)]))

    assert failing(MaskSpec(box=[0, 0, 64, 48])) == {"turned.jpg": "box outside the content image"}
    assert failing(MaskSpec(box=[0, 0, 100, 80])) == {name.name: "box outside the content image" for name in contents}
    assert failing(MaskSpec(box=[0, 0, 40, 60])) == {"good.png": "box outside the content image", "big.png": "box outside the content image"}
    assert failing(MaskSpec(points=[[63, 47]])) == {"turned.jpg": "points outside the content image"}
    assert failing(MaskSpec(points=[[10, 10], [64, 10]], point_labels=[1, 0])) == {
        name.name: "points outside the content image" for name in contents}
    assert failing(MaskSpec(text="the square")) == {}  # FastSAM's to answer, when the job runs


def test_a_mask_file_that_leaves_no_pixel_to_style_fails_its_job(files, lora):
    """Shaped as the job would shape it at the content's size. Caught: invert or grow left out (the
    eroded square and the inverted white mask pass), the mask checked at its own size."""
    def failing(mask: MaskSpec, content: str = "good.png") -> dict[str, str]:
        return failures_by_content(jobs_of([files / content], [StyleEntry(lora=str(lora), mask=mask)]))

    assert failing(MaskSpec(file=str(files / "black_mask.png"))) == {"good.png": "empty mask"}
    assert failing(MaskSpec(file=str(files / "white_mask.png"), invert=True)) == {"good.png": "empty mask"}
    assert failing(MaskSpec(file=str(files / "square_mask.png"), grow=-5)) == {}  # 12 px: 2 px left
    assert failing(MaskSpec(file=str(files / "square_mask.png"), grow=-6)) == {"good.png": "empty mask"}
    # at 128 x 96 the square would be 24 px wide, but big.png is stylized at 64 x 48 too
    assert failing(MaskSpec(file=str(files / "square_mask.png"), grow=-6), "big.png") == {"big.png": "empty mask"}
    error = next(iter(job_input_failures(jobs_of([files / "good.png"], [StyleEntry(lora=str(lora), mask=MaskSpec(
        file=str(files / "black_mask.png")))])).values()))
    assert error.line() == f"empty mask (mask file '{files / 'black_mask.png'}'): no pixel would be styled"


def test_a_manifest_rows_lora_with_nan_weights_fails_its_rows_only(files, lora, tmp_path):
    """A LoRA named only by manifest rows is not the run's (its rows fail, not the run). Caught: rows'
    LoRAs left unchecked (they fail after the inversion of their content)."""
    broken = tmp_path / "broken"
    shutil.copytree(lora, broken)
    weights = load_file(broken / "pytorch_lora_weights.safetensors")
    weights[sorted(weights)[0]][0, 0] = float("nan")
    save_file(weights, str(broken / "pytorch_lora_weights.safetensors"))
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(f"content,styles,output\n{files / 'good.png'},ink,a\n{files / 'good.png'},{broken},b\n{files / 'big.png'},ink,c\n")
    data = StylizeDataModule(manifest=str(manifest), styles=[StyleEntry(lora=str(lora))], resolution=64)
    failures = job_input_failures(data.jobs(), model=("unet", 32), checked_loras=[str(lora / "pytorch_lora_weights.safetensors")])
    assert {job: error.what for job, error in failures.items()} == {"b": "LoRA has non-finite weights"}


def test_every_job_failing_is_one_line_per_kind_else_the_failures_are_kept_for_the_writer(files, lora):
    """Caught: a run of failing jobs started anyway, one line per job (a thousand lines for a
    folder of bad files), a `stop` run that goes on, a `continue` run that stops."""
    contents = [files / name for name in ("truncated.png", "notes.png", "good.png", "big.png")]
    jobs = jobs_of(contents, [StyleEntry(lora=str(lora), mask=MaskSpec(file=str(files / "black_mask.png")))])
    failures = job_input_failures(jobs)
    with pytest.raises(EveryJobFails) as every:
        jobs_that_run(jobs, failures, "continue")
    assert every.value.lines == [
        f"not a readable image ({files / 'truncated.png'}): {failures[jobs[0].id].why} (and 1 more job alike)",
        f"empty mask (mask file '{files / 'black_mask.png'}'): no pixel would be styled (and 1 more job alike)",
    ]
    some = {job_id: error for job_id, error in failures.items() if job_id != jobs[3].id}
    assert [job.id for job, _ in jobs_that_run(jobs, some, "continue")] == [job.id for job in jobs[:3]]
    with pytest.raises(UserError) as first:
        jobs_that_run(jobs, some, "stop")
    assert first.value is failures[jobs[0].id]
    assert jobs_that_run(jobs, {}, "stop") == []


# --- the run, through the command ------------------------------------------------------------------

def predict(tmp_path: Path, monkeypatch, capsys, *extra: str) -> tuple[int, str]:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    monkeypatch.setenv("DIFFSTYLER_DEBUG", "0")
    capsys.readouterr()
    try:
        main(["predict", "--config", STYLIZE_CONFIG, "--trainer.logger", "false", "--model.output.folder", str(tmp_path / "out"),
              "--model.inversion_cache", str(tmp_path / "cache"), *extra])
        status = 0
    except SystemExit as exit_info:
        status = exit_info.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("case", ["truncated photo", "empty mask", "box outside the photo"])
def test_a_one_photo_run_whose_input_fails_is_one_line_before_any_unet_is_built(case, files, lora, tmp_path, monkeypatch, capsys,
                                                                             model_builds):
    """The issue's 'done when': with data.on_error continue (the default), the one job's failure
    ended the run 12-22 s later, after the model was built. Caught: the check left to the job, a
    one-job run that starts anyway (the model built, then a 'job failed' summary)."""
    content, mask, names = {
        "truncated photo": (files / "truncated.jpg", None, ["not a readable image", "truncated.jpg", "truncated"]),
        "empty mask": (files / "good.png", {"file": str(files / "black_mask.png")}, ["empty mask", "black_mask.png"]),
        "box outside the photo": (files / "big.png", {"box": [0, 0, 100, 80]}, ["box outside the content image", "box [0", "64x48"]),
    }[case]
    style = {"lora": str(lora), **({"mask": mask} if mask else {})}
    status, err = predict(tmp_path, monkeypatch, capsys, "--data.content", json.dumps([str(content)]), "--data.styles", json.dumps([style]),
                          "--model.segmenter.weights", "tiny")
    assert status == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("diffstyler predict: error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err[-2000:]
    assert all(name in lines[0] for name in names), lines[0]
    assert model_builds == []
    assert not (tmp_path / "out").exists() and "Traceback" not in err


def test_a_run_whose_jobs_fail_for_two_reasons_says_both_in_two_lines(files, lora, tmp_path, monkeypatch, capsys, model_builds):
    """Caught: the reporter printing only the first of several lines."""
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(f"content,styles,masks,output\n{files / 'truncated.png'},ink,{files / 'white_mask.png'},a\n"
                        f"{files / 'good.png'},ink,{files / 'black_mask.png'},b\n")
    status, err = predict(tmp_path, monkeypatch, capsys, "--data.content", "null", "--data.manifest", str(manifest),
                          "--data.styles", json.dumps([{"lora": str(lora)}]))
    assert status == 2, err[-2000:]
    assert err.strip().splitlines()[-2:] == [
        f"diffstyler predict: error: not a readable image ({files / 'truncated.png'}): "
        + err.split(f"({files / 'truncated.png'}): ")[1].splitlines()[0],
        f"diffstyler predict: error: empty mask (mask file '{files / 'black_mask.png'}'): no pixel would be styled"]
    assert model_builds == []


@pytest.mark.slow
def test_jobs_that_would_fail_are_recorded_up_front_and_the_others_run(files, lora, tmp_path, monkeypatch, capsys):
    """Three photos, one truncated, `data.on_error: continue`. Caught: the failing job prepared with
    the others (its decode failing again in its chunk), left out of results.jsonl or the summary,
    or stopping the run."""
    from diffstyler.predictor import StylizePredictor
    from diffstyler.results import RESULTS_NAME, read_json_lines

    prepared = []
    prepare = StylizePredictor.prepare
    monkeypatch.setattr(StylizePredictor, "prepare", lambda self, job: prepared.append(job.id) or prepare(self, job))
    listing = tmp_path / "photos.txt"
    listing.write_text("".join(f"{files / name}\n" for name in ("good.png", "truncated.png", "big.png")))
    status, err = predict(tmp_path, monkeypatch, capsys, "--data.content", json.dumps([str(listing)]),
                          "--data.styles", json.dumps([{"lora": str(lora)}]), "--model.sampling.steps", "2",
                          "--model.injection.feature_steps", "1", "--model.injection.attention_steps", "1", "--model.output.grid", "false")
    assert status == 1, err[-3000:]  # jobs failed, the others done
    assert prepared == ["good", "big"]
    lines = read_json_lines(tmp_path / "out" / RESULTS_NAME)
    assert [(line["id"], line["status"]) for line in lines] == [("good", "done"), ("truncated", "failed"), ("big", "done")]
    assert lines[1]["error"].startswith(f"not a readable image ({files / 'truncated.png'}): ")
    assert "3 jobs: 2 done, 0 already done (skipped), 1 failed" in err
    assert sorted(path.name for path in (tmp_path / "out").glob("*.png")) == ["big.png", "good.png"]

