"""Interrupted predict runs.

- A run over a folder (3 contents x 2 styles, 2 jobs per UNet call) killed (SIGKILL), stopped with
  Ctrl-C (SIGINT) or SIGTERM after its first results, then rerun, leaves exactly the files of an
  uninterrupted run (byte for byte but for the pixels of jobs redone in another batch, which may
  differ by one level: float32 sums depend on the batch), no temporary file, and a complete results.jsonl. Stopped by a
  signal, the run itself finishes the chunk in progress, merges results.jsonl, prints its summary
  with the jobs not started and exits 130 / 143 (`diffstyler.callbacks.stop`).
- On two DDP processes, SIGTERM to one of them stops both, with one summary.
- In-process: the stop between two chunks, and Lightning's SLURM handlers kept.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from lightning import Callback, Trainer
from PIL import Image

from diffstyler.callbacks.stop import PredictInterrupted, StopOnSignal
from diffstyler.cli import main
from diffstyler.data.jobs import StyleEntry, StylizeDataModule
from diffstyler.results import PARTS_FOLDER, RESULTS_NAME, read_json_lines
from tests.helpers import lora_and_rotated_photos, make_predictor

REPO_ROOT = Path(__file__).resolve().parents[1]
STYLIZE_CONFIG = str(REPO_ROOT / "configs" / "smoke" / "stylize.yaml")
CONTENTS, STYLES = 3, ("full", "half")
JOBS = CONTENTS * len(STYLES)
RESULT = re.compile(r"photo\d_(full|half)\.png")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return lora_and_rotated_photos(tmp_path_factory.mktemp("inputs"), CONTENTS, degrees=15)


def predict_args(run: Path, inputs, *extra: str) -> list[str]:
    lora, photos = inputs
    styles = [{"lora": lora, "name": "full"}, {"lora": lora, "name": "half", "scale": 0.5}]
    return ["predict", "--config", STYLIZE_CONFIG, "--data.content", json.dumps([photos]), "--data.pairing", "product",
            "--data.batch_size", "2", "--data.styles", json.dumps(styles), "--model.output.folder", str(run / "out"),
            "--model.output.overwrite", "false", "--model.inversion_cache", str(run / "cache"),
            "--trainer.logger.init_args.save_dir", str(run / "logs"), "--model.progress", "false",
            "--trainer.enable_progress_bar", "false", *extra]


def run_in_process(args: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    main(args)


def start_console(args: list[str], stderr: Path) -> subprocess.Popen:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}
    with open(stderr, "w") as file:  # a file, not a pipe: nobody reads it while the run goes on
        return subprocess.Popen([str(Path(sys.executable).parent / "diffstyler"), *args], cwd=REPO_ROOT, env=environment,
                                stdout=subprocess.DEVNULL, stderr=file)


def wait_for_first_result(process: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if finished_jobs(out):
            return
        time.sleep(0.01)


def interrupt_after_first_result(args: list[str], out: Path, sig: int, stderr: Path) -> tuple[int, list[str]]:
    """Start the command, send `sig` as soon as its first result exists; its exit status, and the
    results it had when it ended."""
    process = start_console(args, stderr)
    try:
        wait_for_first_result(process, out)
        process.send_signal(sig)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, finished_jobs(out)


def finished_jobs(out: Path) -> list[str]:
    """The files of the jobs whose result and grid both exist (a job is done only with all its outputs)."""
    results = [path for path in out.glob("*.png") if RESULT.fullmatch(path.name) and (out / f"{path.stem}_grid.png").exists()]
    return sorted(name for path in results for name in (path.name, f"{path.stem}_grid.png"))


def files(folder: Path) -> dict[str, bytes]:
    """Every file but results.jsonl (its times differ from run to run), byte for byte."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.name != RESULTS_NAME}


def assert_same_files(actual: dict[str, bytes], expected: dict[str, bytes]) -> None:
    """The same files; each byte for byte, but a PNG's pixels may differ by one level (a job redone
    after the interruption runs in another batch, or another process with fewer CPU threads, and
    float32 sums depend on both: tests/test_predictor_batches.py); its text chunks (the settings)
    are equal."""
    assert sorted(actual) == sorted(expected)
    for name, data in expected.items():
        if data == actual[name]:
            continue
        assert name.endswith(".png"), name
        with Image.open(io.BytesIO(data)) as want, Image.open(io.BytesIO(actual[name])) as got:
            assert got.text == want.text, name
            difference = np.abs(np.asarray(got).astype(int) - np.asarray(want).astype(int))
        assert difference.max() <= 1, name


