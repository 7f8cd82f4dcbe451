"""Interrupted runs: a predict run killed (SIGKILL) or stopped with Ctrl-C (SIGINT) at some moment,
then rerun, leaves exactly the files of an uninterrupted run, byte for byte, and no temporary file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from diffstyler.cli import main
from tests.helpers import write_random_lora

REPO_ROOT = Path(__file__).resolve().parents[1]
STYLIZE_CONFIG = str(REPO_ROOT / "configs" / "smoke" / "stylize.yaml")
CONTENT = REPO_ROOT / "data" / "content_shapes.png"
JOBS = 6


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    lora = write_random_lora(folder / "lora", seed=2).parent
    contents = []
    for k in range(JOBS):
        path = folder / f"photo{k}.png"
        Image.open(CONTENT).rotate(15 * k).save(path)
        contents.append(str(path))
    return str(lora), contents


def predict_args(run: Path, inputs) -> list[str]:
    lora, contents = inputs
    return ["predict", "--config", STYLIZE_CONFIG, "--data.content", json.dumps(contents),
            "--data.styles", json.dumps([{"lora": lora}]), "--model.output.folder", str(run / "out"),
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
            if list(out.glob("photo*[0-9].png")):
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
    results = [path for path in out.glob("photo*[0-9].png") if (out / f"{path.stem}_grid.png").exists()]
    return sorted(name for path in results for name in (path.name, f"{path.stem}_grid.png"))


def files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_in_process(predict_args(run, inputs), monkeypatch)
    return files(run / "out")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_an_interrupted_run_rerun_gives_the_uninterrupted_files(inputs, uninterrupted, tmp_path, monkeypatch, sig):
    args = predict_args(tmp_path, inputs)
    done_before = interrupt_after_first_result(args, tmp_path / "out", sig)
    assert len(done_before) < 2 * JOBS, "the run was not interrupted before its end"
    stamps = {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in done_before}
    run_in_process(args, monkeypatch)
    assert files(tmp_path / "out") == uninterrupted  # every file, byte for byte, and nothing else
    assert {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in done_before} == stamps  # not redone
    leftovers = [p.name for folder in ("out", "cache") for p in (tmp_path / folder).iterdir() if p.name.startswith(".")]
    assert leftovers == []
