"""`diffstyler predict` over datasets, end to end on the tiny model: product jobs on two DDP processes
and on two simulated nodes, failures recorded while the run goes on, a folder that grows, 0 jobs.

The 1-process reference run is made in-process; the multi-process runs are real subprocesses. Every
process sees the same chunks of `data.batch_size` jobs, so their results are bit-identical to the
reference (latents of batched against one-by-one jobs: tests/test_predictor_batches.py).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffstyler.cli import JOBS_FAILED_STATUS, USER_ERROR_STATUS, main
from diffstyler.results import RESULTS_NAME, read_json_lines
from tests.helpers import finished, run_cli_in_process, run_console, write_random_lora

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH_CONFIG = str(REPO_ROOT / "configs" / "smoke" / "batch.yaml")
CONTENT = REPO_ROOT / "data" / "content_shapes.png"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """photos/ with 4 contents (one in a sub-folder), a LoRA used at two scales (styles full, half)."""
    folder = tmp_path_factory.mktemp("batch_cli")
    (folder / "photos" / "sub").mkdir(parents=True)
    for k, name in enumerate(["p0.png", "p1.png", "p2.png", "sub/p3.png"]):
        Image.open(CONTENT).rotate(20 * k).save(folder / "photos" / name)
    lora = write_random_lora(folder / "lora", seed=4).parent
    styles = [{"lora": str(lora), "name": "full"}, {"lora": str(lora), "name": "half", "scale": 0.5}]
    return folder, styles


def batch_args(run: Path, styles: list[dict], *extra: str, content: str | None = None, manifest: Path | None = None) -> list[str]:
    """configs/smoke/batch.yaml with these styles and one content input (file or folder) or a manifest."""
    args = ["predict", "--config", BATCH_CONFIG, "--data.styles", json.dumps(styles),
            "--model.output.folder", str(run / "out"), "--model.inversion_cache", str(run / "cache"),
            "--trainer.logger.init_args.save_dir", str(run / "logs")]
    if manifest is not None:
        args += ["--data.content", "null", "--data.manifest", str(manifest)]
    else:
        args += ["--data.content", json.dumps([content])]
    return [*args, *extra]


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {path.relative_to(folder).as_posix(): np.asarray(Image.open(path)) for path in sorted(folder.rglob("*.png"))}


PRODUCT_OUTPUTS = [f"{stem}_{style}.png" for stem in ("p0", "p1", "p2", "sub/p3") for style in ("full", "half")]


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory):
    folder, styles = inputs
    run = tmp_path_factory.mktemp("one_process")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(REPO_ROOT)
        monkeypatch.setattr(sys, "argv", ["diffstyler"])
        main(batch_args(run, styles, content=str(folder / "photos")))
    return pngs(run / "out"), read_json_lines(run / "out" / RESULTS_NAME)


def assert_like_one_process(out: Path, one_process) -> None:
    expected_images, expected_results = one_process
    images = pngs(out)
    assert sorted(images) == sorted(PRODUCT_OUTPUTS) == sorted(expected_images)  # each output once, nothing else
    for name, pixels in expected_images.items():
        # each process has fewer CPU threads, and float32 sums depend a little on the blocking
        difference = np.abs(images[name].astype(int) - pixels.astype(int))
        assert difference.max() <= 1, name
    lines = read_json_lines(out / RESULTS_NAME)
    assert [(line["id"], line["status"], line["outputs"]) for line in lines] == [
        (line["id"], line["status"], line["outputs"]) for line in expected_results]
    assert [line["id"] for line in lines] == [name.removesuffix(".png") for name in PRODUCT_OUTPUTS]


@pytest.mark.slow
def test_product_jobs_on_two_ddp_processes_equal_one_process_and_a_rerun_skips_them(inputs, one_process, tmp_path):
    """8 jobs in chunks of 4 dealt to 2 processes. Catches a chunk run on both processes, a
    process's results missing from results.jsonl, and outputs depending on the process."""
    folder, styles = inputs
    args = batch_args(tmp_path, styles, "--trainer.devices", "2", "--trainer.strategy", "ddp", content=str(folder / "photos"))
    status, output = finished(run_console(args))
    assert status == 0, output[-3000:]
    assert "8 jobs: 8 done, 0 already done (skipped), 0 failed" in output
    assert_like_one_process(tmp_path / "out", one_process)

    stamps = {path: path.stat().st_mtime_ns for path in (tmp_path / "out").rglob("*.png")}
    status, output = finished(run_console(args))
    assert status == 0 and "8 jobs: 0 done, 8 already done (skipped), 0 failed" in output, output[-3000:]
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "out").rglob("*.png")} == stamps


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_simulated_nodes_run_each_job_once(inputs, one_process, tmp_path):
    """Two launches of the same command, node ranks 0 and 1 on the loopback address, one process
    each: the cluster invocation of docs/datasets.md on one machine."""
    folder, styles = inputs
    args = batch_args(tmp_path, styles, "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp",
                      content=str(folder / "photos"))
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    nodes = [run_console(args, **rendezvous, NODE_RANK=str(rank)) for rank in (0, 1)]
    (status0, output0), (status1, output1) = [finished(node) for node in nodes]
    assert status0 == 0 and status1 == 0, output0[-2000:] + output1[-2000:]
    assert "8 jobs: 8 done" in output0  # summed over both nodes: 16 would mean every job twice
    assert_like_one_process(tmp_path / "out", one_process)


