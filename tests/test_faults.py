"""Faults injected into a long predict run (20 jobs on the tiny model: 10 photos x 2 styles, 2 jobs
per chunk), each ending with nothing lost:

- a full disk in the output folder: one line naming the folder, no partial file, results.jsonl and
  its parts whole, and a rerun with space does the rest; in the inversion cache folder: one
  warning naming the folder, and the run finishes without it. As root the disk is a small tmpfs
  mounted by the test; otherwise (mounting needs root) that case is skipped, and the same writes
  fail through a fault-injecting `open` (`DiskFull`) in the modules that write, always;
- a read-only output folder: one line before the model loads;
- a corrupted inversion-cache entry (truncated, of another shape, holding NaN): recomputed with one
  warning, never used;
- a torn last line of results.jsonl: repaired, its job redone once;
- two runs on one output folder at once: every result once;
- SIGKILL at random points of the run, five times, then a rerun: the files of an uninterrupted run.

Where runs are compared with the uninterrupted one, files must be the same and byte-identical
but for a PNG redone in another batch (float sums depend on the batch: pixels may differ by one
level, `tests/test_interruptions.py`). Killed and concurrent runs are processes forked from a
server that has imported the project once (multiprocessing's forkserver), so that each start costs
no imports.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import diffstyler.outputs
import diffstyler.results
from diffstyler.cli import main
from diffstyler.data.jobs import StyleEntry
from diffstyler.results import PARTS_FOLDER, RESULTS_NAME, read_json_lines
from tests.helpers import lora_and_rotated_photos, make_job, make_predictor, run_cli_in_process, stylize_one
from tests.test_interruptions import assert_same_files

REPO_ROOT = Path(__file__).resolve().parents[1]
STYLIZE_CONFIG = str(REPO_ROOT / "configs" / "smoke" / "stylize.yaml")
PHOTOS, STYLES = 10, ("full", "half")
JOBS = PHOTOS * len(STYLES)
PAGE = 4096  # tmpfs counts whole pages


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[str, str]:
    return lora_and_rotated_photos(tmp_path_factory.mktemp("fault_inputs"), PHOTOS, degrees=12)


def predict_args(run: Path, inputs, *extra: str, out: Optional[Path] = None, cache: Optional[Path] = None,
                 logger: bool = False) -> list[str]:
    """The 20-job run at 4 steps, writing results and grids into `out` (default run/out); without a
    logger, Lightning's own files (the resolved config) into run/root, with one, its logs into run/logs."""
    lora, photos = inputs
    styles = [{"lora": lora, "name": "full"}, {"lora": lora, "name": "half", "scale": 0.5}]
    lightning = (["--trainer.logger.init_args.save_dir", str(run / "logs")] if logger else
                 ["--trainer.logger", "false", "--trainer.default_root_dir", str(run / "root")])
    return ["predict", "--config", STYLIZE_CONFIG, "--data.content", json.dumps([photos]), "--data.pairing", "product",
            "--data.batch_size", "2", "--data.styles", json.dumps(styles), "--model.output.folder", str(out or run / "out"),
            "--model.output.overwrite", "false", "--model.inversion_cache", str(cache or run / "cache"),
            "--model.sampling.steps", "4", "--model.injection.feature_steps", "2", "--model.injection.attention_steps", "2",
            *lightning, "--model.progress", "false", "--trainer.enable_progress_bar", "false", *extra]


