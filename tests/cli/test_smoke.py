"""The `diffstyler` command end to end on the smoke config (tiny model, CPU, seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffstyler.cli import main
from diffstyler.lora import LORA_WEIGHTS_NAME
from diffstyler.training import METADATA_NAME

SMOKE_STEPS = 4  # trainer.max_steps in configs/smoke/style.yaml


def tmp_output_args(tmp_path: Path) -> list[str]:
    """Send every output of the smoke config (logs, checkpoints, config copy, LoRA) into tmp_path."""
    return [
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--model.output_dir", str(tmp_path / "lora"),
    ]


def assert_exported(output_dir: Path) -> None:
    assert (output_dir / LORA_WEIGHTS_NAME).stat().st_size > 0
    metadata = json.loads((output_dir / METADATA_NAME).read_text())
    assert metadata["steps"] == SMOKE_STEPS and metadata["base_model"]["name"] == "tiny"


@pytest.mark.slow
def test_fit_smoke_config_end_to_end(tmp_path, repo_root):
    command = [str(Path(sys.executable).parent / "diffstyler"), "fit", "--config", "configs/smoke/style.yaml",
               *tmp_output_args(tmp_path)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=repo_root, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    assert_exported(tmp_path / "lora")
    run_dir = tmp_path / "logs" / "style" / "version_0"
    assert (run_dir / "config.yaml").is_file()  # the resolved config, next to the logs
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["step=2.ckpt", "step=4.ckpt"]
    assert any(path.name.startswith("events.out.tfevents") for path in run_dir.iterdir())


def print_config(args: list[str], capsys) -> str:
    capsys.readouterr()  # drop earlier output
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--print_config"])
    assert exit_info.value.code in (None, 0)
    return capsys.readouterr().out


@pytest.mark.slow
def test_printed_config_is_stable_and_runs(tmp_path, repo_root, capsys, monkeypatch):
    monkeypatch.chdir(repo_root)  # the smoke config names data/style_stripes.png relative to the repo
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    printed = print_config(["fit", "--config", "configs/smoke/style.yaml", "--model.lora.rank", "8",
                            *tmp_output_args(tmp_path)], capsys)
    config_file = tmp_path / "printed.yaml"
    config_file.write_text(printed)
    assert "rank: 8" in printed

    assert print_config(["fit", "--config", str(config_file)], capsys) == printed
    main(["fit", "--config", str(config_file)])
    assert_exported(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / METADATA_NAME).read_text())["rank"] == 8


# --- predict ----------------------------------------------------------------------------------

def predict_output_args(tmp_path: Path) -> list[str]:
    return [
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--model.output.folder", str(tmp_path / "out"),
        "--model.inversion_cache", str(tmp_path / "cache"),
    ]


@pytest.fixture(scope="module")
def smoke_lora(tmp_path_factory) -> Path:
    from tests.helpers import write_random_lora

    return write_random_lora(tmp_path_factory.mktemp("smoke_lora"), seed=5).parent


@pytest.mark.slow
def test_predict_smoke_config_end_to_end(tmp_path, repo_root, smoke_lora):
    command = [str(Path(sys.executable).parent / "diffstyler"), "predict", "--config", "configs/smoke/stylize.yaml",
               "--data.styles", json.dumps([{"lora": str(smoke_lora)}]), *predict_output_args(tmp_path)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}
    result = subprocess.run(command, cwd=repo_root, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    from diffstyler.outputs import read_settings

    output = tmp_path / "out" / "content_shapes.png"
    assert read_settings(output)["Steps"] == 10  # sampling.steps of the smoke config
    assert (tmp_path / "out" / "content_shapes_grid.png").is_file()
    assert (tmp_path / "logs" / "predict" / "version_0" / "config.yaml").is_file()


@pytest.mark.slow
def test_localized_smoke_config_with_a_mask_file_and_a_box(tmp_path, repo_root, smoke_lora, monkeypatch):
    monkeypatch.chdir(repo_root)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    styles = [
        {"lora": str(smoke_lora), "name": "masked", "mask": {"file": "data/content_shapes_mask.png", "feather": 2}},
        {"lora": str(smoke_lora), "name": "boxed", "scale": 0.5, "mask": {"box": [0, 0, 32, 24]}},
    ]
    main(["predict", "--config", "configs/smoke/localized.yaml", "--data.styles", json.dumps(styles),
          *predict_output_args(tmp_path)])
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert written == ["content_shapes.png", "content_shapes_grid.png",
                       "content_shapes_mask0_masked.png", "content_shapes_mask1_boxed.png", "results.jsonl"]


def test_predict_bad_content_image_is_one_clear_error(tmp_path, repo_root, smoke_lora, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", "configs/smoke/stylize.yaml", "--data.content", json.dumps([str(tmp_path / "nope.jpg")]),
              "--data.styles", json.dumps([{"lora": str(smoke_lora)}]), *predict_output_args(tmp_path)])
    assert exit_info.value.code == 2
    assert "nope.jpg" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_predict_printed_config_is_stable(tmp_path, repo_root, capsys, monkeypatch, smoke_lora):
    monkeypatch.chdir(repo_root)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    printed = print_config(["predict", "--config", "configs/smoke/stylize.yaml", "--model.injection.feature_steps", "3",
                            "--data.styles", json.dumps([{"lora": str(smoke_lora)}]), *predict_output_args(tmp_path)], capsys)
    assert "feature_steps: 3" in printed
    config_file = tmp_path / "printed.yaml"
    config_file.write_text(printed)
    assert print_config(["predict", "--config", str(config_file)], capsys) == printed


def test_a_file_read_interrupted_by_another_ranks_failure_is_not_reported_as_a_broken_file():
    """The launcher's signal handler raises AnotherRankFailed wherever the launcher is; inside a
    LoRA read, the read's handler wraps it as "LoRA file unreadable". Catches that line shown in
    place of the rank that really failed."""
    from diffstyler.callbacks.first_failure import AnotherRankFailed
    from diffstyler.cli.reporting import interrupted_by_another_rank
    from diffstyler.errors import UserError

    try:
        try:
            raise AnotherRankFailed("another rank failed")
        except Exception as error:
            raise UserError("LoRA file unreadable", "x.safetensors", "not a valid safetensors file") from error
    except UserError as wrapped:
        assert interrupted_by_another_rank(wrapped)
    assert not interrupted_by_another_rank(UserError("LoRA file unreadable", "x.safetensors", "truncated"))


@pytest.mark.slow
def test_fit_without_a_logger_writes_nothing_into_the_working_folder(tmp_path, repo_root, monkeypatch, style_image):
    """`--trainer.logger false`: Lightning would write the resolved config and the checkpoints into
    its default_root_dir, the working folder. Catches them written there, and not next to the LoRA."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    main(["fit", "--config", str(repo_root / "configs/smoke/style.yaml"), "--data.images", str(style_image),
          "--trainer.logger", "false", "--model.output_dir", str(tmp_path / "lora"), "--trainer.enable_progress_bar", "false"])
    assert list(work.iterdir()) == []
    assert_exported(tmp_path / "lora")
    assert (tmp_path / "lora" / "config.yaml").is_file()
    assert sorted(path.name for path in (tmp_path / "lora" / "checkpoints").iterdir()) == ["step=2.ckpt", "step=4.ckpt"]


def test_the_signal_of_another_rank_counts_even_when_torch_drops_the_chain(monkeypatch):
    """The handler's AnotherRankFailed, raised while torch converts a LoRA tensor, comes out as
    torch's own ValueError ("could not determine the shape of object type ...") with no chain; the
    loader then says "LoRA does not fit the model". Catches that line shown in place of the rank
    that really failed (seen on a two-process run whose rank 1 failed during rank 0's LoRA load)."""
    import signal

    from diffstyler.callbacks import first_failure
    from diffstyler.cli.reporting import interrupted_by_another_rank
    from diffstyler.errors import UserError

    monkeypatch.setattr(first_failure, "another_rank_signalled", False)
    unchained = UserError("LoRA does not fit the model", "x.safetensors",
                          "could not determine the shape of object type 'torch.storage.UntypedStorage'")
    assert not interrupted_by_another_rank(unchained)
    with pytest.raises(first_failure.AnotherRankFailed):  # in the run, torch swallows it and raises its own error
        first_failure.raise_another_rank_failed(signal.SIGUSR2, None)
    assert interrupted_by_another_rank(unchained)
