"""`diffstyler fit` over a folder with `data.one_lora_per_image`: one LoRA per style image, each as
its own fit would train it, resumable, shared between processes, a different LoRA never overwritten."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffstyler.cli.lora_per_image import ImageLoRA, already_trained, expected_record
from diffstyler.data import StyleDataModule
from diffstyler.errors import UserError
from diffstyler.lora import LORA_INFO_NAME, LORA_WEIGHTS_NAME
from tests.helpers import finished, run_cli_in_process, run_console

STEPS = 2


@pytest.fixture
def style_folder(tmp_path, repo_root) -> Path:
    """Three style images: the two of data/styles and the repository's stripes, in a folder."""
    folder = tmp_path / "styles"
    folder.mkdir()
    for source in ("data/styles/checks.png", "data/styles/waves.png", "data/style_stripes.png"):
        shutil.copy(repo_root / source, folder / Path(source).name.removeprefix("style_"))
    return folder  # sorted: checks, stripes, waves


def fit_args(images: list[str], output_dir: Path, logs: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", "configs/smoke/style.yaml",
        "--data.images", json.dumps(images),
        "--model.output_dir", str(output_dir),
        "--model.learning_rate", "5e-3",  # large enough that 2 steps move the LoRA clearly
        "--trainer.max_steps", str(STEPS),
        "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(logs),
        *extra,
    ]


def per_image_args(folder: Path, output_dir: Path, logs: Path, *extra: str) -> list[str]:
    return fit_args([str(folder)], output_dir, logs, "--data.one_lora_per_image", "true", *extra)


def lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / LORA_WEIGHTS_NAME)


def file_states(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.read_bytes()) for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_each_image_gets_the_lora_its_own_fit_gives(style_folder, tmp_path):
    """Catches: one model, optimizer or latent cache carried from image to image (the later LoRAs
    would start from, or train on, an earlier image), the LoRA init not seeded again per image
    (a LoRA would depend on its place in the list), and every LoRA trained on all images.

    Both fits run in processes with one CPU thread: with several, training on the CPU is not
    bit-reproducible (the order of a gradient's reductions varies, ~1e-5 here), and changing the
    thread count inside this process would unsettle the other tests' tolerances."""
    one_thread = {"OMP_NUM_THREADS": "1"}
    loras = tmp_path / "loras"
    status, output = finished(run_console(per_image_args(style_folder, loras, tmp_path / "logs"), **one_thread))
    assert status == 0, output[-3000:]
    assert "3 style images: 0 already trained, 3 to train" in output
    assert f"3 LoRAs trained, 0 already there; in {loras}" in output
    assert sorted(path.name for path in loras.iterdir()) == ["checks", "stripes", "waves"]

    alone = tmp_path / "alone"
    image = style_folder / "waves.png"  # the last of three: two trainings ran before it
    status, output = finished(run_console(fit_args([str(image)], alone, tmp_path / "logs_alone"), **one_thread))
    assert status == 0, output[-3000:]
    expected, got = lora_weights(alone), lora_weights(loras / "waves")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert not torch.equal(got[next(iter(got))], lora_weights(loras / "checks")[next(iter(got))])

    for name in ("checks", "stripes", "waves"):
        assert recorded_image(loras / name) == f"{name}.png"
        assert json.loads((loras / name / LORA_INFO_NAME).read_text())["steps"] == STEPS
    # a logger folder per image, so that checkpoints of two images never meet
    assert sorted(path.name for path in (tmp_path / "logs" / "style").iterdir()) == ["checks", "stripes", "waves"]


@pytest.mark.slow
def test_a_rerun_skips_what_is_trained_and_refuses_other_settings(style_folder, tmp_path, monkeypatch, capsys):
    """Catches: a rerun that trains again (or overwrites), and one that takes a LoRA trained with
    other steps, or on another image, for this run's."""
    loras, logs = tmp_path / "loras", tmp_path / "logs"
    assert run_cli_in_process(per_image_args(style_folder, loras, logs), monkeypatch, capsys)[0] == 0
    trained = file_states(loras)

    status, output = run_cli_in_process(per_image_args(style_folder, loras, logs), monkeypatch, capsys)
    assert status == 0, output
    assert "3 style images: 3 already trained, 0 to train" in output
    assert file_states(loras) == trained

    status, output = run_cli_in_process(per_image_args(style_folder, loras, logs, "--trainer.max_steps", "3"), monkeypatch, capsys)
    assert status == 2
    line = output.strip().splitlines()[-1]
    assert line == (f"diffstyler fit: error: a LoRA with other settings is there ({loras / 'checks' / LORA_INFO_NAME}): "
                    f"it records steps {STEPS}, this run 3; delete the folder to train it again, or choose another model.output_dir")
    assert file_states(loras) == trained

    shutil.copy(style_folder / "checks.png", style_folder / "waves.png")  # waves.png now has other content
    status, output = run_cli_in_process(per_image_args(style_folder, loras, logs), monkeypatch, capsys)
    assert status == 2
    assert f"a LoRA of another image is there ({loras / 'waves' / LORA_INFO_NAME})" in output.strip().splitlines()[-1]
    assert file_states(loras) == trained