def output_files(folder: Path) -> dict[str, bytes]:
    """Every file of the folder but results.jsonl (its times differ from run to run), by name."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file() and path.name != RESULTS_NAME}


def result_lines(folder: Path) -> list[dict[str, Any]]:
    return read_json_lines(folder / RESULTS_NAME)


def finished_jobs(out: Path) -> set[str]:
    """The jobs whose result and grid are both there (a job is done only with every file)."""
    return {path.stem for path in out.glob("photo*_*.png") if not path.stem.endswith("_grid") and (out / f"{path.stem}_grid.png").exists()}


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> tuple[Path, dict[str, bytes], list[dict[str, Any]]]:
    """The uninterrupted run: its output folder, files and results.jsonl lines."""
    run = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(REPO_ROOT)
        monkeypatch.setattr(sys, "argv", ["diffstyler"])
        main(predict_args(run, inputs))
    lines = result_lines(run / "out")
    assert [line["status"] for line in lines] == ["done"] * JOBS
    return run / "out", output_files(run / "out"), lines


def assert_like_the_uninterrupted_run(out: Path, reference) -> list[dict[str, Any]]:
    """The same files (PNG pixels within one level), one line per job in job order with the same
    outputs, each done or found done, and nothing half-written left (no temporary or part file)."""
    _, expected_files, expected_lines = reference
    assert_same_files(output_files(out), expected_files)
    lines = result_lines(out)
    assert [(line["id"], line["outputs"]) for line in lines] == [(line["id"], line["outputs"]) for line in expected_lines]
    assert {line["status"] for line in lines} <= {"done", "skipped"}, lines
    assert sorted(path.name for path in out.iterdir() if path.name.startswith(".")) == []
    return lines


def assert_nothing_partial(folder: Path) -> None:
    """Every PNG decodes, no temporary file, and every line of results.jsonl and of its part files
    is whole JSON (a torn line would take the next one with it)."""
    for path in folder.rglob("*.png"):
        with Image.open(path) as image:
            image.load()
    assert [path.name for path in folder.rglob(".dstmp-*")] == []
    for jsonl in [folder / RESULTS_NAME, *(folder / PARTS_FOLDER).glob("*.jsonl")]:
        if jsonl.exists():
            for line in jsonl.read_text().splitlines():
                json.loads(line)


# --- a full disk ----------------------------------------------------------------------------------

class DiskFull:
    """Writes into `folder` fail as on a full disk once `room` bytes are written there: the write
    that crosses it puts down what still fits, then raises ENOSPC. Installed as `open` in the
    modules that write every output, cache and results file (`outputs.atomic_write`,
    `results.ResultsLog`), so it goes through the code a real full disk does. `make_space` ends it."""

    def __init__(self, folder: Path, room: int):
        self.folder = folder.resolve()
        self.room: Optional[int] = room

    def open(self, file, mode: str = "r", *args, **kwargs):
        handle = builtins.open(file, mode, *args, **kwargs)
        writing = any(flag in mode for flag in "wax+")
        if self.room is None or not writing or not Path(file).resolve().is_relative_to(self.folder):
            return handle
        return FillingFile(handle, self, keep_fileno="a" in mode)

    def make_space(self) -> None:
        self.room = None


class FillingFile:
    """A file of a `DiskFull` folder. A PNG's temporary file shows no fileno, so that Pillow writes
    its pixels through `write` (with one, it hands the descriptor to its C encoder)."""

    def __init__(self, handle, disk: DiskFull, keep_fileno: bool):
        self.handle, self.disk, self.keep_fileno = handle, disk, keep_fileno

    def write(self, data) -> int:
        room = self.disk.room
        if room is None or len(data) <= room:
            if room is not None:
                self.disk.room = room - len(data)
            return self.handle.write(data)
        self.handle.write(data[:room])
        self.disk.room = 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fileno(self) -> int:
        if not self.keep_fileno:
            raise io.UnsupportedOperation("fileno")
        return self.handle.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> "FillingFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.close()


def need_root_for_tmpfs() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the fault-injecting writer covers the same code path")


@contextlib.contextmanager
def tmpfs(folder: Path, kib: int, *options: str) -> Iterator[Path]:
    """A tmpfs of `kib` KiB mounted at `folder` for the block (skipped where mounting is refused)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={kib}k", *options]), "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextlib.contextmanager
def full_disk(fault: str, folder: Path, room: int, monkeypatch) -> Iterator[Callable[[], None]]:
    """`folder` with about `room` bytes free, by `fault`: "tmpfs" (a small tmpfs, filled up but for
    `room`) or "injected" (`DiskFull`). Yields the function that makes space."""
    if fault == "injected":
        disk = DiskFull(folder, room)
        for module in (diffstyler.outputs, diffstyler.results):
            monkeypatch.setattr(module, "open", disk.open, raising=False)
        yield disk.make_space
        return
    need_root_for_tmpfs()
    size = 4 << 10  # KiB
    with tmpfs(folder, size):
        filler = folder / "filler"
        filler.write_bytes(b"\0" * (size * 1024 - math.ceil(room / PAGE) * PAGE))
        yield lambda: filler.unlink()


def on_pages(sizes) -> int:
    return sum(math.ceil(size / PAGE) * PAGE for size in sizes)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["tmpfs", "injected"])