@pytest.mark.slow
def test_one_fastsam_job_on_two_processes_works(inputs, tmp_path):
    """Process 1 gets no chunk. Catches Lightning's sampler refusing fewer items than processes, and
    a hang: importing ultralytics waits in a barrier of every process, so a process that never
    makes a FastSAM mask must import it too."""
    folder, styles = inputs
    boxed = [{**styles[0], "mask": {"box": [0, 0, 32, 24]}}]
    args = batch_args(tmp_path, boxed, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                      "--model.segmenter.weights", "tiny", "--model.segmenter.imgsz", "64", "--model.segmenter.conf", "1e-6",
                      content=str(folder / "photos" / "p0.png"))
    process = run_console(args)
    try:
        output = "".join(process.communicate(timeout=150))
    except subprocess.TimeoutExpired:
        subprocess.run(["pkill", "-9", "-f", str(tmp_path / "out")])  # the launcher and its child: SIGTERM is trapped
        pytest.fail("the run hung")
    assert process.returncode == 0, output[-3000:]
    assert "1 job: 1 done" in output
    assert sorted(pngs(tmp_path / "out")) == ["p0_full.png", "p0_full_mask0_full.png"]


@pytest.mark.slow
def test_failing_jobs_are_recorded_with_their_file_and_the_others_finish(inputs, tmp_path, monkeypatch, capsys):
    """An unreadable image and an empty mask: with `on_error: continue` (the default) the run goes
    on, results.jsonl names each failure's file, and the exit status says that jobs failed."""
    folder, styles = inputs
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(folder / "photos" / "p0.png", data / "good.png")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("L", (64, 48)).save(data / "black_mask.png")
    manifest = data / "jobs.csv"
    manifest.write_text("content,styles,masks,output\ngood.png,full,,\nbroken.png,full,,\ngood.png,full,black_mask.png,empty\n"
                        "good.png,half,,\n")
    status, output = run_cli_in_process(batch_args(tmp_path, styles, manifest=manifest), monkeypatch, capsys)
    assert status == JOBS_FAILED_STATUS, output[-3000:]
    lines = {line["id"]: line for line in read_json_lines(tmp_path / "out" / RESULTS_NAME)}
    assert [(job, line["status"]) for job, line in lines.items()] == [
        ("good_full", "done"), ("broken_full", "failed"), ("empty", "failed"), ("good_half", "done")]
    assert "broken.png" in lines["broken_full"]["error"] and "not a readable image" in lines["broken_full"]["error"]
    assert "black_mask.png" in lines["empty"]["error"] and "empty" in lines["empty"]["error"]
    assert sorted(pngs(tmp_path / "out")) == ["good_full.png", "good_half.png"]
    assert "4 jobs: 2 done, 0 already done (skipped), 2 failed" in output
    assert f"job failed: data.manifest row 2 ({manifest}:3): not a readable image" in output