@pytest.mark.slow
def test_processes_share_the_images_each_trained_once(style_folder, tmp_path, monkeypatch, capsys):
    """Catches: every process training every image, and a split that drops or repeats one."""
    loras, logs = tmp_path / "loras", tmp_path / "logs"
    share = ["--data.num_processes", "2", "--data.process_index"]
    status, output = run_cli_in_process(per_image_args(style_folder, loras, logs, *share, "1"), monkeypatch, capsys)
    assert status == 0, output
    assert "3 style images" not in output and "1 style images (process 1 of 2)" in output
    assert sorted(path.name for path in loras.iterdir()) == ["stripes"]
    stripes = file_states(loras / "stripes")

    status, output = run_cli_in_process(per_image_args(style_folder, loras, logs, *share, "0"), monkeypatch, capsys)
    assert status == 0, output
    assert "2 style images (process 0 of 2): 0 already trained, 2 to train" in output
    assert sorted(path.name for path in loras.iterdir()) == ["checks", "stripes", "waves"]
    assert file_states(loras / "stripes") == stripes
    assert all(recorded_image(loras / name) == f"{name}.png" for name in ("checks", "stripes", "waves"))


def recorded_image(folder: Path) -> str:
    (entry,) = json.loads((folder / LORA_INFO_NAME).read_text())["style_images"]
    return Path(entry["path"]).name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (["--ckpt_path", "last"], "invalid config value (ckpt_path): not with data.one_lora_per_image"),
        (["--data.process_index", "2", "--data.num_processes", "2"], "invalid config value (data.process_index): must be in [0, data.num_processes=2), got 2"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_training(extra, line, style_folder, tmp_path, monkeypatch, capsys):
    loras = tmp_path / "loras"
    status, output = run_cli_in_process(per_image_args(style_folder, loras, tmp_path / "logs", *extra), monkeypatch, capsys)
    assert status == 2
    assert line in output.strip().splitlines()[-1]
    assert not loras.exists() or not any(loras.iterdir())


def test_sharing_needs_one_lora_per_image_and_stems_must_differ(style_folder, tmp_path):
    with pytest.raises(UserError, match=r"data.num_processes.*only with data.one_lora_per_image"):
        StyleDataModule([str(style_folder)], num_processes=2)
    shutil.copy(style_folder / "checks.png", style_folder / "checks.jpg")
    with pytest.raises(UserError, match=r"two style images named 'checks'") as caught:
        StyleDataModule([str(style_folder)], one_lora_per_image=True)
    assert caught.value.where == "data.images"
    # one LoRA from all images: the stems do not matter
    assert len(StyleDataModule([str(style_folder)], resolution=64).images) == 4


def test_a_plain_trainer_fit_cannot_train_all_images_into_one_lora(style_folder):
    data = StyleDataModule([str(style_folder)], one_lora_per_image=True)
    with pytest.raises(UserError, match="one LoRA per image is trained by `diffstyler fit`"):
        data.train_dataloader()


def test_already_trained_needs_the_weights_and_a_readable_record(tmp_path):
    lora = ImageLoRA("a.png", "a", "0" * 64, tmp_path / "a")
    expected = expected_record({"base_model": {"name": "tiny"}, "adapter_name": "style", "rank": 4, "alpha": 4,
                                "target_modules": ["to_q"], "dropout": 0.0, "learning_rate": 1e-3, "seed": 0}, 2, "p", 64)
    assert not already_trained(lora, expected)  # nothing there
    lora.folder.mkdir()
    record = {**expected, "style_images": [{"path": "a.png", "sha256": "0" * 64}]}
    (lora.folder / LORA_INFO_NAME).write_text(json.dumps(record))
    assert not already_trained(lora, expected)  # info without weights: an interrupted export
    (lora.folder / LORA_WEIGHTS_NAME).write_bytes(b"")
    assert already_trained(lora, expected)
    (lora.folder / LORA_INFO_NAME).write_text("{broken")
    with pytest.raises(UserError, match="unreadable LoRA info file"):
        already_trained(lora, expected)
