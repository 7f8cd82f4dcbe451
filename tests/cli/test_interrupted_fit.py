"""Ctrl-C (SIGINT) and SIGTERM during `diffstyler fit` (`diffstyler.callbacks.interrupt`): the fit
stops at the end of the step it is in, saves a checkpoint of that step, prints the command that
resumes it and exits 130 / 143; the resumed fit gives the uninterrupted fit's LoRA."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file

from diffstyler.callbacks.interrupt import FitInterrupted, Interruption, SaveOnInterrupt, fit_until_interrupted
from diffstyler.cli.reporting import interrupted_line
from diffstyler.cli.status import interrupted_status
from diffstyler.data import StyleDataModule
from diffstyler.lora import LORA_WEIGHTS_NAME, StyleLoRAConfig
from diffstyler.models import ModelSpec
from diffstyler.training import StyleLoRAModule

REPO_ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-6  # tests/test_training.py's resume test
STEPS = 6


class SignalInStep(Callback):
    """Sends `signum` to this process in the middle of step `step` (1-based): after its backward
    pass, before its optimizer step."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


def fit_tiny(folder: Path, style_image: Path, callbacks: list[Callback], ckpt_path: Path | None = None) -> StyleLoRAModule:
    """A STEPS-step fit of the tiny model, as tests/test_training.py's resume test runs it."""
    module = StyleLoRAModule(ModelSpec("tiny"), StyleLoRAConfig(rank=4), learning_rate=5e-3, output_dir=str(folder / "lora"), seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=STEPS, logger=False, callbacks=callbacks,
                        default_root_dir=folder, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    torch.manual_seed(0)  # PEFT draws the initial lora_A from the global RNG
    fit_until_interrupted(trainer, module, StyleDataModule([str(style_image)], resolution=64), ckpt_path=ckpt_path)
    return module


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Training on several CPU threads is not bit-reproducible (the order of a gradient's reductions
    varies: two uninterrupted 6-step fits differ by ~2e-6 on 2 threads), so the fits compared run
    on one; the thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def lora_of(module: StyleLoRAModule) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    return {name: state[name] for name in module.trainable_parameter_names()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, style_image) -> dict[str, torch.Tensor]:
    with one_thread():
        return lora_of(fit_tiny(tmp_path_factory.mktemp("uninterrupted"), style_image, []))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_mid_step_saves_that_step_once_finished_and_the_resume_matches(signum, uninterrupted, tmp_path, style_image):
    """Catches: a checkpoint of a step that did not finish (saved in the signal handler: step 2
    with step 3's gradients lost, or the weights updated but not the step count), Ctrl-C stopping
    Lightning at once (KeyboardInterrupt: no checkpoint, exit 1), a fit that ignores the signal,
    the LoRA exported as if trained, a checkpoint of the whole model, its temporary file left
    behind (never renamed), and the SIGINT handler left in place after the fit."""
    sigint_handler = signal.getsignal(signal.SIGINT)
    with one_thread(), pytest.raises(FitInterrupted) as stopped:
        fit_tiny(tmp_path, style_image, [SignalInStep(step=3, signum=signum), SaveOnInterrupt()])

    assert stopped.value.interruption == Interruption(signum, step=3, checkpoint=tmp_path / "checkpoints" / "interrupted-step=3.ckpt")
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == ["interrupted-step=3.ckpt"]
    checkpoint = torch.load(stopped.value.interruption.checkpoint, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3 and set(checkpoint["state_dict"]) == set(uninterrupted)
    assert not (tmp_path / "lora" / LORA_WEIGHTS_NAME).exists()
    assert signal.getsignal(signal.SIGINT) is sigint_handler

    with one_thread():
        resumed = lora_of(fit_tiny(tmp_path, style_image, [], ckpt_path=stopped.value.interruption.checkpoint))
    for name, expected in uninterrupted.items():
        torch.testing.assert_close(resumed[name], expected, rtol=0, atol=TOLERANCE)


def test_the_line_repeats_the_command_with_the_checkpoint_and_the_status_is_128_plus_the_signal():
    """Catches a resume command that loses the user's options, keeps an older --ckpt_path next to
    the new one, or is not quoted for the shell; and exit statuses other than the shell's."""
    command = ["fit", "--config", "my style.yaml", "--trainer.max_steps", "30", "--ckpt_path=old.ckpt"]
    line = interrupted_line(Interruption(signal.SIGTERM, 12, Path("logs/interrupted-step=12.ckpt")), command)
    assert line == ("diffstyler fit: interrupted by SIGTERM after step 12; resume with: diffstyler fit --config 'my style.yaml' "
                    "--trainer.max_steps 30 --ckpt_path logs/interrupted-step=12.ckpt")
    assert (interrupted_status(signal.SIGINT), interrupted_status(signal.SIGTERM)) == (130, 143)
    assert interrupted_line(Interruption(signal.SIGINT, 0), ["fit"]) == (
        "diffstyler fit: interrupted by SIGINT before its first step; no checkpoint of it was saved, start again with: diffstyler fit")
    # a fit over a folder (one LoRA per image) continues by running again: --ckpt_path is refused there
    assert interrupted_line(Interruption(signal.SIGTERM, 2, resumable=False), ["fit", "--data.one_lora_per_image", "true"]) == (
        "diffstyler fit: interrupted by SIGTERM after step 2; the LoRAs already trained are kept, continue with: "
        "diffstyler fit --data.one_lora_per_image true")


@pytest.mark.slow
def test_under_slurm_lightnings_requeue_and_sigterm_handlers_stay(monkeypatch, tmp_path, style_image):
    """Lightning's SLURM environment requeues the job on SIGUSR1 (saving its hpc checkpoint) and
    handles SIGTERM; both are set when training starts. Catches SaveOnInterrupt replacing either
    handler (requeue lost) instead of only SIGINT."""
    for name, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "fit", "SLURM_JOB_ID": "7",
                        "SLURM_NODEID": "0", "SLURM_LOCALID": "0", "SLURM_PROCID": "0", "SLURM_NODELIST": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    seen = {}

    class RecordHandlers(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen.update({name: signal.getsignal(number) for name, number in
                         (("usr1", signal.SIGUSR1), ("term", signal.SIGTERM), ("int", signal.SIGINT))})

    saver, sigint_handler = SaveOnInterrupt(), signal.getsignal(signal.SIGINT)
    fit_tiny(tmp_path, style_image, [saver, RecordHandlers()])
    usr1_handlers = [getattr(handler, "__name__", "") for handler in seen["usr1"].signal_handlers]
    term_handlers = [getattr(handler, "__name__", "") for handler in seen["term"].signal_handlers]
    assert usr1_handlers == ["_slurm_sigusr_handler_fn"]
    assert term_handlers[:2] == ["_sigterm_notifier_fn", "_sigterm_handler_fn"]
    assert seen["int"] == saver.on_sigint  # only while the fit runs
    assert signal.getsignal(signal.SIGINT) is sigint_handler


# --- the command, end to end ---------------------------------------------------------------------

RESUME_LINE = re.compile(r"diffstyler fit: interrupted by SIGINT after step (\d+); resume with: (diffstyler fit .*)")


def smoke_fit(tmp_path: Path, name: str) -> list[str]:
    return ["fit", "--config", "configs/smoke/style.yaml", "--trainer.max_steps", "30", "--model.output_dir", str(tmp_path / name),
            "--trainer.logger.init_args.save_dir", str(tmp_path / f"{name}_logs"), "--trainer.enable_progress_bar", "false"]


def console(command: str | list[str], stderr: Path) -> subprocess.Popen:
    """The console script from the repository root (a string: through the shell), offline, on one
    CPU thread: the interrupted, resumed and uninterrupted fits must add up their gradients in the
    same order. Its stderr goes to the file `stderr`."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with open(stderr, "w") as file:
        return subprocess.Popen(command, shell=isinstance(command, str), cwd=REPO_ROOT, env=environment,
                                stdout=subprocess.DEVNULL, stderr=file)


def finished(process: subprocess.Popen, stderr: Path) -> tuple[int, str]:
    return process.wait(timeout=300), stderr.read_text()


@pytest.mark.slow
def test_ctrl_c_then_the_printed_command_gives_the_uninterrupted_lora(tmp_path):
    """The smoke fit for 30 steps, Ctrl-C once its step-4 checkpoint exists, then the printed
    command run as printed. Catches: Lightning's "attempting graceful shutdown" and exit 1, no
    line or one whose command does not run (lost options, unquoted paths), a checkpoint the
    command cannot resume from or that resumes to another LoRA."""
    reference = console(["diffstyler", *smoke_fit(tmp_path, "uninterrupted")], tmp_path / "uninterrupted.stderr")

    interrupted = console(["diffstyler", *smoke_fit(tmp_path, "interrupted")], tmp_path / "interrupted.stderr")
    marker = tmp_path / "interrupted_logs" / "style" / "version_0" / "checkpoints" / "step=4.ckpt"
    deadline = time.monotonic() + 300
    while not marker.exists() and interrupted.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    interrupted.send_signal(signal.SIGINT)
    status, stderr = finished(interrupted, tmp_path / "interrupted.stderr")
    assert status == 130, stderr[-3000:]
    found = RESUME_LINE.fullmatch(stderr.strip().splitlines()[-1])
    assert found is not None and 4 <= int(found.group(1)) < 30, stderr[-3000:]
    assert "graceful shutdown" not in stderr and "Traceback" not in stderr
    assert not (tmp_path / "interrupted" / LORA_WEIGHTS_NAME).exists()

    status, stderr = finished(console(found.group(2), tmp_path / "resumed.stderr"), tmp_path / "resumed.stderr")
    assert status == 0, stderr[-3000:]
    status, stderr = finished(reference, tmp_path / "uninterrupted.stderr")
    assert status == 0, stderr[-3000:]
    expected, got = load_file(tmp_path / "uninterrupted" / LORA_WEIGHTS_NAME), load_file(tmp_path / "interrupted" / LORA_WEIGHTS_NAME)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=TOLERANCE)
    assert shlex.split(found.group(2))[-2:] == ["--ckpt_path", str(tmp_path / "interrupted_logs" / "style" / "version_0" / "checkpoints"
                                                                     / f"interrupted-step={found.group(1)}.ckpt")]