@pytest.mark.slow
def test_adding_a_file_to_the_folder_runs_exactly_one_new_job(inputs, tmp_path, monkeypatch, capsys):
    folder, styles = inputs
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("p0.png", "p1.png"):
        shutil.copy(folder / "photos" / name, photos / name)
    args = batch_args(tmp_path, styles[:1], content=str(photos))
    status, output = run_cli_in_process(args, monkeypatch, capsys)
    assert status == 0 and "2 jobs: 2 done" in output, output[-3000:]
    stamps = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "out").glob("*.png")}

    shutil.copy(folder / "photos" / "p2.png", photos / "a_new.png")  # sorts first: positions shift
    status, output = run_cli_in_process(args, monkeypatch, capsys)
    assert status == 0 and "3 jobs: 1 done, 2 already done (skipped), 0 failed" in output, output[-3000:]
    assert {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in stamps} == stamps
    assert [line["id"] for line in read_json_lines(tmp_path / "out" / RESULTS_NAME)] == ["a_new_full", "p0_full", "p1_full"]


@pytest.mark.slow
def test_the_progress_bar_counts_jobs_with_their_outcome_and_styles_come_from_a_yaml_file(inputs, tmp_path, monkeypatch, capsys):
    folder, styles = inputs
    styles_file = tmp_path / "styles.yaml"  # --data.styles styles.yaml, as in docs/datasets.md
    styles_file.write_text("".join(f"- {{lora: {s['lora']}, name: {s['name']}, scale: {s.get('scale', 1.0)}}}\n" for s in styles))
    args = [*batch_args(tmp_path, styles, content=str(folder / "photos" / "sub")), "--data.styles", str(styles_file)]
    status, output = run_cli_in_process(args, monkeypatch, capsys)
    assert status == 0, output[-3000:]
    assert "Jobs: 100%" in output and "2/2" in output and "done=2, skipped=0, failed=0" in output
    assert "Stylizing" not in output and "DDIM inversion" not in output  # no inner bars by default
    assert sorted(pngs(tmp_path / "out")) == ["p3_full.png", "p3_half.png"]  # relative to the folder given


@pytest.mark.parametrize("case", ["empty folder", "empty manifest"])
def test_zero_jobs_is_one_clear_line(inputs, tmp_path, monkeypatch, capsys, case):
    _, styles = inputs
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        args, expected = batch_args(tmp_path, styles, content=str(tmp_path / "empty")), "no image files (data.content[0])"
    else:
        (tmp_path / "jobs.csv").write_text("content,styles\n")
        args, expected = batch_args(tmp_path, styles, manifest=tmp_path / "jobs.csv"), "nothing to stylize (data.manifest)"
    status, output = run_cli_in_process(args, monkeypatch, capsys)
    assert status == USER_ERROR_STATUS
    assert f"diffstyler predict: error: {expected}" in output and "Traceback" not in output


@pytest.mark.slow
def test_a_run_whose_one_job_failed_says_why_in_its_last_line(inputs, tmp_path, monkeypatch, capsys):
    """Catches a summary that counts the failure without its reason, which the user would look for
    further up (and would not find in a scheduler's one-line report). The failure is one only the
    run finds (a LoRA scale that overflows the latents): inputs that the files show to fail stop a
    one-job run before the model loads (tests/data/test_inputs.py)."""
    folder, styles = inputs
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(folder / "photos" / "p0.png", photos / "p0.png")
    overflowing = [{**styles[0], "scale": 1e30}]
    status, output = run_cli_in_process(batch_args(tmp_path, overflowing, content=str(photos)), monkeypatch, capsys)
    assert status == JOBS_FAILED_STATUS, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("diffstyler predict: 1 job: 0 done, 0 already done (skipped), 1 failed (data.content[0]"), last
    assert "non-finite" in last and "style 'full'" in last and last.endswith(str(tmp_path / "out" / RESULTS_NAME))
    assert "job failed" not in output  # said once, in the last line