def results(folder: Path) -> list[tuple[str, str, list[str]]]:
    return [(line["id"], line["status"], line["outputs"]) for line in read_json_lines(folder / RESULTS_NAME)]


def done_ids(done: list[str]) -> list[str]:
    return sorted({Path(name).stem for name in done if not name.endswith("_grid.png")})


def assert_stopped_cleanly(out: Path, status: int, stderr: str, sig: int, done: list[str]) -> None:
    """Exit status 128 + the signal, the summary last with the jobs not started, results.jsonl
    merged with a line for every finished job and nothing else, no part or temporary file."""
    assert status == 128 + sig, stderr[-3000:]
    finished = len(done_ids(done))
    assert 0 < finished < JOBS, done
    assert stderr.strip().splitlines()[-1] == (
        f"diffstyler predict: interrupted by {signal.Signals(sig).name}: {JOBS} jobs: {finished} done, 0 already done "
        f"(skipped), 0 failed, {JOBS - finished} not started; results in {out / RESULTS_NAME}; the same command does the rest")
    assert sorted((job, status) for job, status, _ in results(out)) == [(job, "done") for job in done_ids(done)]
    assert not (out / PARTS_FOLDER).exists()
    assert [path.name for path in out.iterdir() if path.name.startswith(".")] == []


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_in_process(predict_args(run, inputs), monkeypatch)
    return files(run / "out"), results(run / "out")


def assert_the_rerun_finishes_like_the_uninterrupted_run(run: Path, inputs, uninterrupted, done_before: list[str], monkeypatch) -> None:
    stamps = {name: (run / "out" / name).stat().st_mtime_ns for name in done_before}
    run_in_process(predict_args(run, inputs), monkeypatch)
    expected_files, expected_results = uninterrupted
    assert_same_files(files(run / "out"), expected_files)  # every file, and nothing else
    assert len(expected_results) == JOBS and all(status == "done" for _, status, _ in expected_results)
    # one line per job, in job order, none lost; a job finished just before the kill, but not yet
    # recorded, is found finished by the rerun: "skipped"
    rerun = results(run / "out")
    assert [(job, outputs) for job, _, outputs in rerun] == [(job, outputs) for job, _, outputs in expected_results]
    finished_before = {Path(name).stem for name in done_before}
    for job, status, _ in rerun:
        assert status in (("done", "skipped") if job in finished_before else ("done",)), rerun
    assert {name: (run / "out" / name).stat().st_mtime_ns for name in done_before} == stamps  # not redone
    leftovers = [p.name for folder in ("out", "cache") for p in (run / folder).iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["sigkill", "ctrl-c", "sigterm"])