def test_a_full_output_folder_is_one_line_naming_it_and_a_rerun_with_space_does_the_rest(fault, inputs, reference, tmp_path, monkeypatch,
                                                                                        capsys):
    """Room for about half the run's files. Caught: the OSError's traceback instead of a line naming
    the folder; a half-written PNG or temporary file left; a torn line in a results part file (the
    next line lost with it); finished jobs redone or lost by the rerun."""
    out = tmp_path / "out"
    _, expected_files, _ = reference
    sizes = [len(data) for data in expected_files.values()]
    room = (on_pages(sizes) if fault == "tmpfs" else sum(sizes)) // 2
    with full_disk(fault, out, room, monkeypatch) as make_space:
        status, output = run_cli_in_process(predict_args(tmp_path, inputs), monkeypatch, capsys)
        assert status == 2, output[-3000:]
        errors = [line for line in output.splitlines() if line.startswith("diffstyler predict: error: ")]
        assert errors == [f"diffstyler predict: error: cannot write into the output folder (model.output.folder={out.resolve()}): "
                          "No space left on device; the finished jobs are kept, and the same command does the rest once it can "
                          "write there"], output[-3000:]
        assert "Traceback" not in output and output.rstrip().endswith(errors[0])
        assert_nothing_partial(out)
        finished = finished_jobs(out)
        assert 0 < len(finished) < JOBS, finished
        stamps = {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")}
        make_space()
        status, output = run_cli_in_process(predict_args(tmp_path, inputs), monkeypatch, capsys)
        assert status == 0, output[-3000:]
        assert f"{JOBS} jobs: {JOBS - len(finished)} done, {len(finished)} already done (skipped), 0 failed" in output
        lines = assert_like_the_uninterrupted_run(out, reference)
        kept = {name: stamp for name, stamp in stamps.items() if Path(name).stem.removesuffix("_grid") in finished}
        assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not redone
        assert {line["id"] for line in lines if line["status"] == "skipped"} <= finished


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["tmpfs", "injected"])
def test_a_full_cache_folder_is_one_warning_naming_it_and_the_run_finishes_without_it(fault, inputs, reference, tmp_path, monkeypatch):
    """Room for three of the ten trajectories. Caught: the run stopped by the cache (it only saves
    time), a warning per job, a half-written trajectory left (or read back by the next job)."""
    cache_files = sorted((reference[0].parent / "cache").glob("*.safetensors"))
    assert len(cache_files) == PHOTOS
    one = cache_files[0].stat().st_size
    room = (math.ceil(one / PAGE) * PAGE if fault == "tmpfs" else one) * 3 + one // 2
    cache = tmp_path / "cache"
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    with full_disk(fault, cache, room, monkeypatch), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(predict_args(tmp_path, inputs, cache=cache))
        written = sorted(cache.glob("*.safetensors"))
        assert_nothing_partial(cache)
        for path in written:
            assert torch.isfinite(load_file(str(path))["trajectory"]).all()
    cache_warnings = [str(w.message) for w in caught if "inversion cache" in str(w.message)]
    assert cache_warnings == [f"inversion cache not written ({cache}): No space left on device; the run goes on without it"]
    assert len(written) == 3
    lines = assert_like_the_uninterrupted_run(tmp_path / "out", reference)
    assert [line["status"] for line in lines] == ["done"] * JOBS


def test_a_read_only_output_folder_is_one_line_before_the_model_loads(inputs, tmp_path, monkeypatch, capsys, model_builds):
    """As root (whom permissions do not stop) a read-only tmpfs; otherwise a folder without write
    permission. Caught: the folder found read-only only at the first job's files, after the model
    loaded and the first chunk was stylized."""
    out = tmp_path / "out"
    with contextlib.ExitStack() as stack:
        if os.geteuid() == 0:
            stack.enter_context(tmpfs(out, 64, "ro"))
        else:
            out.mkdir()
            out.chmod(0o555)
            stack.callback(out.chmod, 0o755)
        status, output = run_cli_in_process(predict_args(tmp_path, inputs), monkeypatch, capsys)
        assert list(out.iterdir()) == []
    assert status == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("diffstyler predict: error: ")]
    assert errors == [f"diffstyler predict: error: output folder not writable (model.output.folder={out}): no write permission in {out}"]
    assert model_builds == []


