"""Interrupted runs: a predict run over a folder (3 contents x 2 styles, 2 jobs per UNet call) killed
(SIGKILL) or stopped with Ctrl-C (SIGINT) after its first results, then rerun, leaves exactly the
files of an uninterrupted run, byte for byte, no temporary file, and a complete results.jsonl."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from diffstyler.cli import main
from diffstyler.results import RESULTS_NAME, read_json_lines
from tests.helpers import write_random_lora

REPO_ROOT = Path(__file__).resolve().parents[1]
STYLIZE_CONFIG = str(REPO_ROOT / "configs" / "smoke" / "stylize.yaml")
CONTENT = REPO_ROOT / "data" / "content_shapes.png"
CONTENTS, STYLES = 3, ("full", "half")
JOBS = CONTENTS * len(STYLES)
RESULT = re.compile(r"photo\d_(full|half)\.png")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    lora = write_random_lora(folder / "lora", seed=2).parent
    (folder / "photos").mkdir()
    for k in range(CONTENTS):
        Image.open(CONTENT).rotate(15 * k).save(folder / "photos" / f"photo{k}.png")
    return str(lora), str(folder / "photos")


def predict_args(run: Path, inputs) -> list[str]:
    lora, photos = inputs
    styles = [{"lora": lora, "name": "full"}, {"lora": lora, "name": "half", "scale": 0.5}]
    return ["predict", "--config", STYLIZE_CONFIG, "--data.content", json.dumps([photos]), "--data.pairing", "product",
            "--data.batch_size", "2", "--data.styles", json.dumps(styles), "--model.output.folder", str(run / "out"),
            "--model.output.overwrite", "false", "--model.inversion_cache", str(run / "cache"),
            "--trainer.logger.init_args.save_dir", str(run / "logs"), "--model.progress", "false",
            "--trainer.enable_progress_bar", "false"]


def run_in_process(args: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    main(args)


def interrupt_after_first_result(args: list[str], out: Path, sig: int) -> list[str]:
    """Start the command, send `sig` as soon as its first result exists; the results it had by then."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}
    process = subprocess.Popen([str(Path(sys.executable).parent / "diffstyler"), *args], cwd=REPO_ROOT, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if any(RESULT.fullmatch(path.name) for path in out.glob("*.png")):
                break
            time.sleep(0.01)
        process.send_signal(sig)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return finished_jobs(out)


def finished_jobs(out: Path) -> list[str]:
    """The files of the jobs whose result and grid both exist (a job is done only with all its outputs)."""
    results = [path for path in out.glob("*.png") if RESULT.fullmatch(path.name) and (out / f"{path.stem}_grid.png").exists()]
    return sorted(name for path in results for name in (path.name, f"{path.stem}_grid.png"))


def files(folder: Path) -> dict[str, bytes]:
    """Every file but results.jsonl (its times differ from run to run), byte for byte."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.name != RESULTS_NAME}


def results(folder: Path) -> list[tuple[str, str, list[str]]]:
    return [(line["id"], line["status"], line["outputs"]) for line in read_json_lines(folder / RESULTS_NAME)]


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_in_process(predict_args(run, inputs), monkeypatch)
    return files(run / "out"), results(run / "out")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_an_interrupted_run_rerun_gives_the_uninterrupted_files(inputs, uninterrupted, tmp_path, monkeypatch, sig):
    args = predict_args(tmp_path, inputs)
    done_before = interrupt_after_first_result(args, tmp_path / "out", sig)
    assert len(done_before) < 2 * JOBS, "the run was not interrupted before its end"
    stamps = {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in done_before}
    run_in_process(args, monkeypatch)
    expected_files, expected_results = uninterrupted
    assert files(tmp_path / "out") == expected_files  # every file, byte for byte, and nothing else
    assert len(expected_results) == JOBS and all(status == "done" for _, status, _ in expected_results)
    # one line per job, in job order, none lost; a job finished just before the kill, but not yet
    # recorded, is found finished by the rerun: "skipped"
    rerun = results(tmp_path / "out")
    assert [(job, outputs) for job, _, outputs in rerun] == [(job, outputs) for job, _, outputs in expected_results]
    finished_before = {Path(name).stem for name in done_before}
    for job, status, _ in rerun:
        assert status in (("done", "skipped") if job in finished_before else ("done",)), rerun
    assert {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in done_before} == stamps  # not redone
    leftovers = [p.name for folder in ("out", "cache") for p in (tmp_path / folder).iterdir() if p.name.startswith(".")]
    assert leftovers == []