def test_an_interrupted_run_rerun_gives_the_uninterrupted_files(inputs, uninterrupted, tmp_path, monkeypatch, sig):
    """SIGINT / SIGTERM catch: the signal only logged (the run goes on to the end, exit 0), Ctrl-C
    killing the run at once (Lightning's exit 1), results.jsonl not merged on the way out, the
    summary missing or not counting the jobs not started; all three: files redone or lost by the rerun."""
    args = predict_args(tmp_path, inputs)
    status, done_before = interrupt_after_first_result(args, tmp_path / "out", sig, tmp_path / "stderr.txt")
    assert len(done_before) < 2 * JOBS, "the run was not interrupted before its end"
    if sig != signal.SIGKILL:
        assert_stopped_cleanly(tmp_path / "out", status, (tmp_path / "stderr.txt").read_text(), sig, done_before)
    assert_the_rerun_finishes_like_the_uninterrupted_run(tmp_path, inputs, uninterrupted, done_before, monkeypatch)


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie, ended but not yet reaped by its new parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_sigterm_to_one_of_two_ddp_processes_stops_both_with_one_summary(inputs, uninterrupted, tmp_path, monkeypatch):
    """SIGTERM to rank 1 only, one job per chunk (3 chunks per process). Catches: a rank left waiting
    (in Lightning's broadcast from its SIGTERM handler, or for the other in the results' reduction),
    the other rank never told (it runs all its chunks), two summaries, a rank's results missing from
    results.jsonl, and the launcher exiting 0."""
    args = predict_args(tmp_path, inputs, "--data.batch_size", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    process = start_console(args, tmp_path / "stderr.txt")
    rank1 = None
    try:
        wait_for_first_result(process, tmp_path / "out")
        (rank1,) = children(process.pid)
        os.kill(rank1, signal.SIGTERM)
        status = process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while running(rank1) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(rank1), "rank 1 did not stop"
    finally:
        if process.poll() is None:
            process.kill()
        if rank1 is not None and running(rank1):
            os.kill(rank1, signal.SIGKILL)
    stderr = (tmp_path / "stderr.txt").read_text()
    done_before = finished_jobs(tmp_path / "out")
    assert_stopped_cleanly(tmp_path / "out", status, stderr, signal.SIGTERM, done_before)
    assert stderr.count("diffstyler predict: interrupted by SIGTERM") == 1
    # chunks are dealt by stride: rank 0 has the "full" jobs, rank 1 the "half" ones; both stopped early
    for rank_jobs in ({f"photo{k}_{style}" for k in range(CONTENTS)} for style in STYLES):
        assert not rank_jobs <= set(done_ids(done_before)), done_before
    assert_the_rerun_finishes_like_the_uninterrupted_run(tmp_path, inputs, uninterrupted, done_before, monkeypatch)


# --- in-process --------------------------------------------------------------------------------------

def predict_in_process(tmp_path: Path, inputs, callbacks: list[Callback]) -> tuple[Trainer, object, StylizeDataModule]:
    lora, photos = inputs
    predictor = make_predictor(tmp_path, grid=False)
    data = StylizeDataModule(content=[photos], styles=[StyleEntry(lora=lora)], resolution=64)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks + [StopOnSignal(predictor.writer)])
    return trainer, predictor, data


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_signal_stops_the_run_after_the_chunk_in_progress_with_results_merged(inputs, tmp_path, sig):
    """Catches: the signal only logged (all 3 jobs done), the run stopped inside the chunk (its job
    lost), results.jsonl not merged on the way out (the part file left), the jobs not started
    miscounted, and the handlers left in place after the run."""
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    trainer, predictor, data = predict_in_process(tmp_path, inputs, [])
    sent = []

    def signal_at_the_first_denoising_step(state) -> None:
        if not sent:
            sent.append(os.kill(os.getpid(), sig))

    predictor.step_callback = signal_at_the_first_denoising_step
    with pytest.raises(PredictInterrupted) as stopped:
        trainer.predict(predictor, datamodule=data, return_predictions=False)
    assert stopped.value.signum == sig
    writer = predictor.writer
    assert (writer.summary, writer.not_started, writer.stopped_by) == ({"done": 1, "skipped": 0, "failed": 0}, 2, sig)
    assert [(line["id"], line["status"]) for line in read_json_lines(tmp_path / "out" / RESULTS_NAME)] == [("photo0", "done")]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["photo0.png", RESULTS_NAME]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers


@pytest.mark.slow
def test_under_slurm_lightnings_requeue_and_sigterm_handlers_stay_during_predict(inputs, tmp_path, monkeypatch):
    """Lightning's SLURM environment requeues the job on SIGUSR1 and chains a SIGTERM handler of its
    own; during the predict loop its notifier (which broadcasts from the handler) is replaced, and
    the requeue is deferred to the end of the chunk (`StopOnSignal.on_requeue_signal`). Catches
    either handler lost (the requeue gone), the notifier kept, or the requeue run inside the handler."""
    for name, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "predict", "SLURM_JOB_ID": "7",
                        "SLURM_NODEID": "0", "SLURM_LOCALID": "0", "SLURM_PROCID": "0", "SLURM_NODELIST": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    seen = {}

    class RecordHandlers(Callback):
        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            seen.update({name: signal.getsignal(number) for name, number in (("usr1", signal.SIGUSR1), ("term", signal.SIGTERM))})

    trainer, predictor, data = predict_in_process(tmp_path, inputs, [RecordHandlers()])
    trainer.predict(predictor, datamodule=data, return_predictions=False)
    deferral = seen["usr1"]
    assert deferral.__name__ == "on_requeue_signal" and isinstance(deferral.__self__, StopOnSignal)
    assert [getattr(handler, "__name__", "") for handler in deferral.__self__.requeue_handlers.signal_handlers] == ["_slurm_sigusr_handler_fn"]
    assert [getattr(handler, "__name__", "") for handler in seen["term"].signal_handlers] == ["on_sigterm", "_sigterm_handler_fn"]
    assert predictor.writer.summary == {"done": 3, "skipped": 0, "failed": 0} and predictor.writer.stopped_by is None