# --- a corrupted inversion cache entry ---------------------------------------------------------------

@pytest.fixture(scope="module")
def cached_job(inputs, tmp_path_factory):
    """One job stylized with an empty cache: the job, its result's pixels, its cache file."""
    lora, _ = inputs
    run = tmp_path_factory.mktemp("cached_job")
    job = make_job([StyleEntry(lora=str(Path(lora)))])
    record = stylize_one(make_predictor(run, grid=False), job)
    (cache_file,) = (run / "cache").glob("*.safetensors")
    return job, np.asarray(Image.open(record.outputs[0])), cache_file


def corrupt(path: Path, how: str) -> None:
    trajectory = load_file(str(path))["trajectory"]
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "of another shape":
        save_file({"trajectory": trajectory[1:]}, str(path))
    else:
        trajectory[2, 0, 3, 3] = float("nan")
        save_file({"trajectory": trajectory}, str(path))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "of another shape", "holding NaN"])
def test_a_corrupted_cache_entry_is_recomputed_with_one_warning_and_never_used(how, cached_job, tmp_path):
    """Caught: a NaN trajectory used (its job fails with non-finite latents, or its pixels change),
    a misshaped one used, the warning missing or given twice, the bad file kept."""
    job, pixels, good_file = cached_job
    cache_file = tmp_path / "cache" / good_file.name
    cache_file.parent.mkdir()
    shutil.copy(good_file, cache_file)
    corrupt(cache_file, how)
    predictor = make_predictor(tmp_path, grid=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = stylize_one(predictor, job)
    assert record.status == "done"
    cache_warnings = [str(w.message) for w in caught if "inversion cache" in str(w.message)]
    assert len(cache_warnings) == 1 and cache_warnings[0].startswith(f"inversion cache file ignored ({cache_file}): ")
    assert cache_warnings[0].endswith("; recomputing the inversion")
    assert np.array_equal(np.asarray(Image.open(record.outputs[0])), pixels)
    assert torch.equal(load_file(str(cache_file))["trajectory"], load_file(str(good_file))["trajectory"])  # written again


# --- results.jsonl ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_torn_last_line_of_results_jsonl_is_repaired_and_its_job_redone_once(inputs, reference, tmp_path, monkeypatch, capsys):
    """The run's last job torn from results.jsonl with its result (as a copy cut short would leave
    them). Caught: the torn line breaking the merge, the line kept torn, every job redone, or the
    job redone again by the next run."""
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    text = (out / RESULTS_NAME).read_text()
    last = text.splitlines()[-1]
    (out / RESULTS_NAME).write_text(text[: len(text) - len(last) // 2 - 1])
    torn_job = json.loads(last)["id"]
    (out / f"{torn_job}.png").unlink()
    stamps = {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")}
    status, output = run_cli_in_process(predict_args(tmp_path, inputs), monkeypatch, capsys)
    assert status == 0 and f"{JOBS} jobs: 1 done, {JOBS - 1} already done (skipped), 0 failed" in output, output[-3000:]
    lines = assert_like_the_uninterrupted_run(out, reference)
    assert [line["status"] for line in lines] == ["done"] * JOBS  # the others keep the line of the run that made them
    assert {name: (out / name).stat().st_mtime_ns for name in stamps if not name.startswith(torn_job)} == {
        name: stamp for name, stamp in stamps.items() if not name.startswith(torn_job)}
    status, output = run_cli_in_process(predict_args(tmp_path, inputs), monkeypatch, capsys)
    assert status == 0 and f"{JOBS} jobs: 0 done, {JOBS} already done (skipped), 0 failed" in output, output[-3000:]


# --- processes: at once, and killed --------------------------------------------------------------------

def run_predict(args: list[str], log: str) -> None:
    """A forked process's work: `diffstyler <args>` from the repository root, its output into `log`."""
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.chdir(REPO_ROOT)
    sys.argv = ["diffstyler"]
    main(args)


@pytest.fixture(scope="module")
def forked():
    """Starts `run_predict` in a process forked from a server that has imported the project."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["diffstyler.cli.app", __name__])

    def start(args: list[str], log: Path) -> multiprocessing.Process:
        process = context.Process(target=run_predict, args=(args, str(log)))
        process.start()
        return process

    return start


def wait(process: multiprocessing.Process, log: Path, timeout: float = 240) -> int:
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        pytest.fail(f"the run did not end: {log.read_text()[-3000:]}")
    return process.exitcode


@pytest.mark.slow
def test_two_runs_on_one_output_folder_at_once_make_every_result_once(inputs, reference, forked, tmp_path):
    """Both runs go through the same jobs in the same order, so they write the same files at the same
    moments. Caught: one run removing the other's temporary file while it writes (its rename then
    fails: a traceback), a result or a line of results.jsonl twice or missing."""
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    runs = [forked(predict_args(tmp_path, inputs), log) for log in logs]
    statuses = [wait(run, log) for run, log in zip(runs, logs)]
    assert statuses == [0, 0], [log.read_text()[-3000:] for log in logs]
    done = 0
    for log in logs:
        summary = [line for line in log.read_text().splitlines() if line.startswith(f"diffstyler predict: {JOBS} jobs: ")]
        assert len(summary) == 1 and ", 0 failed;" in summary[0], summary
        done += int(summary[0].split(" jobs: ")[1].split(" done")[0])
    assert done >= JOBS  # between them, every job was done
    assert_like_the_uninterrupted_run(tmp_path / "out", reference)
    assert [path.name for path in (tmp_path / "cache").iterdir() if path.name.startswith(".")] == []


@pytest.mark.slow
def test_sigkill_at_random_points_five_times_then_a_rerun_gives_the_uninterrupted_files(inputs, reference, forked, tmp_path):
    """Each run is killed a random 0-100 ms after it has finished 1 to 3 more jobs (inside the
    writing of a chunk's files, its results line or the next chunk's work). Caught: a partial PNG
    or cache file taken for finished, a temporary file left, a results line lost or doubled, a
    finished job redone."""
    rng = random.Random(25)
    out = tmp_path / "out"
    args = predict_args(tmp_path, inputs)
    for kill in range(5):
        # at most 14 jobs finished when the kill is due: each run may finish a chunk or two more before it
        # lands, and a run that ends by itself is no kill
        target = min((len(finished_jobs(out)) if out.exists() else 0) + rng.randint(1, 3), JOBS - 6)
        log = tmp_path / f"killed{kill}.log"
        process = forked(args, log)
        deadline = time.monotonic() + 240
        while process.is_alive() and (not out.exists() or len(finished_jobs(out)) < target) and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.1))
        process.kill()
        process.join()
        assert process.exitcode == -9, log.read_text()[-3000:]  # killed, not finished
    before = finished_jobs(out)
    assert 0 < len(before) < JOBS, before
    stamps = {path.name: path.stat().st_mtime_ns for path in out.glob("*.png") if Path(path.name).stem.removesuffix("_grid") in before}
    log = tmp_path / "rerun.log"
    assert wait(forked(args, log), log) == 0, log.read_text()[-3000:]
    assert_like_the_uninterrupted_run(out, reference)
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps  # finished jobs are not redone
    assert [path.name for path in (tmp_path / "cache").iterdir() if path.name.startswith(".")] == []


def test_a_results_line_that_does_not_fit_is_cut_off_again(tmp_path, monkeypatch):
    """The disk fills up in the middle of a results line. Caught: the torn half left at the end of
    the part file, where the next line (written once there is space) lands on it and both are lost."""
    log = diffstyler.results.ResultsLog(tmp_path)
    log.record({"id": "a", "status": "done"})
    disk = DiskFull(tmp_path, room=10)
    monkeypatch.setattr(diffstyler.results, "open", disk.open, raising=False)
    with pytest.raises(OSError) as full:
        log.record({"id": "b", "status": "done"})
    assert full.value.errno == errno.ENOSPC
    disk.make_space()
    log.record({"id": "c", "status": "done"})
    assert [line["id"] for line in read_json_lines(log.path)] == ["a", "c"]
    assert all(json.loads(line) for line in log.path.read_text().splitlines())


# --- SLURM's requeue ---------------------------------------------------------------------------------

SLURM_JOB = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "predict", "SLURM_JOB_ID": "7",
             "SLURM_NODEID": "0", "SLURM_LOCALID": "0", "SLURM_PROCID": "0", "SLURM_NODELIST": "127.0.0.1"}


def tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in tensors_in(item)]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in tensors_in(item)]
    return []


@pytest.mark.slow
def test_a_slurm_requeue_saves_a_checkpoint_without_weights_and_the_requeued_run_does_the_rest(inputs, reference, tmp_path, monkeypatch,
                                                                                             capsys):
    """Under SLURM, Lightning saves `hpc_ckpt_<n>.ckpt` on SIGUSR1 and requeues the job (scontrol),
    which SLURM then stops (SIGTERM); the requeued job, the same command, restores that checkpoint.
    A predict's state is its output folder: the checkpoint holds no weights. Caught: the whole
    predictor saved (the UNet's weights: gigabytes at real sizes), the checkpoint written outside
    the output folder (the working folder), the requeued run failing on a checkpoint without weights."""
    from diffstyler.predictor import StylizePredictor

    for name, value in SLURM_JOB.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"

    def slurm() -> None:  # SIGUSR1 once the run has results, SIGTERM once it has requeued itself
        deadline = time.monotonic() + 240
        while not (out.exists() and finished_jobs(out)) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)
        while not (tmp_path / "scontrol.log").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=slurm)
    sender.start()
    status, output = run_cli_in_process(predict_args(tmp_path, inputs, logger=True), monkeypatch, capsys)
    sender.join()
    assert status == 128 + signal.SIGTERM, output[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 7\n"
    assert [path.name for path in out.glob("*.ckpt")] == ["hpc_ckpt_1.ckpt"] and not list(REPO_ROOT.glob("hpc_ckpt_*"))
    checkpoint = torch.load(out / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"] == {} and "loops" not in checkpoint
    assert [tensor.numel() for tensor in tensors_in(checkpoint)] == [1]  # Lightning's ModelCheckpoint state: its kth_value
    assert (out / "hpc_ckpt_1.ckpt").stat().st_size < 64 << 10

    restored = []
    on_load_checkpoint = StylizePredictor.on_load_checkpoint
    monkeypatch.setattr(StylizePredictor, "on_load_checkpoint", lambda self, checkpoint: restored.append(1) or on_load_checkpoint(self, checkpoint))
    status, output = run_cli_in_process(predict_args(tmp_path, inputs, logger=True), monkeypatch, capsys)
    assert status == 0 and restored == [1], output[-3000:]
    (out / "hpc_ckpt_1.ckpt").unlink()
    assert_like_the_uninterrupted_run(out, reference)


@pytest.mark.slow
def test_slurms_requeue_signal_is_handled_at_the_end_of_the_chunk_in_progress(inputs, tmp_path, monkeypatch):
    """Lightning's requeue closes the loggers and saves a checkpoint: inside the signal handler it
    would close the TensorBoard writer in the middle of a write (seen: "Writer is closed", a
    traceback). Caught: the requeue run at once, inside the chunk (scontrol already called when the
    signal returns), or never (a signal during the last chunk lost)."""
    from lightning import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from diffstyler.callbacks.stop import StopOnSignal
    from diffstyler.data.jobs import StylizeDataModule

    for name, value in SLURM_JOB.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "bin").mkdir()
    scontrol, calls = tmp_path / "bin" / "scontrol", tmp_path / "scontrol.log"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    lora, photos = inputs
    predictor = make_predictor(tmp_path, grid=False)
    data = StylizeDataModule(content=[photos], styles=[StyleEntry(lora=lora)], resolution=64, batch_size=2)
    trainer = Trainer(accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path / "logs"), default_root_dir=tmp_path / "out",
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[StopOnSignal(predictor.writer)])
    last_chunk = {job.id for job in data.jobs()[-2:]}
    requeued_at_once = []

    def requeue_signal_in_the_last_chunk(state) -> None:
        if state.job in last_chunk and not requeued_at_once:
            os.kill(os.getpid(), signal.SIGUSR1)
            requeued_at_once.append(calls.exists())  # the handler has run by now, whatever it does

    predictor.step_callback = requeue_signal_in_the_last_chunk
    trainer.predict(predictor, datamodule=data, return_predictions=False)
    assert requeued_at_once == [False]
    assert calls.read_text() == "requeue 7\n"
    assert predictor.writer.summary == {"done": PHOTOS, "skipped": 0, "failed": 0}
    assert [path.name for path in (tmp_path / "out").glob("*.ckpt")] == ["hpc_ckpt_1.ckpt"]
